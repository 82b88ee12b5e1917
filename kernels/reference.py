"""NumPy reference kernels: the definition every other backend must reproduce.

Letters: N rows, D_in, D_out, r rank, K adapters. Row-major activations.

    W (D_out, D_in) frozen, A = lora_A (r, D_in), B = lora_B (D_out, r), s = scaling

    forward   h = (x ⊙ mask) Aᵀ                      (N, r)
              y = x Wᵀ + b + s · h Bᵀ                (N, D_out)
    backward  dh = s · dy B                          (N, r)
              dB = s · dyᵀ h                         (D_out, r)
              dA = dhᵀ (x ⊙ mask)                    (r, D_in)
              dx = dy W + (dh A) ⊙ mask              (N, D_in)

``mask`` is the LoRA branch's dropout mask, already divided by the keep probability
(None = no dropout). ``W=None`` computes the LoRA term alone, for a base layer that is
not a plain dense product (a 4-bit base, say). Multi-adapter batches ("BGMV": a
per-row index; "SGMV": sorted segments with an indptr) use stacks padded to the
largest rank: padded rows of A and columns of B are zero, so they add nothing and
get zero gradients. Index −1 means "base model only".
"""
import numpy as np

from . import validate


def _xp(x):
    """numpy, or cupy for a CuPy array (so this reference also runs on the GPU)."""
    if type(x).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def dense_forward(x, W, bias=None):
    """y = x Wᵀ + b. x (N, D_in), W (D_out, D_in), bias (D_out,) -> y (N, D_out)."""
    validate.dense(x, W, bias)
    y = x @ W.T                                   # (N, D_in) @ (D_in, D_out)
    if bias is not None:
        y += bias
    return y


def dense_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    """(dx, dW, db) of y = x Wᵀ + b; each is None when not needed (a frozen W gets no dW).

    ``x`` may be None when ``need_dW`` is False: a frozen layer need not keep its input.
    """
    validate.dense_grad(dy, x, W, need_dW)
    dx = dy @ W if need_dx else None               # (N, D_out) @ (D_out, D_in)
    dW = dy.T @ x if need_dW else None             # (D_out, N) @ (N, D_in)
    db = dy.sum(axis=0) if need_db else None       # (D_out,)
    return dx, dW, db


def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
    """y = x Wᵀ + b + s·(x⊙mask) Aᵀ Bᵀ -> (y (N, D_out), h (N, r)), h kept for backward."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, bias, mask)
    xd = x if mask is None else x * mask
    h = xd @ A.T                                  # (N, D_in) @ (D_in, r)
    y = x @ W.T if W is not None else _xp(x).zeros((N, D_out), x.dtype)   # (N, D_out)
    y += (scaling * h) @ B.T                      # (N, r) @ (r, D_out)
    if bias is not None:
        y += bias
    return y, h


def lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
    """(dx, dA, dB) of lora_forward; dx is None when not needed. W=None: LoRA term only."""
    validate.lora(x, W, A, B, mask=mask, dy=dy, h=h)
    xd = x if mask is None else x * mask
    dh = scaling * (dy @ B)                       # (N, D_out) @ (D_out, r)
    dB = scaling * (dy.T @ h)                     # (D_out, N) @ (N, r)
    dA = dh.T @ xd                                # (r, N) @ (N, D_in)
    dx = None
    if need_dx:
        dx_lora = dh @ A                          # (N, r) @ (r, D_in)
        if mask is not None:
            dx_lora *= mask
        dx = dx_lora if W is None else dy @ W + dx_lora   # (N, D_out) @ (D_out, D_in)
    return dx, dA, dB


def _rows_of(index, k):
    return _xp(index).nonzero(index == k)[0]


def _adapters_in(index):
    """The distinct adapter ids used by ``index``, without −1 (host ints)."""
    ids = np.unique(index.get() if hasattr(index, "get") else index)
    return [int(k) for k in ids if k >= 0]


def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
    """Row i uses adapter index[i] (−1 = none). A_stack (K, r, D_in), B_stack (K, D_out, r).

    Returns y (N, D_out) and h (N, r), h = 0 on base-only rows. W x is computed once.
    """
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.index(index, N, K)
    y = dense_forward(x, W, bias)                 # (N, D_out)
    h = _xp(x).zeros((N, r), x.dtype)
    for k in _adapters_in(index):
        rows = _rows_of(index, k)
        h[rows] = x[rows] @ A_stack[k].T          # (n, D_in) @ (D_in, r)
        y[rows] += (scalings[k] * h[rows]) @ B_stack[k].T   # (n, r) @ (r, D_out)
    return y, h


def lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx=True):
    """(dx, dA_stack, dB_stack) of lora_forward_multi; unused adapters get zero gradients."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.index(index, N, K)
    xp = _xp(x)
    dx = dy @ W if need_dx else None              # (N, D_out) @ (D_out, D_in)
    dA_stack, dB_stack = xp.zeros_like(A_stack), xp.zeros_like(B_stack)
    for k in _adapters_in(index):
        rows = _rows_of(index, k)
        dh = scalings[k] * (dy[rows] @ B_stack[k])          # (n, D_out) @ (D_out, r)
        dB_stack[k] = scalings[k] * (dy[rows].T @ h[rows])  # (D_out, n) @ (n, r)
        dA_stack[k] = dh.T @ x[rows]                        # (r, n) @ (n, D_in)
        if need_dx:
            dx[rows] += dh @ A_stack[k]                     # (n, r) @ (r, D_in)
    return dx, dA_stack, dB_stack


def _segment_index(indptr, seg_index, N):
    """Expand SGMV segments to a per-row index (rows indptr[s]:indptr[s+1] use seg_index[s])."""
    counts = np.diff(indptr.get() if hasattr(indptr, "get") else indptr)
    return _xp(seg_index).repeat(seg_index, counts.tolist())


def lora_forward_sgmv(x, W, A_stack, B_stack, scalings, indptr, seg_index, bias=None):
    """Segmented multi-adapter forward: rows sorted by adapter, segment s = rows indptr[s]:indptr[s+1]."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.segments(indptr, seg_index, N, K)
    return lora_forward_multi(x, W, A_stack, B_stack, scalings, _segment_index(indptr, seg_index, N), bias)


def lora_backward_sgmv(dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx=True):
    """(dx, dA_stack, dB_stack) of lora_forward_sgmv."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.segments(indptr, seg_index, N, K)
    index = _segment_index(indptr, seg_index, N)
    return lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx)
from .reference_nf4 import nf4_dequantize, nf4_matmul, nf4_matmul_dx  # noqa: E402,F401
