"""Numba CPU normalization kernels: ``reference/norm.py``'s RMSNorm (the semantics are there).

One loop per row each way, where NumPy makes about five whole-array passes with (N, d)
temporaries forward and nine backward; rows run in parallel on the pool (``pool.jit``). dw sums
over rows, so the backward gives each thread a block of rows and its own partial dw, added after.
``python -m benchmarks.elementwise`` times both against the reference.
"""
import numpy as np
from numba import prange

from .. import config, validate
from . import pool
from .blas import c, half_to_reference

_JIT = dict(cache=True, fastmath=config.NUMBA_FASTMATH, error_model=config.NUMBA_ERROR_MODEL)


@pool.jit(**_JIT)
def _forward(x, w, eps, y, r):
    """Per row: r = 1 / sqrt(mean(x²) + eps), then y = w x r; x, y (N, d), r (N,)."""
    N, d = x.shape
    for i in prange(N):
        xi, yi = x[i], y[i]
        acc = xi[0] * 0
        for j in range(d):
            acc += xi[j] * xi[j]
        r[i] = 1 / np.sqrt(acc / d + eps)
        ri = r[i]                                   # in r's dtype: the loop below stays in float32
        for j in range(d):
            yi[j] = w[j] * (xi[j] * ri)


@pool.jit(**_JIT)
def _backward(dy, x, w, r, inv_d, need_dw, dx, dw_parts):
    """Per row: dot = mean(dy w x̂), dx = r (dy w − x̂ dot); dw_parts[b] += dy x̂ when need_dw, for the
    rows of block b (one block per thread: rows N·b/blocks to N·(b+1)/blocks). ``inv_d`` = 1/d in the
    arrays' dtype, so float32 stays float32."""
    N, d = x.shape
    blocks = dw_parts.shape[0]
    for b in prange(blocks):
        dw = dw_parts[b]
        for i in range(N * b // blocks, N * (b + 1) // blocks):
            gi, xi, oi, ri = dy[i], x[i], dx[i], r[i]
            dot = ri * 0
            for j in range(d):
                dot += gi[j] * w[j] * xi[j]
            dot *= ri * inv_d
            for j in range(d):
                x_hat = xi[j] * ri
                oi[j] = ri * (gi[j] * w[j] - x_hat * dot)
            if need_dw:
                for j in range(d):
                    dw[j] += gi[j] * xi[j] * ri


# -- RMSNorm ----------------------------------------------------------------------------------
@half_to_reference
def rms_norm(x, weight, eps):
    """One loop over the rows: the sum of squares, then the scaled row."""
    validate.rms_norm(x, weight)
    d = x.shape[-1]
    y = np.empty(x.shape, x.dtype)
    r = np.empty(x.shape[:-1] + (1,), x.dtype)
    _forward(c(x).reshape(-1, d), c(weight), float(eps), y.reshape(-1, d), r.reshape(-1))
    return y, r


@half_to_reference
def rms_norm_backward(dy, x, weight, rstd, need_dw=True):
    """One loop over the rows: the row's dot product, then dx (and dw's row added) in one pass."""
    validate.rms_norm(x, weight, dy, rstd)
    d = x.shape[-1]
    dx = np.empty(x.shape, x.dtype)
    dw_parts = np.zeros((pool.threads(), d), x.dtype)       # a partial dw per block of rows
    _backward(c(dy).reshape(-1, d), c(x).reshape(-1, d), c(weight), c(rstd).reshape(-1), x.dtype.type(1 / d),
              bool(need_dw), dx.reshape(-1, d), dw_parts)
    return dx, (dw_parts.sum(axis=0) if need_dw else None)
