"""NumPy reference attention kernels: causal self-attention's parts, forward and backward: RoPE, the
causal softmax, and the batched products around it (q kᵀ, P v and their gradients, ``matmul``).

Letters: B batch, T queries (new positions), K = past + T keys (past = positions already cached),
h = head_dim (even); "..." any axes between (heads, the query group of GQA).

    RoPE      y = x cos + rotate_half(x) sin,  rotate_half(x) = concat(−x2, x1) for x = concat(x1, x2),
              cos and sin (T, h) with equal halves (transformers' tables repeat the h/2 frequencies),
              so each pair (j, j + h/2) turns by +angle:  y1 = x1 c − x2 s,  y2 = x2 c + x1 s.
              Backward: the rotation by −angle (rotate_half is skew: Rᵀ = −R).
    softmax   query i sits at position past + i and sees key j when j <= past + i and key_mask[b, j];
              P = softmax of S over the keys it sees, 0 on the others and on a row that sees none.
              Backward: dS = P ⊙ (dP − rowsum(dP ⊙ P)).
    attention O = P v with P = softmax(q kᵀ) as above, the G query heads of a key/value head sharing its
              k and v (GQA): inference's whole attention in one call. No backward: training takes the
              parts (and recomputes P in its backward).
"""
import numpy as np

from .. import validate
from ..common import xp as array_module


# -- the products -----------------------------------------------------------------------------
def matmul(a, b):
    """Semantics: y = a @ b, NumPy's matmul over broadcast batch axes; a (..., M, K), b (..., K, N) -> (..., M, N)."""
    validate.matmul(a, b)
    return a @ b


# -- rotary position embedding ----------------------------------------------------------------
def rope_forward(x, cos, sin):
    """Semantics: y = x ⊙ cos + rotate_half(x) ⊙ sin over the last axis; x (..., T, h), cos, sin (T, h) -> y like x."""
    validate.rope(x, cos, sin)
    return _rotate(x, cos, sin, +1)


def rope_backward(dy, cos, sin):
    """Semantics: dx = dy ⊙ cos − rotate_half(dy) ⊙ sin (RoPE's transpose); dy (..., T, h) -> dx like dy."""
    validate.rope(dy, cos, sin)
    return _rotate(dy, cos, sin, -1)


def _rotate(x, cos, sin, sign: int):
    """x cos + sign · rotate_half(x) sin on the halves, without building rotate_half(x):
    c, s = cos[:, :h/2], sin[:, :h/2];  y1 = x1 c − sign · x2 s,  y2 = x2 c + sign · x1 s."""
    xp = array_module(x)
    half = x.shape[-1] // 2
    c, s = cos[:, :half], sin[:, :half]                                         # (T, h/2)
    x1, x2 = x[..., :half], x[..., half:]                                       # (..., T, h/2)
    y = xp.empty(x.shape, x.dtype)
    if sign > 0:
        xp.subtract(x1 * c, x2 * s, out=y[..., :half])
        xp.add(x2 * c, x1 * s, out=y[..., half:])
    else:
        xp.add(x1 * c, x2 * s, out=y[..., :half])
        xp.subtract(x2 * c, x1 * s, out=y[..., half:])
    return y


# -- causal softmax ---------------------------------------------------------------------------
def causal_softmax(S, key_mask=None, past=0):
    """Semantics: P = softmax of S (B, ..., T, K) over the keys each query sees (key j, query i: j <= past + i
    and key_mask[b, j] != 0; key_mask (B, K) or None), 0 elsewhere and on a row that sees none; in float32 or wider."""
    B, T, K = validate.causal_softmax(S, key_mask, past)
    xp = array_module(S)
    if K == 0:                                                                 # no keys (and no queries)
        return xp.zeros(S.shape, S.dtype)
    wide = np.promote_types(np.float32, S.dtype)
    visible = xp.tril(xp.ones((T, K), dtype=bool), k=past)                     # (T, K) causal
    if key_mask is not None:
        visible = visible & (key_mask != 0).reshape((B,) + (1,) * (S.ndim - 2) + (K,))   # (B, 1.., T, K)
    E = S + xp.where(visible, 0, -xp.inf).astype(wide)                         # a new array: 0 / −inf added
    m = E.max(axis=-1, keepdims=True)
    E -= xp.where(xp.isfinite(m), m, 0)                                        # rows that see none: m = −inf -> 0
    xp.exp(E, out=E)                                                           # exp(−inf) = 0
    Z = E.sum(axis=-1, keepdims=True)
    E /= xp.where(Z > 0, Z, 1)
    return E.astype(S.dtype, copy=False)


def causal_softmax_backward(dP, P):
    """Semantics: dS = P ⊙ (dP − rowsum(dP ⊙ P)) over the last axis; dP, P (B, ..., T, K) -> dS like P."""
    validate.softmax_grad(dP, P)
    dS = dP - (dP * P).sum(axis=-1, keepdims=True)
    dS *= P
    return dS


# -- attention, inference ---------------------------------------------------------------------
def causal_attention(q, k, v, key_mask=None, past=0):
    """Semantics: O = causal_softmax(q kᵀ, key_mask, past) v, the G query heads of each key/value head sharing its
    k and v; q (B, H_kv, G, T, h), k, v (B, H_kv, K, h) -> O (B, H_kv, G, T, h). Keys from past + T on are
    never seen (query i sees j <= past + i), so K may exceed past + T: a KV cache passes its whole buffer."""
    validate.causal_attention(q, k, v, key_mask, past)
    n = past + q.shape[3]                                                      # the keys a query can see
    k, v, key_mask = k[:, :, :n], v[:, :, :n], None if key_mask is None else key_mask[:, :n]
    S = matmul(q, k[:, :, None].swapaxes(-1, -2))                              # (B, H_kv, G, T, K)
    return matmul(causal_softmax(S, key_mask, past), v[:, :, None])            # (B, H_kv, G, T, h)
