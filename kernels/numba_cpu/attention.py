"""Numba CPU attention kernels: ``reference/attention.py``'s RoPE and causal softmax (the semantics are there).

NumPy spends five to seven whole-array passes, each with a fresh (B, H, T, K) temporary, on what
a loop does in one pass per row; and a loop knows the causal structure, so it touches only the
keys a query sees (about half of a T × T block). ``python -m benchmarks.elementwise`` times each
against the reference.

The softmax forward is one loop per row: the max, then e^(s − max) and its sum in one pass (``vexp.exp``,
which vectorizes; Numba's own exp is a scalar libm call), then the division. Both RoPE's input
layouts LLVM can vectorize are read in place: C-ordered rows, and the head-major view of a
(B, T, heads, h) projection (``_rows``); anything else is copied to C order first (a strided row
vectorizes as gathers). Outputs are C-ordered.

Inference's attention (``causal_attention``) is one loop per query position as well, the G query heads of a
key/value head together (each k_j and v_j read once for them): their scores q·k_j over the keys it sees,
e^(s − max) and their sum, then Σ e_j v_j / Σ e_j, so neither S nor P is written out and a decode step's
attention is one call, not two products and a softmax (each a call with its checks).
"""
import math

import numpy as np
from numba import prange

from .. import config, validate
from . import blas, pool
from .blas import c, half_to_reference
from .vexp import exp

_JIT = dict(cache=True, fastmath=config.NUMBA_FASTMATH, error_model=config.NUMBA_ERROR_MODEL)


def _blocks(a):
    """a (..., T, X) as a 4-D (A, M, T, X): a view when the middle axes merge (a head-major view of a
    (B, T, H, h) projection does), otherwise NumPy's copy."""
    if a.ndim == 2:
        return a[None, None]
    return a.reshape(a.shape[0], math.prod(a.shape[1:-2]), a.shape[-2], a.shape[-1])


# -- the products -----------------------------------------------------------------------------
@half_to_reference
def matmul(a, b):
    """Products on the pool, a (batch) matrix or a block of rows of one each (``blas.matmul``)."""
    validate.matmul(a, b)
    return blas.matmul(a, b)


# -- rotary position embedding ----------------------------------------------------------------
@pool.jit(**_JIT)
def _rotate(x, token_major, c, s, sign, y):
    """y1 = x1 c − sign·x2 s, y2 = x2 c + sign·x1 s per (a, m, t); y (A, M, T, h), c, s (T, h/2);
    x (A, M, T, h), or (A, T, M, h) when ``token_major``. Both C-ordered: rows LLVM vectorizes."""
    A, M, T, h = y.shape
    half = h // 2
    for a in prange(A):
        for m in range(M):
            for t in range(T):
                xi = x[a, t, m] if token_major else x[a, m, t]
                yi, ct, st = y[a, m, t], c[t], s[t]
                for j in range(half):
                    x1, x2 = xi[j], xi[j + half]
                    yi[j] = x1 * ct[j] - sign * (x2 * st[j])
                    yi[j + half] = x2 * ct[j] + sign * (x1 * st[j])


def _rows(x):
    """x (..., T, h) as a C-ordered 4-D view and whether it is token-major: (A, M, T, h), or (A, T, M, h)
    when x is the head-major view of a C-ordered (A, T, heads.., h) array (attention's view of a
    projection's output); otherwise a C-ordered copy. Loops over strided rows vectorize as gathers."""
    if x.ndim >= 4 and not x.flags.c_contiguous:
        t = x.transpose(0, x.ndim - 2, *range(1, x.ndim - 2), x.ndim - 1)   # (A, T, heads.., h)
        if t.flags.c_contiguous:
            return t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1]), True
    return _blocks(c(x)), False


def _rope(x, cos, sin, sign):
    validate.rope(x, cos, sin)
    half = x.shape[-1] // 2
    y = np.empty(x.shape, x.dtype)
    rows, token_major = _rows(x)
    _rotate(rows, token_major, c(cos[:, :half]), c(sin[:, :half]), x.dtype.type(sign), _blocks(y))
    return y


@half_to_reference
def rope_forward(x, cos, sin):
    """One loop over (..., T) rows: both halves of a row from one read of it."""
    return _rope(x, cos, sin, +1)


@half_to_reference
def rope_backward(dy, cos, sin):
    """The same loop with the sign of sin flipped."""
    return _rope(dy, cos, sin, -1)


