"""Numba CPU loss kernel: ``reference/loss.py``'s LM head and cross-entropy (the semantics are there).

Per chunk of rows: the logits are one product on the pool, then one loop per row turns them, in place,
into the row's loss and its gradient g_i (max, e^(z − max) and its sum, then the scaled softmax minus
the one-hot); dx and dW are two more products of that buffer. The buffer is the only (chunk, V) array,
allocated once per call, not per chunk (fresh memory pays for its first touch, page by page).
"""
import numpy as np
from numba import prange

from .. import config, validate
from . import blas, pool
from .blas import half_to_reference
from .vexp import exp

_JIT = dict(cache=True, fastmath=config.NUMBA_FASTMATH, error_model=config.NUMBA_ERROR_MODEL)


@pool.jit(**_JIT)
def _loss_rows(z, target, counted, scale, grad, losses):
    """losses[i] = log Σ_j e^(z_ij − m_i) − (z_i,target_i − m_i) on counted rows (0 on the others); with ``grad``,
    z_i becomes scale (softmax(z_i) − onehot(target_i)) on counted rows and 0 on the others."""
    for i in prange(z.shape[0]):
        row = z[i]
        m = row.max()
        picked = row[target[i]] - m
        s = row.dtype.type(0)
        for j in range(row.shape[0]):
            e = exp(row[j] - m)
            row[j] = e
            s += e
        losses[i] = (np.log(s) - picked) if counted[i] else 0
        if grad:
            k = scale / s if counted[i] else row.dtype.type(0)
            for j in range(row.shape[0]):
                row[j] *= k
            if counted[i]:
                row[target[i]] -= scale


# -- the LM head and cross-entropy --------------------------------------------------------------
@half_to_reference
def linear_cross_entropy(x, W, labels, scale=1.0, ignore_index=-100, need_dx=True, need_dW=True):
    """``config.LOSS_CHUNK_ROWS`` rows at a time: logits, the loop above, then dx and dW from its buffer."""
    N, V = validate.linear_cross_entropy(x, W, labels, ignore_index)
    loss = 0.0
    dx = np.empty(x.shape, x.dtype) if need_dx else None
    dW = np.zeros(W.shape, W.dtype) if need_dW else None
    t = x.dtype.type
    buffer = np.empty((min(config.LOSS_CHUNK_ROWS, N), V), x.dtype)            # (chunk, V), every chunk's logits
    for r0 in range(0, N, config.LOSS_CHUNK_ROWS):
        r1 = min(r0 + config.LOSS_CHUNK_ROWS, N)
        counted = np.asarray(labels[r0:r1]) != ignore_index
        target = np.where(counted, labels[r0:r1], 0).astype(np.int64)
        z = blas.matmul(x[r0:r1], W.T, out=buffer[:r1 - r0])                   # (n, d) @ (d, V)
        losses = np.empty(r1 - r0, x.dtype)
        _loss_rows(z, target, counted, t(scale), need_dx or need_dW, losses)
        loss += float(losses.sum(dtype=np.float64))
        if need_dx:
            dx[r0:r1] = blas.matmul(z, W)                                       # (n, V) @ (V, d)
        if need_dW:
            dW += blas.matmul(z.T, x[r0:r1])                                    # (V, n) @ (n, d)
    return np.asarray(loss, x.dtype), dx, dW
