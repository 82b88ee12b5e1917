"""Mixed-adapter batches through a Llama decoder (PEFT's ``adapter_names=``, one name per sequence).

The oracle is the definition: a mixed batch is every sequence run alone with its adapter. So row b's
logits equal those of ids[b:b+1] run with adapter names[b] ("__base__": with the adapters disabled),
and each adapter's dA, dB equal the sum, over its rows, of the gradients of those rows run alone with
the same upstream gradient rows.
"""
import numpy as np
import pytest

import lowrank as lr
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.tuners.lora.mixed import rows_for

TARGETS = ["q_proj", "v_proj", "down_proj"]
NAMES = ["a", "__base__", "b", "c", "a", "b"]           # c adapts only v_proj: other layers run it as base
# float32 measured: |Δ| <= 7e-8 on logits up to 0.25 (the batch's and a single row's GEMMs round differently)
TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-6)}


def tiny_llama(dtype, seed=0):
    config = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config, dtype=dtype, seed=seed)


def lora_llama(dtype):
    """Adapters a (r=4), b (r=2, alpha 6) on q/v/down_proj and c (r=3) on v_proj, all B factors random."""
    model = lr.get_lora_model(tiny_llama(dtype), lr.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                              adapter_name="a")
    model.add_adapter("b", lr.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS))
    model.add_adapter("c", lr.LoraConfig(r=3, lora_alpha=3, target_modules=["v_proj"]))
    rng = np.random.default_rng(1)
    for _, layer in model.lora_layers():
        for B in (layer.lora_B[n] for n in layer.lora_B):
            B.data = (0.3 * rng.standard_normal(B.shape)).astype(B.dtype)
    return model


def batch(dtype, B=len(NAMES), T=7, seed=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 37, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = mask[4, :3] = 0                             # left padding on two rows
    return ids, mask, rng.standard_normal((B, T, 37)).astype(dtype)


def adapter_grads(model, name):
    return {n: p for n, p in model.named_parameters()
            if n.endswith(f".lora_A.{name}") or n.endswith(f".lora_B.{name}")}


def run_alone(model, name, ids, mask):
    if name == "__base__":
        with model.disable_adapter():
            return model.forward(ids, attention_mask=mask)
    model.set_adapter(name)
    return model.forward(ids, attention_mask=mask)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_batch_logits_equal_each_sequence_alone(dtype):
    model = lora_llama(dtype)
    ids, mask, _ = batch(dtype)
    mixed = model.forward(ids, adapter_names=NAMES, attention_mask=mask)          # (B, T, V)
    assert mixed.shape == (len(NAMES), 7, 37) and mixed.dtype == dtype
    for b, name in enumerate(NAMES):
        alone = run_alone(model, name, ids[b:b + 1], mask[b:b + 1])
        np.testing.assert_allclose(mixed[b], alone[0], **TOL[dtype])
    base = run_alone(model, "__base__", ids, mask)
    for b in (1,):                                                                 # the "__base__" row
        np.testing.assert_allclose(mixed[b], base[b], **TOL[dtype])
    for b in (0, 2, 3):                                                            # the adapters do change rows
        assert np.abs(mixed[b] - base[b]).max() > 1e-3 * np.abs(base[b]).max()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_batch_gives_each_adapter_the_gradient_of_its_own_rows(dtype):
    model = lora_llama(dtype)
    ids, mask, dlogits = batch(dtype)
    for name in "abc":
        for p in adapter_grads(model, name).values():
            p.trainable = True                                 # train all three adapters in one mixed batch
    model.zero_grad()
    model.forward(ids, adapter_names=NAMES, attention_mask=mask)
    model.backward(dlogits)
    mixed = {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}
    assert set(mixed) == set().union(*(adapter_grads(model, n) for n in "abc"))
    scale = max(float(np.abs(g).max()) for g in mixed.values())
    for name in "abc":
        model.zero_grad()
        model.set_adapter(name)                                # only ``name`` trainable: grads sum over its rows
        for b in [b for b, n in enumerate(NAMES) if n == name]:
            model.forward(ids[b:b + 1], attention_mask=mask[b:b + 1])
            model.backward(dlogits[b:b + 1])
        for n, p in adapter_grads(model, name).items():
            np.testing.assert_allclose(mixed[n], p.grad, rtol=TOL[dtype]["rtol"],
                                       atol=TOL[dtype]["atol"] * 10 * scale)


def test_model_kwargs_pass_through_and_the_mlp_path_is_unchanged():
    model = lora_llama("float64")
    ids, mask, dlogits = batch("float64")
    model.set_adapter("a")
    plain = LlamaForCausalLM.forward(model.model, ids, attention_mask=mask)
    np.testing.assert_array_equal(model.forward(ids, attention_mask=mask), plain)
    assert model.backward(dlogits) is None                     # ids get no gradient
    assert all(p.grad is not None for p in adapter_grads(model, "a").values())
    mlp = lr.get_lora_model(lr.MLP([3, 5, 2], seed=0), lr.LoraConfig(r=2, target_modules=["0"]))
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(mlp.forward(x), mlp.forward(x, adapter_names=["default"] * 4))


def test_mixed_batch_errors_name_the_problem():
    model = lora_llama("float64")
    ids, mask, _ = batch("float64")
    with pytest.raises(ValueError, match="adapter_names has 2 entries for 6 rows"):
        model.forward(ids, adapter_names=["a", "b"], attention_mask=mask)
    with pytest.raises(ValueError, match=r"unknown adapters \['z'\]"):
        model.forward(ids, adapter_names=["z"] * 6)
    with pytest.raises(TypeError, match="one per sequence"):
        model.forward(ids[:1], adapter_names="a")
    assert all(layer.row_adapters is None for _, layer in model.lora_layers())   # cleared after errors too
    with pytest.raises(ValueError, match="3 sequences can't be spread over 7 rows"):
        rows_for(["a", "b", "a"], 7, "q_proj")
    assert rows_for(["a", "b"], 6) == ["a"] * 3 + ["b"] * 3


def test_mixed_batch_with_a_modules_to_save_head_uses_each_sequences_copy():
    """A trained lm_head copy per adapter (modules_to_save) sees B·T rows: each sequence's tokens go
    through its own adapter's copy, exactly as when the sequence runs alone."""
    model = lr.get_lora_model(tiny_llama("float64"), lr.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   modules_to_save=["lm_head"]))
    head = model.model.lm_head.modules_to_save["default"]
    head.weight.data = head.weight.data + 0.5                        # the copy differs from the frozen head
    ids = np.random.default_rng(0).integers(0, 37, (2, 7))
    mixed = model.forward(ids, adapter_names=["default", "__base__"])
    np.testing.assert_allclose(mixed[0], run_alone(model, "default", ids[:1], np.ones((1, 7)))[0], rtol=1e-12)
    np.testing.assert_allclose(mixed[1], run_alone(model, "__base__", ids[1:], np.ones((1, 7)))[0], rtol=1e-12)
    assert np.abs(mixed[0] - run_alone(model, "__base__", ids[:1], np.ones((1, 7)))[0]).max() > 0.1