"""Numba CPU dense and single-adapter LoRA kernels: ``reference/lora.py``'s math (the semantics are there).

BLAS for the big products and h = x Aᵀ; the LoRA term is added into the base output in place
(``blas.gemm_acc``, GEMM with beta = 1); the dropout mask is folded into the loops of
``loops.py`` (a single adapter is a K = 1 stack, index ≡ 0), so no (N, D_in) x ⊙ mask
temporary exists (why this form: ``numba_cpu/__init__.py``).
"""
import numpy as np

from .. import validate
from . import blas, loops
from .blas import c, half_to_reference


def _single(N, dtype):
    """index ≡ 0 and coef = [1]: one adapter as a K = 1 stack for the loops."""
    return np.zeros(N, np.int64), np.ones(1, dtype)


# -- dense -----------------------------------------------------------------------------------
@half_to_reference
def dense_forward(x, W, bias=None):
    """One BLAS GEMM, bias added in place."""
    validate.dense(x, W, bias)
    return blas.base_product(x, W, bias)


@half_to_reference
def dense_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    """BLAS for dx and dW (skipped when not needed), a NumPy sum for db."""
    validate.dense_grad(dy, x, W, need_dW)
    dx = blas.matmul(dy, W) if need_dx else None       # (N, D_out) @ (D_out, D_in)
    dW = blas.matmul(dy.T, x) if need_dW else None     # (D_out, N) @ (N, D_in)
    db = dy.sum(axis=0) if need_db else None       # (D_out,)
    return dx, dW, db


# -- LoRA, one adapter -----------------------------------------------------------------------
@half_to_reference
def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
    """h by BLAS (masked: the shrink loop), y = x Wᵀ + b by BLAS, then y += s · h Bᵀ in place (beta = 1)."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, bias, mask)
    if mask is None:
        h = blas.matmul(x, A.T)                    # (N, D_in) @ (D_in, r)
    else:                                          # (x ⊙ mask) Aᵀ without the (N, D_in) temporary
        index, one = _single(N, x.dtype)
        h = np.empty((N, r), x.dtype)
        loops.shrink(c(x), c(mask), c(A)[None], one, index, h)
    if W is not None:
        y = blas.base_product(x, W, bias)          # (N, D_in) @ (D_in, D_out) + b
    else:
        y = np.zeros((N, D_out), x.dtype) if bias is None else np.tile(bias, (N, 1))
    blas.gemm_acc(y, h, B.T, scaling)              # y += s · (N, r) @ (r, D_out), in place
    return y, h


@half_to_reference
def lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
    """BLAS for dh, dB and dA (masked: the outer loop); dx = dy W, then dx += (dh A) ⊙ mask in place."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, mask=mask, dy=dy, h=h)
    index, one = _single(N, x.dtype)
    dh = blas.matmul(dy, B, scaling)               # s (N, D_out) @ (D_out, r)
    dB = blas.matmul(dy.T, h, scaling)             # s (D_out, N) @ (N, r)
    if mask is None:
        dA = blas.matmul(dh.T, x)                  # (r, N) @ (N, D_in)
    else:
        dA = np.zeros((1, r, D_in), x.dtype)
        loops.outer(c(x), dh, c(mask), one, index, dA)   # dhᵀ (x ⊙ mask) without the temporary
        dA = dA[0]
    dx = None
    if need_dx:
        dx = blas.matmul(dy, W) if W is not None else np.zeros((N, D_in), x.dtype)   # (N, D_out) @ (D_out, D_in)
        if mask is None:
            blas.gemm_acc(dx, dh, A, 1.0)          # dx += (N, r) @ (r, D_in), in place
        else:
            loops.expand(dx, dh, c(A)[None], one, index, c(mask))   # dx += (dh A) ⊙ mask
    return dx, dA, dB
