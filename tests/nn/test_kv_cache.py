"""The KV cache: a prefill then decode steps give the full forward's logits, position by position.

The oracle is the training forward on the whole sequence (causal, left padding masked): feeding
the same ids in pieces (a prompt of P0 tokens, then 1 or 2 at a time) through ``kv_cache`` must
give the same (B, T, V) logits, GQA and left padding included, in float64 to 1e-10.
"""
import numpy as np
import pytest

import lowrank as lr
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.nn.kv_cache import KVCache

V = 37


def tiny_llama(dtype="float64", seed=0, **kw):
    config = LlamaConfig(**{**dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32), **kw})
    return LlamaForCausalLM(config, dtype=dtype, seed=seed)


def ids_and_mask(B=3, T=9, seed=1):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int64)
    mask[1, :3] = mask[2, :1] = 0                              # left padding on two rows
    return rng.integers(0, V, (B, T)), mask


def run_in_pieces(forward, config, ids, mask, pieces, dtype="float64"):
    """Logits (B, T, V) from feeding ids in consecutive pieces of the given lengths through one cache."""
    cache = KVCache.for_model(config, ids.shape[0], ids.shape[1], dtype)
    out, t = [], 0
    for n in pieces:
        out.append(forward(ids[:, t:t + n], attention_mask=mask[:, t:t + n], kv_cache=cache))
        t += n
    assert t == ids.shape[1] and cache.length == t
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("pieces", [[5, 1, 1, 1, 1], [1] * 9, [9], [3, 2, 2, 1, 1]])
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (4, 4)])
def test_prefill_then_decode_equals_the_full_forward(pieces, heads):
    model = tiny_llama(num_attention_heads=heads[0], num_key_value_heads=heads[1])
    ids, mask = ids_and_mask()
    full = model.forward(ids, attention_mask=mask)                                    # (B, T, V)
    got = run_in_pieces(model.forward, model.config, ids, mask, pieces)
    np.testing.assert_allclose(got, full, rtol=1e-10, atol=1e-12)


def test_a_left_padded_row_gives_its_unpadded_logits():
    """RoPE sees only position differences: the same tokens shifted right by padding give the same logits."""
    model = tiny_llama()
    ids, mask = ids_and_mask()
    padded = run_in_pieces(model.forward, model.config, ids, mask, [5, 1, 1, 1, 1])
    alone = run_in_pieces(model.forward, model.config, ids[1:2, 3:], mask[1:2, 3:], [2, 1, 1, 1, 1])
    np.testing.assert_allclose(padded[1:2, 3:], alone, rtol=1e-10, atol=1e-12)


def test_mixed_adapter_batches_through_the_cache_equal_the_full_mixed_forward():
    model = lr.get_lora_model(tiny_llama(), lr.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]),
                              adapter_name="a")
    model.add_adapter("b", lr.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "down_proj"]))
    rng = np.random.default_rng(3)
    for _, layer in model.lora_layers():
        for n in layer.lora_B:
            layer.lora_B[n].data = 0.3 * rng.standard_normal(layer.lora_B[n].shape)
    ids, mask = ids_and_mask()
    names = ["b", "a", "__base__"]
    full = model.forward(ids, adapter_names=names, attention_mask=mask)
    forward = lambda x, **kw: model.forward(x, adapter_names=names, **kw)          # noqa: E731
    got = run_in_pieces(forward, model.model.config, ids, mask, [4, 2, 1, 1, 1])
    np.testing.assert_allclose(got, full, rtol=1e-10, atol=1e-12)


def test_the_cache_states_its_memory():
    """nbytes = 2 · L · B · H_kv · T_max · h · itemsize (the module docstring's formula and example)."""
    cache = KVCache(num_layers=3, batch_size=2, num_kv_heads=2, head_dim=8, max_length=10, dtype="float32")
    assert cache.nbytes == 2 * 3 * 2 * 2 * 10 * 8 * 4
    demo = KVCache(4, 16, 8, 32, 64, "float32")
    assert demo.nbytes == 8_388_608
    assert "8,388,608 bytes" in repr(demo) and "length=0" in repr(demo)


def test_a_full_cache_refuses_more_tokens_and_a_cached_forward_has_no_backward():
    model = tiny_llama()
    cache = KVCache.for_model(model.config, 1, 4, "float64")
    model.forward(np.zeros((1, 3), np.int64), kv_cache=cache)
    with pytest.raises(RuntimeError):
        model.backward(np.zeros((1, 3, V)))
    with pytest.raises(ValueError, match="exceed its max_length 4"):
        model.forward(np.zeros((1, 2), np.int64), kv_cache=cache)
    with pytest.raises(ValueError, match=r"shape \(B, T_new\) = \(1, 1\)"):
        model.forward(np.zeros((1, 1), np.int64), attention_mask=np.ones((1, 4)), kv_cache=cache)


def test_positions_past_the_context_are_refused_with_a_cache():
    model = tiny_llama(max_position_embeddings=6)
    cache = KVCache.for_model(model.config, 1, 8, "float64")
    model.forward(np.zeros((1, 6), np.int64), kv_cache=cache)
    with pytest.raises(ValueError, match="T=7 exceeds max_position_embeddings=6"):
        model.forward(np.zeros((1, 1), np.int64), kv_cache=cache)


def test_decoding_does_not_rebuild_the_rope_tables_every_step(monkeypatch):
    """Each step asks for one more position; the tables grow geometrically instead of being rebuilt
    one row longer per step in every layer (they were: 20 builds per layer for 20 tokens)."""
    import lowrank.nn.rotary as rotary
    built = []
    real = rotary.rope_tables
    monkeypatch.setattr(rotary, "rope_tables", lambda T, *a, **k: built.append(T) or real(T, *a, **k))
    model = tiny_llama(max_position_embeddings=64)
    ids = np.random.default_rng(0).integers(0, V, (2, 4))
    model.generate(ids, max_new_tokens=20)
    per_layer = len(built) / model.config.num_hidden_layers
    assert per_layer <= 4, built                       # 4 -> 8 -> 16 -> 32 positions, not 4, 5, 6, ..., 23


@pytest.mark.parametrize("lora", [False, True])
def test_a_cached_step_keeps_nothing_for_a_backward(lora):
    """A decode step below the head keeps no cache in any module: plain layers, and LoRA-wrapped ones (q_proj
    wrapped: q/k/v unstacked; gate_proj wrapped) through Module.forward_inference's default."""
    model = tiny_llama("float32")
    if lora:
        model = lr.get_lora_model(model, lr.LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    base = model.get_base_model() if lora else model
    ids, _ = ids_and_mask()
    cache = KVCache.for_model(base.config, 3, 12, "float32")
    model.forward(ids, kv_cache=cache)
    model.forward(ids[:, :1], kv_cache=cache)
    kept = [name for name, m in base.model.named_modules() if m._cache is not None]
    assert kept == []
