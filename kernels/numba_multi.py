"""Numba CPU kernels for the rank-r parts, and the multi-adapter (BGMV / SGMV) wrappers.

Letters: N rows, D_in, D_out, r rank, K adapters; k = index[i] is row i's adapter (−1: base only).
Re-exported by ``numba_cpu``; the math is ``reference``'s, the layout choices are here.

Three loops carry every rank-r product, each over a per-row adapter index (a single adapter
is K = 1, index ≡ 0), with an optional (N, D) multiplier ``mask`` (empty (0, 0) = none):

    _shrink   out[i, :]  = coef[k] · M[k] (G[i] ⊙ mask[i])            M (K, r, D), out (N, r)
    _expand   out[i, :] += mask[i] ⊙ (coef[k] · H[i] M[k])            M (K, r, D), out (N, D)
    _outer    out[k]    += coef[k] · Σ_{i: index[i]=k} H[i]ᵀ (G[i] ⊙ mask[i])   out (K, r, D)

BGMV (per-row index) runs the base product once through BLAS, then these loops: no gather
of x and no full-size temporary. SGMV (rows sorted by adapter, segment s = indptr[s]:indptr[s+1])
needs no gather at all: each segment is a contiguous slice, so plain BLAS calls on views,
accumulated in place with GEMM's beta = 1 (``gemm_acc``), beat any hand loop.
Stacks are zero-padded to the largest rank (see ``reference``), so padding adds nothing.
"""
from pathlib import Path

import numpy as np
import scipy
from numba import njit, prange
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

from . import config, reference, validate

_JIT = dict(cache=True, fastmath=config.NUMBA_FASTMATH, parallel=config.NUMBA_PARALLEL)
BLOCK = config.NUMBA_COL_BLOCK


def pin_scipy_blas(threads: int = config.SCIPY_BLAS_THREADS) -> list:
    """Give the BLAS that SciPy bundles for itself ``threads`` threads; returns the libraries pinned.

    ``gemm_acc`` calls GEMM through ``scipy.linalg.blas``. NumPy and SciPy wheels each bundle
    their own OpenBLAS, and two thread pools that spin between calls fight over the cores:
    x·Wᵀ in NumPy's BLAS followed by a rank-8 GEMM in SciPy's took 10.7 ms instead of 0.55 ms
    (64×200 @ 200×2000, r = 8, 2 cores). A rank-r product is too small to need threads, so
    SciPy's own copy runs on the calling thread. A shared BLAS (one library for both) is left alone.
    """
    own = Path(scipy.__file__).resolve().parent.parent / "scipy.libs"
    pinned = [lib for lib in ThreadpoolController().lib_controllers
              if lib.user_api == "blas" and Path(lib.filepath).resolve().parent == own]
    for lib in pinned:
        lib.set_num_threads(threads)
    return [lib.filepath for lib in pinned]


PINNED_BLAS = pin_scipy_blas()


@njit(**_JIT)
def _shrink(G, mask, M, coef, index, out):
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


@njit(**_JIT)
def _expand(out, H, M, coef, index, mask):
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


@njit(**_JIT)
def _outer(G, H, mask, coef, index, out):
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


# -- helpers the wrappers share ------------------------------------------------------------
def c(a):
    """``a`` as a C-contiguous array (an explicit copy only when it is not one already)."""
    return np.ascontiguousarray(a)


def no_mask(dtype):
    """The (0, 0) array the loops read as "no mask" (one compiled signature for both cases)."""
    return np.empty((0, 0), dtype)


def gemm_acc(C, P, Q, alpha):
    """C += alpha · P @ Q through BLAS GEMM with beta = 1: P (m, k), Q (k, n), C (m, n).

    In place when C is C-contiguous (every caller here); otherwise BLAS works on a copy
    that is written back. Operands of any layout are passed transposed, not copied, when possible.
    """
    if C.size == 0 or P.shape[1] == 0:
        return C
    gemm = blas.get_blas_funcs("gemm", dtype=C.dtype)
    a, ta = (Q.T, 0) if Q.T.flags.f_contiguous else (Q, 1)     # C.T (n, m) += Qᵀ (n, k) Pᵀ (k, m)
    b, tb = (P.T, 0) if P.T.flags.f_contiguous else (P, 1)
    out = gemm(alpha, a, b, beta=1.0, c=C.T, trans_a=ta, trans_b=tb, overwrite_c=1)
    if not np.shares_memory(out, C):          # BLAS had to copy C: write the result back
        C[...] = out.T
    return C


def base_product(x, W, bias):
    """y = x Wᵀ (+ b) through BLAS. (N, D_in) @ (D_in, D_out) -> (N, D_out), C-contiguous."""
    y = c(x @ W.T)                                   # (N, D_in) @ (D_in, D_out)
    if bias is not None:
        y += bias
    return y


def is_half(x):
    """float16 has no BLAS and no Numba arithmetic here: such calls go to the NumPy reference."""
    return np.dtype(x.dtype) == np.float16


