"""Causal multi-head self-attention with grouped-query attention (GQA) and RoPE, as Llama.

Letters: B batch, T tokens, d = hidden_size, H query heads, H_kv key/value heads, G = H/H_kv
queries per key/value head, h = head_dim. Query head i uses key/value head i // G
(transformers' ``repeat_kv``); here q is viewed as (B, H_kv, G, T, h) so k and v broadcast
over G instead of being copied, and "the gradient of a repeated head is the sum over its
group" is a sum over that G axis.

    q = rope(x W_qᵀ)  (B, H, T, h)      k = rope(x W_kᵀ), v = x W_vᵀ  (B, H_kv, T, h)
    S = q kᵀ / sqrt(h), −inf where key > query or attention_mask[key] = 0     (B, H, T, T)
        (and, with a sliding window W, where key <= query − W: the query at t sees keys in (t − W, t])
    P = softmax(S)  (in float32 or wider)       O = P v  (B, H, T, h)       y = O W_oᵀ (B, T, d)
    backward:  dP = dO vᵀ,  dv = Σ_G Pᵀ dO,  dS = P ⊙ (dP − rowsum(dP ⊙ P)),
               dq = dS k / sqrt(h),  dk = Σ_G dSᵀ q / sqrt(h),  then RoPE by −angle.

Qwen3 (``qk_norm``) normalizes each head of q and k over h before RoPE: q = rope(q_norm(x W_qᵀ)), and
likewise k (RMSNorm, weights (h,)); Qwen2 has biases on q/k/v_proj but not o_proj (``o_bias``).

The window is applied in S: the layer writes the dtype's lowest finite value where a key is W or more
positions back, so the kernel's e^(s − max) is exactly 0 there and its backward (dS = P ⊙ (...)) passes
no gradient there (a finite value, not −inf: the kernels' max would be −inf on a row of only such keys).
A real token always sees itself; a padding row whose window holds no token gets P = 0 as above.

RoPE, the softmax and the products, forward and backward, are kernels (``lowrank.kernels``: ``matmul``,
``rope_forward``, ``causal_softmax`` and their backwards; in numba_cpu one pass per row, the products GEMM
tasks on one thread pool with the loops).

A query row with no visible key (a left-padding position) gets P = 0, so its output is 0
(transformers' eager path spreads it uniformly over all keys instead, or gives NaN in a float64
model, whose float32 softmax sees −inf everywhere; no real token attends to such a row).

What the backward keeps, besides the projections' own caches (when trainable, q/k/v_proj share
one (B·T, d) input and o_proj keeps its (B·T, H·h) input; frozen ones keep nothing): rotated q (B, H, T, h),
rotated k and v (B, H_kv, T, h) and the RoPE tables (2, T, h), that is itemsize · (B·T·h·(H + 2·H_kv) + 2·T·h)
bytes (itemsize 8 in float64, 4 in float32), and the attention_mask it was given; with ``qk_norm``, q_norm and
k_norm also keep their inputs and 1/RMS, B·T·(H + H_kv)·(h + 1) more. P (B, H, T, T) is not kept: backward
recomputes it from q and k (one more product and softmax, as flash attention does), so nothing kept is O(T²).
Forward and backward take the queries in blocks of QUERY_BLOCK (64), each over the keys its queries can see (up
to its last query, and within the window): a block's S and P are (B, H, 64, ≤ T), so no temporary is bigger than
B·H·64·T, and about half of the T² scores (at T ≫ 64) are never computed. (tests/models/test_llama_memory.py
checks the kept figure against training.accounting's measured activations; B=3, T=6, H=4, H_kv=2, h=8: 1,248
floats.)

Inference with a KV cache (``forward_cached``, no backward): T_new new tokens at absolute positions
P0..P0+T_new−1 (P0 cached before them) get the same projections and RoPE; their k, v join the cache
(``nn.kv_cache``) and S = q kᵀ / sqrt(h) runs over all P0 + T_new keys (B, H, T_new, P0 + T_new), key j
visible to new query i when j <= P0 + i and j is not padding: one kernel call (``causal_attention``), S and P
never written out, unless a sliding window is shorter than the keys (then the parts, as in training). When
q, k and v come from one product over stacked weights, q and k are rotated in one RoPE call. Since RoPE makes
q·k depend on positions only through their difference, a left-padded row gives its unpadded outputs (up to
rounding).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .device import get_array_module
from .dispatch import kernels_for
from .layers import Dense, stacked_product
from .module import Module
from .norm import RMSNorm
from .rotary import RotaryEmbedding


def _sum_group(a):
    """(B, H_kv, G, T, h) -> (B, H_kv, T, h), the sum over G: a view when G = 1 (no GQA), not a copy."""
    return a[:, :, 0] if a.shape[2] == 1 else a.sum(axis=2)


QUERY_BLOCK = 64     # queries per block of training's attention (``LlamaAttention._blocks``)


class AttentionCache(NamedTuple):
    q: object          # (B, H_kv, G, T, h) rotated queries, already divided by sqrt(h)
    k: object          # (B, H_kv, T, h) rotated keys
    v: object          # (B, H_kv, T, h) values
    mask: object       # (B, T) attention_mask or None: P is recomputed from q, k and it in backward
    cos: object        # (T, h) RoPE tables
    sin: object        # (T, h)
    shape: tuple       # (B, T, d), to check dy


def _slide(S, window, past: int):
    """S (..., T, K) with the keys W or more positions behind each query (j <= past + i − W) set to the lowest
    finite value, in place; nothing to do while every key is within the window."""
    T, K = S.shape[-2:]
    if window is None or K <= window:
        return S
    xp = get_array_module(S)
    query = xp.arange(past, past + T)[:, None]                                 # (T, 1) absolute positions
    old = xp.arange(K)[None, :] <= query - window                              # (T, K), broadcast over S
    xp.copyto(S, S.dtype.type(np.finfo(S.dtype).min), where=old)
    return S


def _sees_a_token(P, key_mask, window, past: int):
    """P (B, H_kv, G, T, K) with the rows of queries whose window (past + i − W, past + i] holds no token
    (all padding) set to 0, in place."""
    T, K = P.shape[-2:]
    if window is None or key_mask is None or K <= window:
        return P
    xp = get_array_module(P)
    B = P.shape[0]
    before = xp.concatenate([xp.zeros((B, 1), np.int64), xp.cumsum(key_mask != 0, axis=1)], axis=1)  # (B, K + 1)
    end = xp.arange(past + 1, past + T + 1)                                     # (T,) one past each query's key
    sees = before[:, end] - before[:, xp.maximum(end - window, 0)] > 0           # (B, T) tokens in the window
    P *= sees[:, None, None, :, None]
    return P


class LlamaAttention(Module):
    """Causal self-attention with GQA; q/k/v/o projections are Dense layers LoRA can wrap by name."""

    backend = None         # the kernel backend of its products, RoPE and the softmax (None: the global setting; see nn.dispatch)

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 *, rope_theta: float = 10000.0, max_position_embeddings: int | None = None, bias: bool = False,
                 o_bias: bool | None = None, qk_norm: bool = False, rms_norm_eps: float = 1e-6,
                 sliding_window: int | None = None, rope_type: str = "default", rope_scaling: dict | None = None,
                 dtype="float32", seed=None):
        """``bias``: on q/k/v_proj, and on o_proj unless ``o_bias`` says otherwise; ``qk_norm``: Qwen3's
        q_norm/k_norm (eps ``rms_norm_eps``); ``sliding_window`` W: each query sees its last W keys."""
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"LlamaAttention: num_attention_heads ({num_heads}) must be a positive multiple of "
                             f"num_key_value_heads ({num_kv_heads})")
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim = head_dim
        self.scaling = head_dim ** -0.5
        rng = np.random.default_rng(seed)
        s = [int(v) for v in rng.integers(2**31, size=4)]
        self.q_proj = Dense(hidden_size, num_heads * head_dim, bias, dtype=dtype, seed=s[0])
        self.k_proj = Dense(hidden_size, num_kv_heads * head_dim, bias, dtype=dtype, seed=s[1])
        self.v_proj = Dense(hidden_size, num_kv_heads * head_dim, bias, dtype=dtype, seed=s[2])
        self.o_proj = Dense(num_heads * head_dim, hidden_size, bias if o_bias is None else o_bias, dtype=dtype,
                            seed=s[3])
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, rms_norm_eps, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, rms_norm_eps, dtype=dtype)
        self.qk_norm = qk_norm
        if sliding_window is not None and not sliding_window >= 1:
            raise ValueError(f"LlamaAttention: sliding_window must be >= 1 or None, got {sliding_window}")
        self.sliding_window = sliding_window
        self.rotary = RotaryEmbedding(head_dim, rope_theta, max_position_embeddings, rope_type, rope_scaling)

    def _check_mask(self, attention_mask, B, T):
        if attention_mask is None:
            return
        if tuple(getattr(attention_mask, "shape", ())) != (B, T):
            raise ValueError(f"{self.label}: attention_mask must have shape (B, T) = ({B}, {T}) like the input ids, "
                             f"got {tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
        xp = get_array_module(attention_mask)
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"{self.label}: attention_mask must hold 0 (padding) or 1 (token), "
                             f"got values {xp.unique(attention_mask)[:8].tolist()}")

    def projections(self, kern, x2, inference: bool = False):
        """x2 (N, d) -> q (N, H·h), k and v (N, H_kv·h); for ``inference`` (no backward) in one product when the
        three weights are stacked in memory (``stacked_product``)."""
        y = stacked_product(kern, x2, self, self.q_proj, self.k_proj, self.v_proj) if inference else None
        return self._split(x2, y, inference)

    def _split(self, x2, y, inference: bool):
        """q, k, v: the columns of y (N, (H + 2·H_kv)·h), one product's; each layer's own product when y is None
        (``forward_inference`` for ``inference``: nothing kept)."""
        if y is None and inference:
            return tuple(p.forward_inference(x2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if y is None:
            return self.q_proj.forward(x2), self.k_proj.forward(x2), self.v_proj.forward(x2)
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return y[:, :q], y[:, q:q + kv], y[:, q + kv:]

    def _qkv(self, kern, x, cos, sin, inference: bool = False):
        """x (B, T, d) -> rotated q / sqrt(h) (B, H_kv, G, T, h), rotated k (B, H_kv, T, h), v (B, H_kv, T, h)."""
        B, T, d = x.shape
        H, H_kv, G, h = self.num_heads, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        x2 = x.reshape(B * T, d)
        y = stacked_product(kern, x2, self, self.q_proj, self.k_proj, self.v_proj) if inference else None
        if y is not None and not self.qk_norm:          # q and k side by side in one product's y: one rotation
            qk = y[:, :(H + H_kv) * h].reshape(B, T, H + H_kv, h).transpose(0, 2, 1, 3)   # (B, H + H_kv, T, h)
            qk = kern.rope_forward(qk, cos, sin)
            q = qk[:, :H].reshape(B, H_kv, G, T, h)                            # (B, H_kv, G, T, h)
            q *= self.scaling                                                  # q / sqrt(h): on q, not on S
            v = y[:, (H + H_kv) * h:].reshape(B, T, H_kv, h).transpose(0, 2, 1, 3)   # (B, H_kv, T, h)
            return q, qk[:, H:], v
        q, k, v = self._split(x2, y, inference)                                # (B·T, ·) each
        q = q.reshape(B, T, H_kv, G, h)                                        # (B, T, H_kv, G, h)
        k = k.reshape(B, T, H_kv, h)                                           # (B, T, H_kv, h)
        if self.qk_norm:                                                       # each head over its h
            q, k = ((self.q_norm.forward_inference(q), self.k_norm.forward_inference(k)) if inference
                    else (self.q_norm.forward(q), self.k_norm.forward(k)))
        q = q.transpose(0, 2, 3, 1, 4)                                         # (B, H_kv, G, T, h)
        k = k.transpose(0, 2, 1, 3)                                            # (B, H_kv, T, h)
        v = v.reshape(B, T, H_kv, h).transpose(0, 2, 1, 3)                     # (B, H_kv, T, h)
        q = kern.rope_forward(q, cos, sin)
        q *= self.scaling                                                      # q / sqrt(h): on q, not on S
        return q, kern.rope_forward(k, cos, sin), v

    def forward(self, x, attention_mask=None):
        if not hasattr(x, "shape") or x.ndim != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{self.label} expects input of shape (B, T, {self.hidden_size}), "
                             f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        xp = get_array_module(x)
        B, T, d = x.shape
        H_kv, G, h = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        self._check_mask(attention_mask, B, T)
        kern = kernels_for(x, self.backend)
        cos, sin = self.rotary.tables(T, x.dtype, xp)                          # (T, h) each
        q, k, v = self._qkv(kern, x, cos, sin)                                 # (B, H_kv, [G,] T, h)
        O = xp.empty((B, T, H_kv, G, h), q.dtype)                             # (B, T, H_kv, G, h): o_proj's rows
        for r0, r1, k0 in self._blocks(T):                                     # queries r0.., the keys k0.. they see
            P = self._probabilities(kern, q[:, :, :, r0:r1], k[:, :, None, k0:r1], attention_mask, r0, r1, k0)
            O[:, r0:r1] = kern.matmul(P, v[:, :, None, k0:r1]).transpose(0, 3, 1, 2, 4)      # (B, b, H_kv, G, h)
        self._cache = AttentionCache(q, k, v, attention_mask, cos, sin, x.shape)   # q already scaled; no P
        return self.o_proj.forward(O.reshape(B * T, H_kv * G * h)).reshape(B, T, d)   # (B, T, d)

    def _blocks(self, T):
        """(r0, r1, k0) for each block of QUERY_BLOCK queries r0..r1−1: keys k0..r1−1 are all that its queries
        can see (causality, and the sliding window), so its products and softmax skip the others."""
        W = self.sliding_window
        for r0 in range(0, T, QUERY_BLOCK):
            yield r0, min(r0 + QUERY_BLOCK, T), 0 if W is None else max(0, r0 - W + 1)

    def _probabilities(self, kern, q, k, attention_mask, r0, r1, k0):
        """P = causal_softmax(q kᵀ) (B, H_kv, G, b, n) of one block (``_blocks``: q (B, H_kv, G, b, h) the queries
        r0..r1−1, k (B, H_kv, 1, n, h) the keys k0..r1−1), the window and the padding applied: forward's, and
        backward's again (recomputing it costs one product of the step's and a softmax; keeping it, the layer's
        largest activation, ~B·H·T²/2)."""
        mask = None if attention_mask is None else attention_mask[:, k0:r1]   # (B, n)
        S = kern.matmul(q, k.swapaxes(-1, -2))                                # (B, H_kv, G, b, n)
        P = kern.causal_softmax(_slide(S, self.sliding_window, r0 - k0), mask, r0 - k0)
        return _sees_a_token(P, mask, self.sliding_window, r0 - k0)

    def backward(self, dy):
        q, k, v, attention_mask, cos, sin, shape = self._need_cache()
        self._check_dy(dy, shape)
        self._cache = None
        B, T, d = shape
        H_kv, G, h = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        dO2 = self.o_proj.backward(dy.reshape(B * T, d))                       # (B·T, H·h)
        dO = dO2.reshape(B, T, H_kv, G, h).transpose(0, 2, 3, 1, 4)           # (B, H_kv, G, T, h)
        kern = kernels_for(dy, self.backend)
        xp = get_array_module(dy)
        dq, dk, dv = xp.empty(q.shape, q.dtype), xp.zeros(k.shape, k.dtype), xp.zeros(v.shape, v.dtype)
        for r0, r1, k0 in self._blocks(T):                                     # as forward's blocks
            qb, dOb = q[:, :, :, r0:r1], dO[:, :, :, r0:r1]                    # (B, H_kv, G, b, h)
            kb, vb = k[:, :, None, k0:r1], v[:, :, None, k0:r1]                # (B, H_kv, 1, n, h)
            P = self._probabilities(kern, qb, kb, attention_mask, r0, r1, k0)  # (B, H_kv, G, b, n), forward's
            dP = kern.matmul(dOb, vb.swapaxes(-1, -2))                         # (B, H_kv, G, b, n)
            dv[:, :, k0:r1] += _sum_group(kern.matmul(P.swapaxes(-1, -2), dOb))   # (B, H_kv, n, h), Σ over G
            dS = kern.causal_softmax_backward(dP, P)                           # P ⊙ (dP − rowsum(dP ⊙ P))
            dq[:, :, :, r0:r1] = kern.matmul(dS, kb)                           # (B, H_kv, G, b, h)
            dk[:, :, k0:r1] += _sum_group(kern.matmul(dS.swapaxes(-1, -2), qb))   # Σ over G (q scaled)
        dq *= self.scaling
        dq = kern.rope_backward(dq, cos, sin).transpose(0, 3, 1, 2, 4)         # (B, T, H_kv, G, h)
        dk = kern.rope_backward(dk, cos, sin).transpose(0, 2, 1, 3)            # (B, T, H_kv, h)
        if self.qk_norm:
            dq, dk = self.q_norm.backward(dq), self.k_norm.backward(dk)
        dx = self.q_proj.backward(dq.reshape(B * T, H_kv * G * h))            # (B·T, d)
        dx = dx + self.k_proj.backward(dk.reshape(B * T, H_kv * h))
        dx = dx + self.v_proj.backward(dv.transpose(0, 2, 1, 3).reshape(B * T, H_kv * h))
        return dx.reshape(B, T, d)

    def forward_cached(self, x, kv_cache, layer: int):
        """Inference only (no backward): x (B, T_new, d) at positions P0.., P0 = kv_cache.length, attends
        over the P0 cached keys and the new ones; layer's k, v are written into ``kv_cache`` (nn.kv_cache)."""
        xp = get_array_module(x)
        B, T, d = x.shape
        H_kv, G, h = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        P0 = kv_cache.length
        kern = kernels_for(x, self.backend)
        cos, sin = self.rotary.tables(P0 + T, x.dtype, xp)                     # (P0 + T, h) each
        cos, sin = cos[P0:], sin[P0:]                                          # (T, h): the new positions
        q, k, v = self._qkv(kern, x, cos, sin, inference=True)                 # (B, H_kv, [G,] T, h)
        k, v, mask = kv_cache.update(layer, k, v)                              # (B, H_kv, P0 + T, h), (B, P0 + T)
        if self.sliding_window is None or P0 + T <= self.sliding_window:      # every key within the window
            O = kern.causal_attention(q, *kv_cache.buffers(layer), P0)         # (B, H_kv, G, T, h)
        else:
            S = kern.matmul(q, k[:, :, None].swapaxes(-1, -2))                 # (B, H_kv, G, T, P0 + T)
            P = kern.causal_softmax(_slide(S, self.sliding_window, P0), mask, P0)   # (B, H_kv, G, T, P0 + T)
            O = kern.matmul(_sees_a_token(P, mask, self.sliding_window, P0), v[:, :, None])   # (B, H_kv, G, T, h)
        O2 = O.transpose(0, 3, 1, 2, 4).reshape(B * T, H_kv * G * h)           # (B·T, H·h)
        self._cache = None                                                     # nothing for a backward
        return self.o_proj.forward_inference(O2).reshape(B, T, d)              # (B, T, d)

    def extra_repr(self):
        window = "" if self.sliding_window is None else f", sliding_window={self.sliding_window}"
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}{window}")

