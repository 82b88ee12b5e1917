"""GGUFDense: a frozen base held in llama.cpp's GGUF blocks, against a float64 Dense holding gguf's own
dequantized weight (finite differences for dx and db), its memory (the blocks, at their size), its
errors, and LoRA over it (QLoRA on GGUF blocks)."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank as lr
from lowrank.nn.gguf_dense import GGUFDense, GGUFEmbedding
from lowrank.nn.gradcheck import gradcheck

TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K]


def gguf_layer(qtype, D_in, D_out, seed, dtype="float64", backend=None):
    """A GGUFDense over gguf-quantized random weights (Q4_K: random blocks with small finite d, dmin)."""
    rng = np.random.default_rng(seed)
    if qtype == Q.Q4_K:
        blocks = rng.integers(0, 256, (D_out * D_in // 256, 144), dtype=np.uint8)
        blocks[:, :4] = rng.uniform(-0.002, 0.002, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
        blocks = blocks.reshape(D_out, -1)
    else:
        blocks = quants.quantize(rng.standard_normal((D_out, D_in)).astype(np.float32), qtype)
    return GGUFDense(blocks, qtype, (D_out, D_in), rng.standard_normal(D_out).astype(dtype), dtype=dtype,
                     backend=backend)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@given(N=st.integers(1, 4), D_out=st.integers(1, 6), seed=st.integers(0, 2**16),
       backend=st.sampled_from(["numpy", "numba"]))
@settings(max_examples=10, deadline=None)
def test_ggufdense_gradients_match_finite_differences_of_the_dequantized_layer(qtype, N, D_out, seed, backend):
    D_in = gguf.GGML_QUANT_SIZES[qtype][0]
    layer = gguf_layer(qtype, D_in, D_out, seed, backend=backend)
    W = quants.dequantize(layer.weight_blocks.data, qtype).astype(np.float64)      # gguf's own weights
    reference = lr.Dense(D_in, D_out, dtype="float64")
    reference.weight.data[...] = W
    reference.bias.data[...] = layer.bias.data
    x = np.random.default_rng(seed + 1).standard_normal((N, D_in))

    def backward(g):
        layer.zero_grad()
        layer.forward(x)
        return {"x": layer.backward(g), "b": layer.bias.grad}

    gradcheck(lambda: reference.forward(x), backward, {"x": x, "b": reference.bias.data}, seed=seed, rtol=1e-6)
    np.testing.assert_allclose(layer.forward(x), x @ W.T + layer.bias.data, rtol=1e-12, atol=1e-12 * np.abs(W).sum())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_the_frozen_base_is_its_gguf_blocks_at_their_size(qtype):
    """What the layer holds for W is the GGUF tensor's bytes (no float copy, no re-quantization)."""
    layer = gguf_layer(qtype, 512, 64, 0, dtype="float32")
    B, S = gguf.GGML_QUANT_SIZES[qtype]
    gguf_bytes = 64 * 512 // B * S
    held = sum(p.data.nbytes for n, p in layer.named_parameters() if n.startswith("weight_"))
    assert held == gguf_bytes
    assert layer.num_parameters() == 64 * 512 + 64                 # logical weights, plus the bias
    x = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
    layer(x)
    assert layer._cache._fields == ("rows",)                       # x is not kept: no dW
    layer.backward(np.ones((3, 64), np.float32))
    assert layer.weight_blocks.grad is None and not layer.weight_blocks.trainable


