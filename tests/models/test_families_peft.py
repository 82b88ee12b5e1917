"""PEFT LoRA adapters on each family (test_families_hf.FAMILIES), both ways, in float64 with transformers'
float32 casts widened: a PEFT adapter loads into lowrank with the same logits (1e-10) and the same adapter
gradients (1e-8), and lowrank's saved adapter loads into PEFT with the same logits. "all-linear" adapts
every projection, so Qwen2's biased q/k/v, Qwen3's normalized q/k and Mistral's windowed layers are all in.
"""
import numpy as np
import peft
import pytest
import torch

import lowrank as lr
from peft_random import randomize_lowrank, randomize_peft
from test_families_hf import FAMILIES, assert_close, batch, twins, wide  # noqa: F401 (wide: a fixture)

CONFIG = dict(r=2, lora_alpha=4, target_modules="all-linear")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def adapter_tensor(name):
    return ".lora_" in name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_peft_adapter_loads_into_lowrank_with_equal_logits_and_gradients(tmp_path, wide, family):
    hf, ours = twins(family, tmp_path / "base")
    pm = peft.get_peft_model(hf, peft.LoraConfig(**CONFIG))
    randomize_peft(pm, adapter_tensor, seed=1, scale=0.3)
    pm.save_pretrained(tmp_path / "adapter")
    lm = lr.LoraModel.from_pretrained(ours, tmp_path / "adapter", is_trainable=True)
    ids, mask = batch()
    real = mask.astype(bool)
    expected = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logits = lm.forward(ids, attention_mask=mask)
    assert_close(logits[real], expected.detach().numpy()[real], 1e-10)
    g = np.random.default_rng(1).standard_normal(logits.shape) * real[..., None]
    expected.backward(torch.tensor(g))
    lm.backward(g)
    theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    grads = {n: p for n, p in lm.named_parameters() if p.trainable}
    assert sorted(f"base_model.{n}.weight" for n in grads) == sorted(theirs)
    for name, p in grads.items():
        assert_close(p.grad, theirs[f"base_model.{name}.weight"].grad.numpy(), 1e-8)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_lowrank_adapter_loads_into_peft_with_equal_logits(tmp_path, wide, family):
    hf, ours = twins(family, tmp_path / "base")
    lm = lr.get_lora_model(ours, lr.LoraConfig(**CONFIG))
    randomize_lowrank(lm, adapter_tensor, seed=2, scale=0.3)
    lm.save_pretrained(tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ids, mask = batch(seed=4)
    real = mask.astype(bool)
    with torch.no_grad():
        expected = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        with pm.disable_adapter():                                      # the base alone differs: the adapter loaded
            base = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = lm.forward(ids, attention_mask=mask)
    assert_close(logits[real], expected[real], 1e-10)
    assert not np.allclose(logits[real], base[real], rtol=1e-3)
