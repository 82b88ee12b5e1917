"""Numba CPU multi-adapter kernels: ``reference/multi.py``'s BGMV and SGMV (the semantics are there).

BGMV (per-row index) runs the base product once through BLAS, then the loops of ``loops.py``
gather each row's adapter: no gather of x and no full-size temporary. SGMV (rows sorted by
adapter) needs no gather at all: each segment is a contiguous slice, so plain BLAS calls on
views, accumulated in place with GEMM's beta = 1 (``blas.gemm_acc``), beat any hand loop.
"""
import numpy as np

from .. import validate
from . import blas, loops
from .blas import c, half_to_reference


# -- BGMV: a per-row adapter index -----------------------------------------------------------
@half_to_reference
def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
    """BLAS for x Wᵀ + b, then the shrink and expand loops, each gathering row i's adapter k = index[i]."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.index(index, N, K)
    x, idx, none = c(x), loops.index64(index), loops.no_mask(x.dtype)
    coef = c(np.asarray(scalings, x.dtype))
    y = blas.base_product(x, W, bias)                                   # (N, D_out)
    h = np.empty((N, r), x.dtype)
    loops.shrink(x, none, c(A_stack), np.ones(K, x.dtype), idx, h)      # h[i] = A_k x_i
    loops.expand(y, h, c(B_stack.transpose(0, 2, 1)), coef, idx, none)  # y[i] += s_k B_k h_i
    return y, h


@half_to_reference
def lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx=True):
    """Loops for dh (shrink), dA and dB (outer, column blocks), dx = dy W by BLAS plus an expand."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.index(index, N, K)
    dy, x, h, idx = c(dy), c(x), c(h), loops.index64(index)
    coef, ones, none = c(np.asarray(scalings, x.dtype)), np.ones(K, x.dtype), loops.no_mask(x.dtype)
    dh = np.empty((N, r), x.dtype)
    loops.shrink(dy, none, c(B_stack.transpose(0, 2, 1)), coef, idx, dh)  # dh[i] = s_k B_kᵀ dy_i
    dBt = np.zeros((K, r, D_out), x.dtype)
    loops.outer(dy, h, none, coef, idx, dBt)                             # dB_kᵀ = s_k Σ h_iᵀ dy_i
    dA_stack = np.zeros((K, r, D_in), x.dtype)
    loops.outer(x, dh, none, ones, idx, dA_stack)                        # dA_k = Σ dh_iᵀ x_i
    dx = None
    if need_dx:
        dx = blas.matmul(dy, W)                                          # (N, D_out) @ (D_out, D_in)
        loops.expand(dx, dh, c(A_stack), ones, idx, none)                # dx[i] += dh_i A_k
    return dx, dA_stack, c(dBt.transpose(0, 2, 1))


# -- SGMV: rows sorted by adapter, contiguous segments ---------------------------------------
def _segments(indptr, seg_index):
    """(k, start, stop) for each non-empty segment with an adapter (k >= 0)."""
    ptr, ks = np.asarray(indptr), np.asarray(seg_index)
    return [(int(k), int(ptr[s]), int(ptr[s + 1])) for s, k in enumerate(ks) if k >= 0 and ptr[s + 1] > ptr[s]]


@half_to_reference
def lora_forward_sgmv(x, W, A_stack, B_stack, scalings, indptr, seg_index, bias=None):
    """BLAS for x Wᵀ + b, then per segment two GEMMs on row slices, accumulated in place (beta = 1)."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.segments(indptr, seg_index, N, K)
    y = blas.base_product(x, W, bias)                                   # (N, D_out)
    h = np.zeros((N, r), x.dtype)
    for k, a, b in _segments(indptr, seg_index):                        # every small product in SciPy's
        blas.gemm_acc(h[a:b], x[a:b], A_stack[k].T, 1.0)                # one-thread BLAS (pool.pin_scipy_blas):
        blas.gemm_acc(y[a:b], h[a:b], B_stack[k].T, float(scalings[k]))  # h = (n, D_in) @ (D_in, r); y += s h Bᵀ
    return y, h


@half_to_reference
def lora_backward_sgmv(dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx=True):
    """Per segment, GEMMs on row slices accumulated in place into dA_stack[k], dB_stack[k] and dx."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.segments(indptr, seg_index, N, K)
    dx = blas.matmul(dy, W) if need_dx else None                        # (N, D_out) @ (D_out, D_in)
    dA_stack, dB_stack = np.zeros_like(A_stack, order="C"), np.zeros_like(B_stack, order="C")
    for k, a, b in _segments(indptr, seg_index):
        s = float(scalings[k])
        dh = blas.gemm_acc(np.zeros((b - a, r), dy.dtype), dy[a:b], B_stack[k], s)   # s (n, D_out) @ (D_out, r)
        blas.gemm_acc(dB_stack[k], dy[a:b].T, h[a:b], s)                # += s (D_out, n) @ (n, r)
        blas.gemm_acc(dA_stack[k], dh.T, x[a:b], 1.0)                   # += (r, n) @ (n, D_in)
        if need_dx:
            blas.gemm_acc(dx[a:b], dh, A_stack[k], 1.0)                 # += (n, r) @ (r, D_in)
    return dx, dA_stack, dB_stack
