"""modules_to_save=["lm_head"] on a tied-embedding decoder (issue #29, defect 8): the head's copy trains and is
saved as PEFT 0.21 does (its own (V, d) weight under ``base_model.model.lm_head.weight``, the embedding frozen),
and PEFT's adapter loads, with the same logits both ways."""
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import lowrank as lr
from lowrank.nn.optim import Adam
from tiny_models import random_llama_checkpoint

V, T = 61, 7
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random transformers Llama whose lm_head is tied to embed_tokens, saved to disk."""
    return random_llama_checkpoint(tmp_path_factory.mktemp("tied"), V, tied=True)


def twins(checkpoint):
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    model = lr.LlamaForCausalLM.from_pretrained(checkpoint, dtype="float32")
    assert model.config.tie_word_embeddings and hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf.eval(), model


def ids(seed=0):
    return np.random.default_rng(seed).integers(0, V, (3, T))


def peft_logits(pm, x):
    with torch.no_grad():
        return pm(torch.from_numpy(x)).logits.numpy()


def assert_same(got, want):
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def train(lm, steps=5):
    opt = Adam([p for p in lm.parameters() if p.trainable], lr=1e-2)
    for step in range(steps):
        x = ids(10 + step)
        lm.forward(x, labels=x)
        lm.backward()
        opt.step()
        opt.zero_grad()


def test_the_head_copy_trains_and_is_saved_while_the_embedding_stays(tmp_path, checkpoint):
    _, model = twins(checkpoint)
    E0 = model.model.embed_tokens.weight.data.copy()
    lm = lr.get_lora_model(model, lr.LoraConfig(**CONFIG))
    head = lm.model.lm_head.modules_to_save["default"]
    assert head.weight.trainable and head.weight.shape == (V, 32)
    train(lm)
    np.testing.assert_array_equal(lm.model.model.embed_tokens.weight.data, E0)      # frozen, as in PEFT
    assert not np.allclose(head.weight.data, E0)                                     # the copy trained
    lm.eval().save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    np.testing.assert_array_equal(saved["base_model.model.lm_head.weight"].numpy(), head.weight.data)
    x = ids(1)
    loaded = lr.LoraModel.from_pretrained(lr.LlamaForCausalLM.from_pretrained(checkpoint), tmp_path)
    np.testing.assert_array_equal(loaded.forward(x), lm.forward(x))
    with lm.disable_adapter():                                                       # the original head is tied
        np.testing.assert_array_equal(lm.forward(x), lr.LlamaForCausalLM.from_pretrained(checkpoint).forward(x))


def test_peft_trains_the_same_keys_and_its_adapter_loads_with_the_same_logits(tmp_path, checkpoint):
    hf, model = twins(checkpoint)
    pm = peft.get_peft_model(hf, peft.LoraConfig(**CONFIG))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        x = torch.from_numpy(ids(20 + step))
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval().save_pretrained(tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    lm = lr.LoraModel.from_pretrained(model, tmp_path)
    lm_ours = lr.get_lora_model(lr.LlamaForCausalLM.from_pretrained(checkpoint), lr.LoraConfig(**CONFIG))
    assert set(lr.tuners.lora.save_and_load.get_peft_model_state_dict(lm_ours)) == \
        set(load_file(tmp_path / "adapter_model.safetensors"))                      # PEFT's keys, exactly
    x = ids(2)
    assert_same(lm.forward(x), peft_logits(pm, x))


def test_a_lowrank_adapter_loads_into_peft_with_the_same_logits(tmp_path, checkpoint):
    hf, model = twins(checkpoint)
    lm = lr.get_lora_model(model, lr.LoraConfig(**CONFIG))
    train(lm, steps=3)
    lm.eval().save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    x = ids(3)
    assert_same(lm.forward(x), peft_logits(pm, x))


def test_merging_unties_the_head_so_the_merged_model_saves_and_loads(tmp_path, checkpoint):
    _, model = twins(checkpoint)
    lm = lr.get_lora_model(model, lr.LoraConfig(**CONFIG))
    train(lm, steps=2)
    x = ids(4)
    y = lm.eval().forward(x)
    merged = lm.merge_and_unload()
    assert not merged.config.tie_word_embeddings
    merged.save_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(lr.LlamaForCausalLM.from_pretrained(tmp_path / "merged").forward(x), y,
                               rtol=1e-5, atol=1e-5 * np.abs(y).max())