def _index64(index):
    """The adapter index as C-contiguous int64 (one compiled signature for every integer dtype)."""
    return c(index).astype(np.int64, copy=False)


# -- BGMV: a per-row adapter index ---------------------------------------------------------
def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
    """Row i uses adapter index[i] (−1 = none). A_stack (K, r, D_in), B_stack (K, D_out, r) -> (y, h)."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.index(index, N, K)
    if is_half(x):
        return reference.lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias)
    x, idx = c(x), _index64(index)
    coef = c(np.asarray(scalings, x.dtype))
    y = base_product(x, W, bias)                                        # (N, D_out)
    h = np.empty((N, r), x.dtype)
    _shrink(x, no_mask(x.dtype), c(A_stack), np.ones(K, x.dtype), idx, h)    # h[i] = A_k x_i
    _expand(y, h, c(B_stack.transpose(0, 2, 1)), coef, idx, no_mask(x.dtype))  # y[i] += s_k B_k h_i
    return y, h


def lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx=True):
    """(dx, dA_stack, dB_stack) of lora_forward_multi; unused adapters get zero gradients."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.index(index, N, K)
    if is_half(x):
        return reference.lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx)
    dy, x, h, idx = c(dy), c(x), c(h), _index64(index)
    coef, ones, none = c(np.asarray(scalings, x.dtype)), np.ones(K, x.dtype), no_mask(x.dtype)
    dh = np.empty((N, r), x.dtype)
    _shrink(dy, none, c(B_stack.transpose(0, 2, 1)), coef, idx, dh)      # dh[i] = s_k B_kᵀ dy_i
    dBt = np.zeros((K, r, D_out), x.dtype)
    _outer(dy, h, none, coef, idx, dBt)                                  # dB_kᵀ = s_k Σ h_iᵀ dy_i
    dA_stack = np.zeros((K, r, D_in), x.dtype)
    _outer(x, dh, none, ones, idx, dA_stack)                             # dA_k = Σ dh_iᵀ x_i
    dx = None
    if need_dx:
        dx = c(dy @ W)                                                   # (N, D_out) @ (D_out, D_in)
        _expand(dx, dh, c(A_stack), ones, idx, none)                     # dx[i] += dh_i A_k
    return dx, dA_stack, c(dBt.transpose(0, 2, 1))


# -- SGMV: rows sorted by adapter, contiguous segments --------------------------------------
def _segments(indptr, seg_index):
    """(k, start, stop) for each non-empty segment with an adapter (k >= 0)."""
    ptr, ks = np.asarray(indptr), np.asarray(seg_index)
    return [(int(k), int(ptr[s]), int(ptr[s + 1])) for s, k in enumerate(ks) if k >= 0 and ptr[s + 1] > ptr[s]]


def lora_forward_sgmv(x, W, A_stack, B_stack, scalings, indptr, seg_index, bias=None):
    """Segmented multi-adapter forward: segment s = rows indptr[s]:indptr[s+1] uses adapter seg_index[s]."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.segments(indptr, seg_index, N, K)
    if is_half(x):
        return reference.lora_forward_sgmv(x, W, A_stack, B_stack, scalings, indptr, seg_index, bias)
    y = base_product(x, W, bias)                                        # (N, D_out)
    h = np.zeros((N, r), x.dtype)
    for k, a, b in _segments(indptr, seg_index):                        # every small product in SciPy's
        gemm_acc(h[a:b], x[a:b], A_stack[k].T, 1.0)                     # one-thread BLAS (pin_scipy_blas):
        gemm_acc(y[a:b], h[a:b], B_stack[k].T, float(scalings[k]))      # h = (n, D_in) @ (D_in, r); y += s h Bᵀ
    return y, h


def lora_backward_sgmv(dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx=True):
    """(dx, dA_stack, dB_stack) of lora_forward_sgmv."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.segments(indptr, seg_index, N, K)
    if is_half(x):
        return reference.lora_backward_sgmv(dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx)
    dx = c(dy @ W) if need_dx else None                                 # (N, D_out) @ (D_out, D_in)
    dA_stack, dB_stack = np.zeros_like(A_stack, order="C"), np.zeros_like(B_stack, order="C")
    for k, a, b in _segments(indptr, seg_index):
        s = float(scalings[k])
        dh = gemm_acc(np.zeros((b - a, r), dy.dtype), dy[a:b], B_stack[k], s)   # s (n, D_out) @ (D_out, r)
        gemm_acc(dB_stack[k], dy[a:b].T, h[a:b], s)                     # += s (D_out, n) @ (n, r)
        gemm_acc(dA_stack[k], dh.T, x[a:b], 1.0)                        # += (r, n) @ (n, D_in)
        if need_dx:
            gemm_acc(dx[a:b], dh, A_stack[k], 1.0)                      # += (n, r) @ (r, D_in)
    return dx, dA_stack, dB_stack
