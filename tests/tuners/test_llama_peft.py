"""PEFT adapters on a Llama decoder, both ways: Hugging Face PEFT's files load into lowrank and lowrank's
into PEFT, with the same logits (float32, max |difference| within 1e-5 of the largest |logit|).

A tiny ``transformers.LlamaForCausalLM`` (hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 61, eager
attention) is saved with ``save_pretrained`` and loaded by ``lr.LlamaForCausalLM.from_pretrained``, so
both sides hold the same base weights. Adapter tensors are randomized (B = 0, or A = 0 for an embedding,
at init would hide a wrong factor or scaling). Keys: ``...q_proj.lora_A.weight`` and, for the
embedding, ``...embed_tokens.lora_embedding_A`` with no ``.weight``.
"""
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import lowrank as lr
from peft_random import randomize_lowrank as _randomize_lowrank, randomize_peft as _randomize_peft
from tiny_models import random_llama_checkpoint

V, T = 61, 7
RTOL = 1e-5
pytestmark = [pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers` to `True`:UserWarning"),
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

# PEFT's own field names, given to peft.LoraConfig and lr.LoraConfig alike
CASES = {
    "q_v": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "q_v_down_embed": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "all_linear": dict(r=2, lora_alpha=4, target_modules="all-linear"),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj", "embed_tokens"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "embed_tokens"],
                     rank_pattern={"v_proj": 2, "embed_tokens": 6, r"layers\.1\.self_attn\.q_proj": 3},
                     alpha_pattern={"gate_proj": 3, "embed_tokens": 5}),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random transformers Llama saved to disk; every weight randomized (norms near 1)."""
    return random_llama_checkpoint(tmp_path_factory.mktemp("llama"), V, tied=False)


def twins(checkpoint):
    """(transformers model, lowrank model) holding the same float32 base weights."""
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager")
    return hf.eval(), lr.LlamaForCausalLM.from_pretrained(checkpoint, dtype="float32")


def token_ids(seed=0):
    return np.random.default_rng(seed).integers(0, V, (3, T))


def peft_logits(pm, ids):
    with torch.no_grad():
        return pm(torch.from_numpy(ids)).logits.numpy()


def assert_same(got, want):
    assert got.dtype == want.dtype == np.float32
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= RTOL, f"max |difference| {err:.3g} of the largest |logit| > {RTOL}"


def adapter_tensor(name):
    return ".lora_" in name


def randomize_peft(pm, seed=1):
    _randomize_peft(pm, adapter_tensor, seed, scale=0.3)


def randomize_lowrank(lm, seed=1):
    _randomize_lowrank(lm, adapter_tensor, seed, scale=0.3)


def saved_keys(directory):
    return set(load_file(directory / "adapter_model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_adapter_on_llama_loads_into_lowrank_with_the_same_logits(tmp_path, checkpoint, case):
    hf, model = twins(checkpoint)
    ids = token_ids()
    y_base = model.forward(ids)
    pm = peft.get_peft_model(hf, peft.LoraConfig(**CASES[case]))
    randomize_peft(pm)
    pm.eval().save_pretrained(tmp_path)
    if "embed_tokens" in CASES[case]["target_modules"]:
        assert {"base_model.model.model.embed_tokens.lora_embedding_A",
                "base_model.model.model.embed_tokens.lora_embedding_B"} <= saved_keys(tmp_path)
    lm = lr.LoraModel.from_pretrained(model, tmp_path)
    y = lm.forward(ids)
    assert_same(y, peft_logits(pm, ids))
    assert not np.allclose(y, y_base, rtol=1e-3)                        # the adapter changes the logits
    ranks = {n: l.r["default"] for n, l in lm.lora_layers()}
    theirs = {n: m.r["default"] for n, m in pm.base_model.model.named_modules() if hasattr(m, "r") and m.r}
    assert ranks == theirs                                              # the same layers, the same ranks
    assert "lm_head" not in ranks


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_lowrank_adapter_on_llama_loads_into_peft_with_the_same_logits(tmp_path, checkpoint, case):
    hf, model = twins(checkpoint)
    ids = token_ids(1)
    lm = lr.get_lora_model(model, lr.LoraConfig(**CASES[case]))
    randomize_lowrank(lm)
    lm.eval()
    y = lm.forward(ids)
    lm.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    assert_same(y, peft_logits(pm, ids))
    with pm.disable_adapter():                                          # the base alone differs: the adapter loaded
        assert not np.allclose(peft_logits(pm, ids), y, rtol=1e-3)


def test_bfloat16_peft_adapter_files_load_into_lowrank(tmp_path, checkpoint):
    hf, model = twins(checkpoint)
    pm = peft.get_peft_model(hf, peft.LoraConfig(**CASES["q_v_down_embed"]))
    randomize_peft(pm, seed=2)
    adapter = [p for n, p in pm.named_parameters() if adapter_tensor(n)]
    with torch.no_grad():
        for p in adapter:                                               # the adapter alone, as PEFT users cast it
            p.data = p.data.to(torch.bfloat16)
    pm.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")      # (+ the float32 base embedding: PEFT's default)
    assert {t.dtype for k, t in stored.items() if adapter_tensor(k)} == {torch.bfloat16}
    with torch.no_grad():
        for p in adapter:                                               # float32 again, holding the rounded values
            p.data = p.data.float()
    lm = lr.LoraModel.from_pretrained(model, tmp_path)
    assert all(p.dtype == np.float32 for _, p in lm.named_parameters())     # upcast exactly on loading
    ids = token_ids(2)
    assert_same(lm.forward(ids), peft_logits(pm.eval(), ids))


def test_bfloat16_lowrank_adapter_files_load_into_peft(tmp_path, checkpoint):
    hf, model = twins(checkpoint)
    lm = lr.get_lora_model(model, lr.LoraConfig(**CASES["q_v_down_embed"]))
    randomize_lowrank(lm, seed=3)
    lm.save_pretrained(tmp_path, dtype="bfloat16")
    for name, p in lm.named_parameters():                               # what the file holds: round to nearest even
        if adapter_tensor(name):
            p.data = p.data.astype(ml_dtypes.bfloat16).astype(np.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    ids = token_ids(3)
    assert_same(lm.eval().forward(ids), peft_logits(pm, ids))


@pytest.mark.parametrize("save_embedding_layers", ["auto", False])
def test_embedding_base_weights_saved_by_peft_are_loaded_as_peft_loads_them(tmp_path, checkpoint,
                                                                            save_embedding_layers):
    """PEFT's default stores a targeted embedding's base weights beside the adapter, and loading writes them
    into the model (a resized or trained embedding); without them the model's own stay."""
    hf, model = twins(checkpoint)
    pm = peft.get_peft_model(hf, peft.LoraConfig(**CASES["q_v_down_embed"]))
    randomize_peft(pm, seed=4)
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.base_layer.weight.mul_(1.5)
    pm.eval().save_pretrained(tmp_path, save_embedding_layers=save_embedding_layers)
    stored = "base_model.model.model.embed_tokens.base_layer.weight" in saved_keys(tmp_path)
    assert stored == (save_embedding_layers == "auto")
    W0 = model.model.embed_tokens.weight.data.copy()
    lm = lr.LoraModel.from_pretrained(model, tmp_path)
    W = lm.model.model.embed_tokens.weight.data
    np.testing.assert_array_equal(W, 1.5 * W0 if stored else W0)
    if stored:
        ids = token_ids(4)
        assert_same(lm.forward(ids), peft_logits(pm, ids))
