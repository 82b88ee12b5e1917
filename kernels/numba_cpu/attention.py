"""Numba CPU attention kernels: ``reference/attention.py``'s RoPE and causal softmax (the semantics are there).

NumPy spends five to seven whole-array passes, each with a fresh (B, H, T, K) temporary, on what
a loop does in one pass per row; and a loop knows the causal structure, so it touches only the
keys a query sees (about half of a T × T block). ``python -m benchmarks.elementwise --threads 1``
(B = 8, 8 heads, T = 128, h = 32, float32, medians of interleaved rounds), reference -> here:
RoPE 0.75 -> 0.28 ms, the softmax forward 2.21 -> 1.41 ms, its backward 0.91 -> 0.36 ms.

The forward is three passes, not one: Numba's ``exp`` is libm's scalar one here (no SVML), about
five times slower than NumPy's vectorized exp, so a loop shifts each row by its max (−inf on the
keys it does not see), NumPy exponentiates the whole array in place, and a loop divides by the
row sums. Inputs of any layout: the loops index strided arrays; outputs are C-ordered.
"""
import numpy as np
from numba import njit, prange

from .. import config, validate
from .blas import c, half_to_reference

_JIT = dict(cache=True, fastmath=config.NUMBA_FASTMATH, parallel=config.NUMBA_PARALLEL,
            error_model=config.NUMBA_ERROR_MODEL)


def _blocks(a):
    """a (..., T, X) as a 4-D (A, M, T, X): a view when the middle axes merge (a head-major view of a
    (B, T, H, h) projection does), otherwise NumPy's copy."""
    if a.ndim == 2:
        return a[None, None]
    return a.reshape(a.shape[0], int(np.prod(a.shape[1:-2])), a.shape[-2], a.shape[-1])


# -- rotary position embedding ----------------------------------------------------------------
@njit(**_JIT)
def _rotate(x, c, s, sign, y):
    """y1 = x1 c − sign·x2 s, y2 = x2 c + sign·x1 s per (a, m, t); x, y (A, M, T, h), c, s (T, h/2)."""
    A, M, T, h = x.shape
    half = h // 2
    for a in prange(A):
        for m in range(M):
            for t in range(T):
                xi, yi, ct, st = x[a, m, t], y[a, m, t], c[t], s[t]
                for j in range(half):
                    x1, x2 = xi[j], xi[j + half]
                    yi[j] = x1 * ct[j] - sign * (x2 * st[j])
                    yi[j + half] = x2 * ct[j] + sign * (x1 * st[j])


def _rope(x, cos, sin, sign):
    validate.rope(x, cos, sin)
    half = x.shape[-1] // 2
    y = np.empty(x.shape, x.dtype)
    _rotate(_blocks(x), c(cos[:, :half]), c(sin[:, :half]), x.dtype.type(sign), _blocks(y))
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
@njit(**_JIT)
def _shift(S, key_mask, past, E):
    """E = S − (the max over the keys row i sees) on those keys, −inf on the rest (all of a row that sees none)."""
    B, M, T, K = S.shape
    masked = key_mask.shape[0] > 0
    for b in prange(B):
        for m in range(M):
            for i in range(T):
                sees = min(past + i + 1, K)                    # keys 0 .. past + i, before the padding mask
                s, e = S[b, m, i], E[b, m, i]
                if not masked:
                    top = s[0]
                    for j in range(1, sees):
                        top = max(top, s[j])
                    for j in range(sees):
                        e[j] = s[j] - top
                else:
                    top, seen = s[0], False
                    for j in range(sees):
                        if key_mask[b, j] and (not seen or s[j] > top):
                            top, seen = s[j], True
                    for j in range(sees):
                        e[j] = s[j] - top if key_mask[b, j] else -np.inf
                    if not seen:
                        sees = 0
                for j in range(sees, K):
                    e[j] = -np.inf


@njit(**_JIT)
def _normalize(E, past):
    """Each row of E divided by its sum, over keys 0 .. past + i (the rest are 0); a row summing to 0
    (it sees no key) stays 0."""
    B, M, T, K = E.shape
    for b in prange(B):
        for m in range(M):
            for i in range(T):
                sees = min(past + i + 1, K)
                e = E[b, m, i]
                z = e[0] * 0
                for j in range(sees):
                    z += e[j]
                if z > 0:
                    for j in range(sees):
                        e[j] /= z


@njit(**_JIT)
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
    """Shift (loop over the keys each row sees), exp (NumPy, vectorized, in place), normalize (loop)."""
    B, T, K = validate.causal_softmax(S, key_mask, past)
    mask = np.zeros((0, 0), np.bool_) if key_mask is None else c(np.asarray(key_mask) != 0)
    E = np.empty(S.shape, S.dtype)
    _shift(_blocks(S), mask, past, _blocks(E))
    np.exp(E, out=E)                                           # exp(−inf) = 0: the keys a row does not see
    _normalize(_blocks(E), past)
    return E


@half_to_reference
def causal_softmax_backward(dP, P):
    """One loop: the row's dot product dP·P, then dS in the same pass over the row."""
    validate.softmax_grad(dP, P)
    dS = np.empty(P.shape, P.dtype)
    _softmax_grad(_blocks(dP), _blocks(P), _blocks(dS))
    return dS