def test_lora_over_ggufdense_gets_the_lora_gradients_of_the_float_layer():
    """LoraLinear(GGUFDense) and LoraLinear(Dense holding gguf's weights): the same output and LoRA gradients,
    and only the adapter gets them."""
    base = gguf_layer(Q.Q4_0, 64, 8, 0)
    layers = [lr.LoraLinear(b, r=2, lora_alpha=4, seed=3) for b in (base, base.dequantized())]
    rng = np.random.default_rng(1)
    for lora in layers:
        lora.lora_B["default"].data = np.random.default_rng(7).standard_normal(lora.lora_B["default"].shape)
    x, dy = rng.standard_normal((5, 64)), rng.standard_normal((5, 8))
    ys = [lora(x) for lora in layers]
    dxs = [lora.backward(dy) for lora in layers]
    np.testing.assert_allclose(ys[0], ys[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dxs[0], dxs[1], rtol=1e-12, atol=1e-12)
    grads = [{n: p.grad for n, p in lora.named_parameters() if p.grad is not None} for lora in layers]
    assert sorted(grads[0]) == ["base_layer.bias", "lora_A.default.weight", "lora_B.default.weight"] or \
        all(n.startswith("lora_") or n.endswith("bias") for n in grads[0])
    for name in grads[0]:
        np.testing.assert_allclose(grads[0][name], grads[1][name], rtol=1e-12, atol=1e-12)


def test_bad_blocks_are_named():
    blocks = quants.quantize(np.ones((2, 32), np.float32), Q.Q4_0)
    with pytest.raises(ValueError, match=r"GGUFDense: GGUF: Q4_0 blocks must be uint8 of shape \(2, 36\)"):
        GGUFDense(blocks, "Q4_0", (2, 64))
    with pytest.raises(ValueError, match=r"GGUFDense: bias must be float32 of shape \(2,\)"):
        GGUFDense(blocks, "Q4_0", (2, 32), np.zeros(3, np.float32))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K], ids=lambda q: q.name)
def test_ggufembedding_looks_up_ggufs_rows_and_a_tied_head_shares_its_blocks(qtype):
    """y[b, t] = gguf's dequantized row ids[b, t]; frozen (backward returns None, no gradient); GGUFDense.tied
    multiplies by the same blocks without listing them again."""
    rng = np.random.default_rng(0)
    V, d = 7, 256
    if qtype == Q.Q6_K:
        blocks = rng.integers(0, 256, (V, 210), dtype=np.uint8)
        blocks[:, 208:] = rng.uniform(-0.001, 0.001, (V, 1)).astype(np.float16).view(np.uint8)
    else:
        blocks = quants.quantize(rng.standard_normal((V, d)).astype(np.float32), qtype)
    W = quants.dequantize(blocks, qtype)                                        # (V, d) float32, gguf's values
    emb = GGUFEmbedding(blocks, qtype, (V, d))
    ids = np.array([[3, 0, 6], [3, 3, 1]])
    y = emb(ids)
    assert y.dtype == np.float32 and np.array_equal(y, W[ids])
    assert emb.backward(np.ones_like(y)) is None and emb.weight_blocks.grad is None
    assert emb(np.zeros((0, 4), np.int64)).shape == (0, 4, d)
    with pytest.raises(ValueError, match=r"GGUFEmbedding '<root>': token ids must lie in \[0, 7\)"):
        emb(np.array([[7]]))
    head = GGUFDense.tied(emb)
    assert head.weight_blocks is emb.weight_blocks and not list(head.named_parameters())
    h = rng.standard_normal((4, d)).astype(np.float32)
    np.testing.assert_allclose(head(h), h @ W.T, rtol=1e-5, atol=1e-5 * np.abs(W).sum(axis=1).max())


def test_a_layer_over_ggufembedding_matches_finite_differences_and_the_lookup_passes_nothing_back():
    """ids -> GGUFEmbedding (frozen Q8_0 rows) -> Dense: the Dense's dW, db match central differences through the
    lookup, and the lookup's backward returns None (token ids have no gradient) and touches no Parameter."""
    rng = np.random.default_rng(1)
    V, d, D_out = 5, 32, 3
    blocks = quants.quantize(rng.standard_normal((V, d)).astype(np.float32), Q.Q8_0)
    emb = GGUFEmbedding(blocks, Q.Q8_0, (V, d), dtype="float64")
    dense = lr.Dense(d, D_out, dtype="float64", seed=2)
    ids = np.array([[4, 0, 4], [1, 2, 3]])

    def forward():
        return dense.forward(emb.forward(ids).reshape(-1, d))                    # (B·T, D_out)

    def backward(g):
        dense.zero_grad()
        forward()
        assert emb.backward(dense.backward(g).reshape(2, 3, d)) is None and emb.weight_blocks.grad is None
        return {"W": dense.weight.grad, "b": dense.bias.grad}

    gradcheck(forward, backward, {"W": dense.weight.data, "b": dense.bias.data}, seed=3)
