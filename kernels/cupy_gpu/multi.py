"""CuPy multi-adapter kernels: ``reference/multi.py``'s BGMV and SGMV (the semantics are there).

BGMV: the shrink and expand kernels read each row's adapter a = index[n] themselves
(``cuda/lora.cu``), so x is never gathered; dA and dB are per-adapter cuBLAS products over that
adapter's rows. SGMV: segments are expanded to a per-row index and run as BGMV.
"""
import cupy

from .. import validate
from ..common import adapters_in, segment_index
from .device import base_plus_lora, double_to_reference, expand, gemm, gpu, shrink


def _multi_args(index, scalings):
    """index as int64 and scalings as float32, on the device."""
    return cupy.asarray(index, dtype=cupy.int64), cupy.asarray(scalings, dtype=cupy.float32)


# -- BGMV: a per-row adapter index -----------------------------------------------------------
@double_to_reference
def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
    """Shrink with the adapter gathered per row, then the GEMV kernel or expand + cuBLAS beta = 1."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.index(index, N, K)
    x, W, A_stack, B_stack, bias = gpu(x=x, W=W, A_stack=A_stack, B_stack=B_stack, bias=bias)
    idx, scal = _multi_args(index, scalings)
    h = shrink(x, None, A_stack, idx, 1.0, None, r)                                  # (N, r), gathered A
    return base_plus_lora(x, W, h, B_stack, idx, 0.0, scal, bias, D_out), h


@double_to_reference
def lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx=True):
    """dh by the gathering shrink; dA_stack[k], dB_stack[k] by cuBLAS on adapter k's rows; dx by expand + cuBLAS."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.index(index, N, K)
    dy, x, h, W, A_stack, B_stack = gpu(dy=dy, x=x, h=h, W=W, A_stack=A_stack, B_stack=B_stack)
    idx, scal = _multi_args(index, scalings)
    s_host = cupy.asnumpy(scal)                                                      # (K,) for cuBLAS alpha
    B_t = cupy.ascontiguousarray(B_stack.transpose(0, 2, 1))                         # (K, r, D_out)
    dh = shrink(dy, None, B_t, idx, 0.0, scal, r)                                    # s_a dy B_a, gathered
    dA_stack, dB_stack = cupy.zeros_like(A_stack), cupy.zeros_like(B_stack)
    for k in adapters_in(idx):
        rows = cupy.nonzero(idx == k)[0]
        dy_k, h_k, dh_k, x_k = dy[rows], h[rows], dh[rows], x[rows]
        gemm(dy_k, h_k, dB_stack[k], trans_a=True, alpha=float(s_host[k]))           # (D_out, n) @ (n, r)
        gemm(dh_k, x_k, dA_stack[k], trans_a=True)                                   # (r, n) @ (n, D_in)
    if not need_dx:
        return None, dA_stack, dB_stack
    dx = expand(dh, A_stack, 1, D_in, idx, 1.0, None, None, None, cupy.empty((N, D_in), dy.dtype), 0)
    return gemm(dy, W, dx, beta=1.0), dA_stack, dB_stack                             # dx += dy W


# -- SGMV: rows sorted by adapter, contiguous segments ---------------------------------------
def lora_forward_sgmv(x, W, A_stack, B_stack, scalings, indptr, seg_index, bias=None):
    """Segments expanded to a per-row index on the device, then lora_forward_multi."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.segments(indptr, seg_index, N, K)
    index = segment_index(indptr, cupy.asarray(seg_index))
    return lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias)


def lora_backward_sgmv(dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx=True):
    """Segments expanded to a per-row index on the device, then lora_backward_multi."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.segments(indptr, seg_index, N, K)
    index = segment_index(indptr, cupy.asarray(seg_index))
    return lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx)
