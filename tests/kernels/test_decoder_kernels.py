"""The decoder's elementwise kernels (RoPE, the causal softmax, inference's causal_attention, SwiGLU's gate,
RMSNorm) refuse bad input with errors that name it, on every CPU backend; the decoder's cached path (past > 0)
agrees across backends, and a decode step attends in one kernel call a layer."""
import numpy as np
import pytest

from unittest import mock

from lowrank.kernels import api, backends
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.nn import LlamaAttention, LlamaMLP, RMSNorm
from lowrank.nn.kv_cache import KVCache

BACKENDS = ("numpy", "numba")


def _rope_args(dtype=np.float32, T=3, h=4):
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, T, h)).astype(dtype), np.ones((T, h), dtype), np.zeros((T, h), dtype)


def _attention_args(q=(1, 2, 3, 2, 4), k=(1, 2, 3, 4), v=None, dtype_k=np.float32):
    """q (B, H_kv, G, T, h), k and v (B, H_kv, K, h), no mask, past = K − T = 1: the shapes the cases bend."""
    return (np.zeros(q, np.float32), np.zeros(k, dtype_k), np.zeros(k if v is None else v, np.float32), None, 1)


CASES = {
    "odd head_dim": (lambda k: k.rope_forward(*_rope_args(h=3)), ValueError, r"head_dim\) must be even, got 3"),
    "1-D x": (lambda k: k.rope_backward(np.ones(4, np.float32), *_rope_args()[1:]), ValueError,
              r"x must be \(\.\.\., T, head_dim\), got shape \(4,\)"),
    "short tables": (lambda k: k.rope_forward(_rope_args()[0], *_rope_args(T=2)[1:]), ValueError,
                     r"cos has shape \(2, 4\), expected \(3, 4\)"),
    "table dtype": (lambda k: k.rope_forward(_rope_args()[0], *_rope_args(np.float64)[1:]), TypeError,
                    r"cos has dtype float64, expected float32"),
    "2-D scores": (lambda k: k.causal_softmax(np.zeros((3, 3), np.float32)), ValueError,
                   r"S must be \(B, \.\.\., T, K\) with at least 3 axes, got shape \(3, 3\)"),
    "past not K - T": (lambda k: k.causal_softmax(np.zeros((1, 2, 3), np.float32), None, 0), ValueError,
                       r"past \+ T = K \(S has T=2 queries, K=3 keys\), got 0"),
    "negative past": (lambda k: k.causal_softmax(np.zeros((1, 2, 1), np.float32), None, -1), ValueError,
                      r"past must be an int >= 0"),
    "key_mask shape": (lambda k: k.causal_softmax(np.zeros((2, 2, 3), np.float32), np.ones((2, 2)), 1), ValueError,
                       r"key_mask has shape \(2, 2\), expected \(2, 3\)"),
    "integer scores": (lambda k: k.causal_softmax(np.zeros((1, 2, 2), np.int64)), TypeError,
                       r"S must be a float16/32/64 array, got dtype int64"),
    "dP shape": (lambda k: k.causal_softmax_backward(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 2), np.float32)),
                 ValueError, r"dP has shape \(1, 2, 3\), expected \(1, 2, 2\)"),
    "dP dtype": (lambda k: k.causal_softmax_backward(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), np.float32)),
                 TypeError, r"dP has dtype float64, expected float32"),
    "4-D q": (lambda k: k.causal_attention(*_attention_args(q=(1, 2, 3, 4))), ValueError,
              r"q must be \(B, H_kv, G, T, head_dim\), got shape \(1, 2, 3, 4\)"),
    "k heads": (lambda k: k.causal_attention(*_attention_args(k=(1, 3, 3, 4))), ValueError,
                r"k has shape \(1, 3, 3, 4\), expected \(1, 2, 3, 4\)"),
    "v unlike k": (lambda k: k.causal_attention(*_attention_args(v=(1, 2, 2, 4))), ValueError,
                   r"v has shape \(1, 2, 2, 4\), expected \(1, 2, 3, 4\)"),
    "attention past": (lambda k: k.causal_attention(*_attention_args()[:4], 2), ValueError,
                       r"past \+ T <= K \(q has T=2 queries, k has K=3 keys\), got 2"),
    "attention mask": (lambda k: k.causal_attention(*_attention_args()[:3], np.ones((1, 2)), 1), ValueError,
                       r"key_mask has shape \(1, 2\), expected \(1, 3\)"),
    "attention dtypes": (lambda k: k.causal_attention(*_attention_args(dtype_k=np.float64)), TypeError,
                         r"k has dtype float64, expected float32"),
    "gate and up shapes": (lambda k: k.silu_and_mul(np.zeros((2, 3)), np.zeros((3, 2))), ValueError,
                           r"u has shape \(3, 2\), expected \(2, 3\)"),
    "0-d gate": (lambda k: k.silu_and_mul_backward(np.zeros(()), np.zeros(()), np.zeros(())), ValueError,
                 r"g must be \(\.\.\., I\) with at least one axis"),
    "norm weight width": (lambda k: k.rms_norm(np.zeros((2, 4)), np.ones(3), 1e-6), ValueError,
                          r"weight has shape \(3,\), expected \(4,\)"),
    "norm rstd dtype": (lambda k: k.rms_norm_backward(np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float32),
                                                      np.ones(4, np.float32), np.ones((2, 1), np.float16)),
                        TypeError, r"rstd has dtype float16, expected float32"),
    "norm rstd shape": (lambda k: k.rms_norm_backward(np.zeros((2, 4)), np.zeros((2, 4)), np.ones(4), np.ones(2)),
                        ValueError, r"rstd has shape \(2,\), expected \(2, 1\)"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_a_clear_error(backend, case):
    call, error, match = CASES[case]
    with pytest.raises(error, match=match):
        call(backends.load(backend))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cached_decoding_agrees_across_backends(dtype):
    """Prefill then one-token steps with left padding: the attention kernels see past > 0 and a key mask;
    with every elementwise kernel on the reference or on Numba, the same tokens and logits to rounding."""
    config = LlamaConfig(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config, dtype=dtype, seed=3)
    ids = np.random.default_rng(1).integers(0, 31, (3, 5))
    mask = np.ones((3, 5), np.int64)
    mask[1, :2] = 0                                                      # a left-padded row
    kernel_layers = [m for _, m in model.named_modules() if isinstance(m, (LlamaAttention, LlamaMLP, RMSNorm))]
    assert len(kernel_layers) == 2 * 4 + 1                          # per layer: attention, MLP, 2 norms; the final norm
    out = {}
    for backend in BACKENDS:
        for m in kernel_layers:
            m.backend = backend
        out[backend] = model.generate(ids, max_new_tokens=6, attention_mask=mask), model.forward(ids, mask)
    np.testing.assert_array_equal(out["numpy"][0], out["numba"][0])
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(out["numpy"][1], out["numba"][1], rtol=tol, atol=tol)


@pytest.mark.parametrize("window", [None, 3])
def test_a_decode_step_attends_in_one_kernel_call_a_layer(window):
    """Cached steps take causal_attention (no S or P written out) and rotate q and k of the stacked product in one
    call; a sliding window shorter than the keys takes the parts (its masking lives in the layer) with the same
    numbers as the uncached forward."""
    config = LlamaConfig(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         sliding_window=window, model_type="llama" if window is None else "mistral")
    model = LlamaForCausalLM(config, seed=3)
    ids = np.random.default_rng(1).integers(0, 31, (2, 6))
    kern = backends.load("numba")
    cache = KVCache.for_model(config, 2, 9)                    # room past the step: a buffer, not a view
    model.forward(ids[:, :5], kv_cache=cache)
    with mock.patch.object(kern, "causal_attention", wraps=kern.causal_attention) as attend, \
            mock.patch.object(kern, "causal_softmax", wraps=kern.causal_softmax) as softmax, \
            mock.patch.object(kern, "rope_forward", wraps=kern.rope_forward) as rope:
        step = model.forward(ids[:, 5:], kv_cache=cache)[:, -1]
    assert (attend.call_count, softmax.call_count) == ((2, 0) if window is None else (0, 2))
    assert rope.call_count == 2                                           # q and k together, once a layer
    for call in attend.call_args_list:                                    # the cache's buffers, read in place
        assert all(a.flags.c_contiguous and np.shares_memory(a, buf) for a, buf in zip(call.args[1:3],
                                                                                          (cache.k, cache.v)))
    np.testing.assert_allclose(step, model.forward(ids)[:, -1], rtol=1e-5, atol=1e-5)
