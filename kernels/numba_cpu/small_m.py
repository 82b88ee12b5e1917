"""The few-row product of numba_cpu: y = x Wᵀ (+ b) for 2 ≤ N ≤ ``config.NUMBA_SMALL_M`` rows of x,
streaming the frozen W once per call (``reference/lora.py``'s dense_forward is the equation); float64, and
float32 when ``config.NUMBA_GEMV_IR`` is off (float32's few rows are numba_cpu/gemv.py's otherwise).

A decoder step multiplies a handful of rows (one per sequence of the batch) by every weight, and
BLAS's GEMM is slow there: it packs W into panels first, a full extra pass over W for a few rows of
work, so 8 rows cost about 12 one-row GEMVs. Here each thread owns a block of W's output rows; a
tile of 4 rows of W is read from memory once, and every row of x is dotted with it while it sits in
L1 (x itself, N · D_in, stays in L2):

    for each 4 rows o..o+3 of W (the blocks split over the pool's threads):
        for each 4 rows n..n+3 of x:   16 dot products in one pass over D_in   (4 + 4 loads, 16 FMAs)
        for each row left (N mod 4):    4 dot products in one pass over D_in

LLVM vectorizes each pass over D_in (``config.NUMBA_FASTMATH`` lets it reorder the sums); a last
block of fewer than 4 rows of W repeats its last row, computed but not stored. W must be
C-contiguous (its rows are what the vector loads read); ``blas.base_product`` sends other layouts,
one row (BLAS's GEMV reads W once already) and more than NUMBA_SMALL_M rows to BLAS.
"""
import numba
import numpy as np
from numba import prange

from .. import config
from . import pool

_JIT = dict(cache=True, fastmath=config.NUMBA_FASTMATH)


@numba.njit(**_JIT)
def _dots_4x4(w0, w1, w2, w3, x0, x1, x2, x3):
    """The 16 dot products (x_p · w_q for p, q < 4, x_p-major) in one pass over D_in."""
    z = x0.dtype.type(0)
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    for j in range(x0.shape[0]):
        v0, v1, v2, v3 = w0[j], w1[j], w2[j], w3[j]
        u = x0[j]
        a00 += u * v0; a01 += u * v1; a02 += u * v2; a03 += u * v3      # noqa: E702
        u = x1[j]
        a10 += u * v0; a11 += u * v1; a12 += u * v2; a13 += u * v3      # noqa: E702
        u = x2[j]
        a20 += u * v0; a21 += u * v1; a22 += u * v2; a23 += u * v3      # noqa: E702
        u = x3[j]
        a30 += u * v0; a31 += u * v1; a32 += u * v2; a33 += u * v3      # noqa: E702
    return ((a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33))


@numba.njit(**_JIT)
def _dots_4x1(w0, w1, w2, w3, x0):
    """The 4 dot products x_0 · w_q (q < 4) in one pass over D_in."""
    a0 = a1 = a2 = a3 = x0.dtype.type(0)
    for j in range(x0.shape[0]):
        u = x0[j]
        a0 += u * w0[j]; a1 += u * w1[j]; a2 += u * w2[j]; a3 += u * w3[j]   # noqa: E702
    return (a0, a1, a2, a3)


@numba.njit(**_JIT)
def _store(y, bias, n, o, dots):
    """y[n, o + q] = dots[q] (+ bias[o + q]) for the q < 4 that are columns of y."""
    for q in range(min(4, y.shape[1] - o)):
        y[n, o + q] = dots[q] + bias[o + q] if bias.shape[0] else dots[q]


@pool.jit(**_JIT)
def _product(W, x, bias, y):
    """y[n, o] = Σ_j x[n, j]·W[o, j] (+ bias[o]); bias of length 0 = none. W (D_out, D_in), x (N, D_in)."""
    D_out, N = W.shape[0], x.shape[0]
    full = N - N % 4                                          # rows of x in whole tiles of 4
    for b in prange((D_out + 3) // 4):                        # the pool's threads own blocks of W's rows
        o = 4 * b
        w0, w1, w2, w3 = W[o], W[min(o + 1, D_out - 1)], W[min(o + 2, D_out - 1)], W[min(o + 3, D_out - 1)]
        for n in range(0, full, 4):
            dots = _dots_4x4(w0, w1, w2, w3, x[n], x[n + 1], x[n + 2], x[n + 3])
            for p in range(4):
                _store(y, bias, n + p, o, dots[p])
        for n in range(full, N):
            _store(y, bias, n, o, _dots_4x1(w0, w1, w2, w3, x[n]))


def usable(x, W) -> bool:
    """Whether ``product`` takes x Wᵀ: 2 ≤ N ≤ config.NUMBA_SMALL_M rows, float32 or float64 on both
    sides, and a C-contiguous W."""
    return (2 <= x.shape[0] <= config.NUMBA_SMALL_M and x.dtype == W.dtype
            and x.dtype in (np.float32, np.float64) and W.flags.c_contiguous)


def product(x, W, bias=None):
    """y = x Wᵀ (+ b), W read once: x (N, D_in), W (D_out, D_in) C-contiguous, bias (D_out,) -> y (N, D_out)."""
    y = np.empty((x.shape[0], W.shape[0]), x.dtype)
    b = np.empty(0, x.dtype) if bias is None else np.ascontiguousarray(bias, x.dtype)
    _product(W, np.ascontiguousarray(x), b, y)
    return y
