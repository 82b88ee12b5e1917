"""The Numba loops of numba_cpu: every rank-r product BLAS cannot do in place.

Letters: N rows, D = D_in or D_out, r rank, K adapters; k = index[i] is row i's adapter (−1: none).
A single adapter is K = 1, index ≡ 0; ``mask`` is an optional (N, D) multiplier ((0, 0) = none):

    shrink   out[i, :]  = coef[k] · M[k] (G[i] ⊙ mask[i])            M (K, r, D), out (N, r)
    expand   out[i, :] += mask[i] ⊙ (coef[k] · H[i] M[k])            M (K, r, D), out (N, D)
    outer    out[k]    += coef[k] · Σ_{i: index[i]=k} H[i]ᵀ (G[i] ⊙ mask[i])   out (K, r, D)

They carry the dropout mask folded into h, dA and dx without an (N, D_in) x ⊙ mask
temporary, and the per-row adapter gather of BGMV batches without a gather of x.
"""
import numpy as np
from numba import prange

from .. import config
from . import pool

_JIT = dict(cache=True, fastmath=config.NUMBA_FASTMATH)
BLOCK = config.NUMBA_COL_BLOCK


@pool.jit(**_JIT)
def shrink(G, mask, M, coef, index, out):
    """out[i, t] = coef[k] Σ_j G[i, j]·mask[i, j]·M[k, t, j], k = index[i]; 0 where k = −1."""
    N, D = G.shape
    r = M.shape[1]
    masked = mask.shape[0] > 0
    for i in prange(N):
        k = index[i]
        Gi = G[i]
        for t in range(r):
            acc = out.dtype.type(0)
            if k >= 0:
                Mk = M[k, t]
                if masked:
                    mi = mask[i]
                    for j in range(D):
                        acc += Gi[j] * mi[j] * Mk[j]
                else:
                    for j in range(D):
                        acc += Gi[j] * Mk[j]
                acc *= coef[k]
            out[i, t] = acc


@pool.jit(**_JIT)
def expand(out, H, M, coef, index, mask):
    """out[i, j] += mask[i, j]·coef[k] Σ_t H[i, t]·M[k, t, j], k = index[i]; rows with k = −1 untouched."""
    N, D = out.shape
    r = M.shape[1]
    masked = mask.shape[0] > 0
    for i in prange(N):
        k = index[i]
        if k < 0:
            continue
        oi = out[i]
        row = np.zeros(D, out.dtype) if masked else oi      # masked: build the row, then scale it
        for t in range(r):
            c = coef[k] * H[i, t]
            Mk = M[k, t]
            for j in range(D):
                row[j] += c * Mk[j]
        if masked:
            mi = mask[i]
            for j in range(D):
                oi[j] += mi[j] * row[j]


@pool.jit(**_JIT)
def outer(G, H, mask, coef, index, out):
    """out[k, t, j] += coef[k] Σ_{i: index[i]=k} H[i, t]·G[i, j]·mask[i, j]; column blocks never race."""
    N, D = G.shape
    r = H.shape[1]
    masked = mask.shape[0] > 0
    for b in prange((D + BLOCK - 1) // BLOCK):
        j0, j1 = b * BLOCK, min(b * BLOCK + BLOCK, D)
        for i in range(N):
            k = index[i]
            if k < 0:
                continue
            Gi = G[i, j0:j1]
            mi = mask[i, j0:j1] if masked else Gi
            for t in range(r):
                c = coef[k] * H[i, t]
                o = out[k, t, j0:j1]
                if masked:
                    for j in range(j1 - j0):
                        o[j] += c * Gi[j] * mi[j]
                else:
                    for j in range(j1 - j0):
                        o[j] += c * Gi[j]


def no_mask(dtype):
    """The (0, 0) array the loops read as "no mask" (one compiled signature for both cases)."""
    return np.empty((0, 0), dtype)


def index64(index):
    """An adapter index as C-contiguous int64 (one compiled signature for every integer dtype)."""
    return np.ascontiguousarray(index).astype(np.int64, copy=False)
