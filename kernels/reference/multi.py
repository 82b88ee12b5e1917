"""Reference multi-adapter kernels: BGMV (a per-row adapter index) and SGMV (sorted segments).

Letters: see __init__; k = index[i] is row i's adapter, −1 = "base model only". The stacks
A_stack (K, r, D_in), B_stack (K, D_out, r) are padded to the largest rank: padded rows of A
and columns of B are zero, so they add nothing and get zero gradients. Per adapter, the math
is lora.py's, on that adapter's rows.
"""
from .. import validate
from ..common import adapters_in, segment_index, xp
from .lora import dense_forward


def _rows_of(index, k):
    return xp(index).nonzero(index == k)[0]


# -- BGMV: a per-row adapter index -----------------------------------------------------------
def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
    """Semantics: y[i] = x[i] Wᵀ + b + s[k] · (x[i] A[k]ᵀ) B[k]ᵀ, h[i] = x[i] A[k]ᵀ, k = index[i].

    scalings (K,), index (N,) ints in [-1, K) -> y (N, D_out), h (N, r). k = −1: the base alone,
    h[i] = 0. x Wᵀ is computed once.
    """
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.index(index, N, K)
    y = dense_forward(x, W, bias)                 # (N, D_out)
    h = xp(x).zeros((N, r), x.dtype)
    for k in adapters_in(index):
        rows = _rows_of(index, k)
        h[rows] = x[rows] @ A_stack[k].T          # (n, D_in) @ (D_in, r)
        y[rows] += (scalings[k] * h[rows]) @ B_stack[k].T   # (n, r) @ (r, D_out)
    return y, h


def lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx=True):
    """Semantics: lora_backward per row with k = index[i]; dA_stack[k], dB_stack[k] sum over k's rows.

    -> dx (N, D_in) or None, dA_stack (K, r, D_in), dB_stack (K, D_out, r); 0 for unused adapters.
    """
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.index(index, N, K)
    dx = dy @ W if need_dx else None              # (N, D_out) @ (D_out, D_in)
    dA_stack, dB_stack = xp(x).zeros_like(A_stack), xp(x).zeros_like(B_stack)
    for k in adapters_in(index):
        rows = _rows_of(index, k)
        dh = scalings[k] * (dy[rows] @ B_stack[k])          # (n, D_out) @ (D_out, r)
        dB_stack[k] = scalings[k] * (dy[rows].T @ h[rows])  # (D_out, n) @ (n, r)
        dA_stack[k] = dh.T @ x[rows]                        # (r, n) @ (n, D_in)
        if need_dx:
            dx[rows] += dh @ A_stack[k]                     # (n, r) @ (r, D_in)
    return dx, dA_stack, dB_stack


# -- SGMV: rows sorted by adapter, contiguous segments ---------------------------------------
def lora_forward_sgmv(x, W, A_stack, B_stack, scalings, indptr, seg_index, bias=None):
    """Semantics: lora_forward_multi with index[indptr[t]:indptr[t+1]] = seg_index[t]; indptr (S+1,), seg_index (S,)."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.segments(indptr, seg_index, N, K)
    return lora_forward_multi(x, W, A_stack, B_stack, scalings, segment_index(indptr, seg_index), bias)


def lora_backward_sgmv(dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx=True):
    """Semantics: lora_backward_multi with index[indptr[t]:indptr[t+1]] = seg_index[t]."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.segments(indptr, seg_index, N, K)
    index = segment_index(indptr, seg_index)
    return lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx)