# -- causal softmax ---------------------------------------------------------------------------
@pool.jit(**_JIT)
def _softmax(S, key_mask, past, zero, ninf, P):
    """Per row i: the max over the keys it sees (j <= past + i, and key_mask[b, j] when given), then
    e = exp(s − max) and its sum in one loop, then e / sum; 0 on the keys it does not see and on a
    row that sees none. ``zero`` and ``ninf`` (−inf) in S's dtype keep float32 arithmetic float32."""
    B, M, T, K = S.shape
    masked = key_mask.shape[0] > 0
    for b in prange(B):
        for m in range(M):
            for i in range(T):
                sees = min(past + i + 1, K)                    # keys 0 .. past + i, before the padding mask
                s, p = S[b, m, i], P[b, m, i]
                z = zero
                if not masked:
                    top = s[0]
                    for j in range(1, sees):
                        top = max(top, s[j])
                    for j in range(sees):
                        e = exp(s[j] - top)
                        p[j] = e
                        z += e
                else:
                    top, seen = s[0], False
                    for j in range(sees):
                        if key_mask[b, j] and (not seen or s[j] > top):
                            top, seen = s[j], True
                    for j in range(sees):
                        e = exp(s[j] - top if key_mask[b, j] else ninf)   # a select; exp(−inf) = 0
                        p[j] = e
                        z += e
                if z > 0:                                      # 0: the row sees no key
                    for j in range(sees):
                        p[j] /= z
                p[sees:] = zero                                # (a loop here vectorized as a scatter)


@pool.jit(**_JIT)
def _softmax_grad(dP, P, dS):
    """dS = P (dP − Σ dP P) per row, one read of each input."""
    B, M, T, K = P.shape
    for b in prange(B):
        for m in range(M):
            for i in range(T):
                g, p, o = dP[b, m, i], P[b, m, i], dS[b, m, i]
                dot = g[0] * 0
                for j in range(K):
                    dot += g[j] * p[j]
                for j in range(K):
                    o[j] = p[j] * (g[j] - dot)


@half_to_reference
def causal_softmax(S, key_mask=None, past=0):
    """One loop per row over the keys it sees: max, exp and sum, normalize (``vexp.exp``, vectorized)."""
    B, T, K = validate.causal_softmax(S, key_mask, past)
    mask = np.zeros((0, 0), np.bool_) if key_mask is None else c(np.asarray(key_mask) != 0)
    P = np.empty(S.shape, S.dtype)
    t = S.dtype.type
    _softmax(_blocks(S), mask, past, t(0), t(-np.inf), _blocks(P))
    return P


@half_to_reference
def causal_softmax_backward(dP, P):
    """One loop: the row's dot product dP·P, then dS in the same pass over the row."""
    validate.softmax_grad(dP, P)
    dS = np.empty(P.shape, P.dtype)
    _softmax_grad(_blocks(dP), _blocks(P), _blocks(dS))
    return dS


# -- attention, inference ---------------------------------------------------------------------
@pool.jit(**_JIT)
def _attend(k, q, v, key_mask, past, zero, ninf, O):
    """Per query position (b, m, i), for the G query heads of key/value head m together: s_gj = q_g·k_j over the
    keys it sees (j <= past + i, key_mask[b, j] when given), e_gj = exp(s_gj − max_g), then O_g = Σ_j e_gj v_j /
    Σ_j e_gj; 0 on a row that sees none. Each k_j and v_j is read once for the G heads. k comes first: pool.jit
    sizes the work by its first array (a decode step's q is a few rows; its keys are the work)."""
    B, M, G, T, h = q.shape
    masked = key_mask.shape[0] > 0
    for bm in prange(B * M):
        b, m = bm // M, bm % M
        s = np.empty((G, k.shape[2]), q.dtype)
        top = np.empty(G, q.dtype)
        for i in range(T):
            sees = min(past + i + 1, k.shape[2])
            top[:] = ninf
            seen = False
            for j in range(sees):
                if masked and not key_mask[b, j]:
                    s[:, j] = ninf
                    continue
                kj, seen = k[b, m, j], True
                for g in range(G):
                    qg, dot = q[b, m, g, i], zero
                    for e in range(h):
                        dot += qg[e] * kj[e]
                    s[g, j] = dot
                    top[g] = max(top[g], dot)
            O[b, m, :, i] = zero
            if not seen:
                continue
            for g in range(G):
                z = zero
                for j in range(sees):
                    s[g, j] = exp(s[g, j] - top[g])                # exp(−inf) = 0: a hidden key adds nothing
                    z += s[g, j]
                top[g] = 1 / z                                     # top now holds 1 / Σ_j e_gj
            for j in range(sees):
                vj = v[b, m, j]
                for g in range(G):
                    w, o = s[g, j] * top[g], O[b, m, g, i]
                    for e in range(h):
                        o[e] += w * vj[e]


@half_to_reference
def causal_attention(q, k, v, key_mask=None, past=0):
    """One loop per query position, its G heads together: scores, softmax and the sum over v without writing S
    or P (module docstring); a C-ordered k and v with keys beyond past + T (a KV cache's buffer) are read in
    place, those keys never."""
    validate.causal_attention(q, k, v, key_mask, past)
    mask = np.zeros((0, 0), np.bool_) if key_mask is None else c(np.asarray(key_mask) != 0)
    O = np.empty(q.shape, q.dtype)
    t = q.dtype.type
    _attend(c(k), c(q), c(v), mask, past, t(0), t(-np.inf), O)
    return O
