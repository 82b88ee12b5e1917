"""CuPy dense and single-adapter LoRA kernels: ``reference/lora.py``'s math (the semantics are there).

    forward   h = (x ⊙ mask) Aᵀ                   shrink kernel (cuBLAS from N >= CUBLAS_SHRINK_MIN_N
                                                  without dropout)
              N <= GEMV_MAX_N:  y = x Wᵀ + s · h Bᵀ + b    one GEMV kernel: W is read once
              else:             y = s · h Bᵀ + b           expand kernel (the epilogue), writes y
                                y += x Wᵀ                  cuBLAS, beta = 1 (reads y in its epilogue)
    backward  dh, dB, dA                                   cuBLAS (alpha = s)
              dx = (dh A) ⊙ mask  (expand),  then  dx += dy W  (cuBLAS, beta = 1)

The scaling s is applied once, in the expand (forward) or as cuBLAS's alpha (backward).
"""
import cupy

from .. import validate
from .device import base_plus_lora, double_to_reference, expand, gemm, gpu, shrink


# -- dense -----------------------------------------------------------------------------------
@double_to_reference
def dense_forward(x, W, bias=None):
    """The GEMV kernel for N <= GEMV_MAX_N, else cuBLAS onto the broadcast bias (beta = 1)."""
    N, D_in, D_out = validate.dense(x, W, bias)
    x, W, bias = gpu(x=x, W=W, bias=bias)
    return base_plus_lora(x, W, None, None, None, 0.0, None, bias, D_out)


@double_to_reference
def dense_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    """cuBLAS for dx and dW (skipped when not needed), a CuPy sum for db."""
    N, D_in, D_out = validate.dense_grad(dy, x, W, need_dW)
    dy, x, W = gpu(dy=dy, x=x, W=W)
    dx = gemm(dy, W, cupy.empty((N, D_in), dy.dtype)) if need_dx else None          # (N, D_out) @ (D_out, D_in)
    dW = gemm(dy, x, cupy.empty((D_out, D_in), dy.dtype), trans_a=True) if need_dW else None  # dyᵀ x
    db = dy.sum(axis=0) if need_db else None                                         # (D_out,)
    return dx, dW, db


# -- LoRA, one adapter -----------------------------------------------------------------------
@double_to_reference
def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
    """Shrink (kernel or cuBLAS), then the GEMV kernel or expand + cuBLAS beta = 1 (see the module docstring)."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, bias, mask)
    x, W, A, B, bias, mask = gpu(x=x, W=W, A=A, B=B, bias=bias, mask=mask)
    h = shrink(x, mask, A, None, 1.0, None, r)                                       # (N, r)
    return base_plus_lora(x, W, h, B, None, float(scaling), None, bias, D_out), h


@double_to_reference
def lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
    """cuBLAS with alpha = s for dh and dB, cuBLAS for dA; dx by the expand kernel, then cuBLAS beta = 1."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, mask=mask, dy=dy, h=h)
    dy, x, h, W, A, B, mask = gpu(dy=dy, x=x, h=h, W=W, A=A, B=B, mask=mask)
    s = float(scaling)
    dh = gemm(dy, B, cupy.empty((N, r), dy.dtype), alpha=s)                          # (N, D_out) @ (D_out, r)
    dB = gemm(dy, h, cupy.empty((D_out, r), dy.dtype), trans_a=True, alpha=s)        # (D_out, N) @ (N, r)
    xd = x if mask is None else x * mask
    dA = gemm(dh, xd, cupy.empty((r, D_in), dy.dtype), trans_a=True)                 # (r, N) @ (N, D_in)
    if not need_dx:
        return None, dA, dB
    dx = expand(dh, A, 1, D_in, None, 1.0, None, mask, None, cupy.empty((N, D_in), dy.dtype), 0)
    return (dx if W is None else gemm(dy, W, dx, beta=1.0)), dA, dB                  # += (N, D_out) @ (D_out, D_in)
