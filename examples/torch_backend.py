"""An example kernel backend written with PyTorch ops: what bringing your own kernels looks like.

Not part of the library. It implements the dense, single-adapter and multi-adapter (BGMV, SGMV)
functions of ``lowrank.kernels.api.API`` and attention's batched ``matmul``, with the reference's
signatures; the NF4 and GGUF functions and the decoder's elementwise ones (RoPE, causal softmax, SwiGLU, RMSNorm) are left out, so the registry
runs the reference's for them (``lowrank.kernels.backends.describe("torch")`` says so).
Semantics: the reference's (``lowrank/kernels/reference``); here only how.

    import lowrank as lr
    lr.register_backend("torch", "examples.torch_backend")   # or the .py file's path
    lr.set_backend("torch")                                          # every layer now runs here

    python -m lowrank.kernels.conformance examples/torch_backend.py  # the conformance suite
    python -m benchmarks.kernels --quick --backend examples/torch_backend.py

Arrays cross without copies: ``torch.from_numpy`` views NumPy memory in (any strides), and
``.numpy()`` views the result's out. The LoRA term goes into the base output in place
(``addmm_``: a GEMM with beta = 1), as in the Numba backend. CPU only; float32 and float64.
"""
import numpy as np
import torch

from lowrank.kernels import validate

NAME = "torch"                          # the name the benchmark table and ``--backend`` use
DTYPES = ("float32", "float64")         # float16 goes to the reference (the registry declares it)


def set_num_threads(n):
    """Pin torch's intra-op threads (the benchmark calls this with ``--threads``; threadpoolctl can't)."""
    torch.set_num_threads(n)


def _t(a):
    """A NumPy array as a tensor on the same memory (None stays None)."""
    return None if a is None else torch.from_numpy(a)


def _base(x, W, bias, D_out):
    """x Wᵀ + b, or b alone (zeros without one) when W is None: a fresh (N, D_out) tensor."""
    if W is not None:
        return torch.addmm(bias, x, W.T) if bias is not None else x @ W.T
    y = torch.zeros((x.shape[0], D_out), dtype=x.dtype)
    return y + bias if bias is not None else y


# -- dense -----------------------------------------------------------------------------------
def dense_forward(x, W, bias=None):
    validate.dense(x, W, bias)
    return _base(_t(x), _t(W), _t(bias), W.shape[0]).numpy()


def dense_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    validate.dense_grad(dy, x, W, need_dW)
    dy_, x_, W_ = _t(dy), _t(x), _t(W)
    dx = (dy_ @ W_).numpy() if need_dx else None                 # (N, D_out) @ (D_out, D_in)
    dW = (dy_.T @ x_).numpy() if need_dW else None               # (D_out, N) @ (N, D_in)
    db = dy_.sum(0).numpy() if need_db else None
    return dx, dW, db


# -- attention's batched products ------------------------------------------------------------------
def matmul(a, b):
    validate.matmul(a, b)
    return torch.matmul(_t(a), _t(b)).numpy()                        # broadcast batch axes, as NumPy's


# -- LoRA, one adapter -----------------------------------------------------------------------
def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
    N, D_in, D_out, r = validate.lora(x, W, A, B, bias, mask)
    x_ = _t(x)
    xd = x_ if mask is None else x_ * _t(mask)
    h = xd @ _t(A).T                                             # (N, D_in) @ (D_in, r)
    y = _base(x_, _t(W), _t(bias), D_out)
    y.addmm_(h, _t(B).T, alpha=scaling)                          # y += s · h Bᵀ, in place
    return y.numpy(), h.numpy()


def lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
    validate.lora(x, W, A, B, mask=mask, dy=dy, h=h)
    dy_, x_, A_ = _t(dy), _t(x), _t(A)
    xd = x_ if mask is None else x_ * _t(mask)
    dh = scaling * (dy_ @ _t(B))                                 # (N, D_out) @ (D_out, r)
    dB = scaling * (dy_.T @ _t(h))                               # (D_out, N) @ (N, r)
    dA = dh.T @ xd                                               # (r, N) @ (N, D_in)
    dx = None
    if need_dx:
        dx_lora = dh @ A_ if mask is None else (dh @ A_) * _t(mask)
        dx = (dx_lora if W is None else torch.addmm(dx_lora, dy_, _t(W))).numpy()
    return dx, dA.numpy(), dB.numpy()


# -- BGMV: a per-row adapter index -----------------------------------------------------------
def _groups(index):
    """(k, rows) for every adapter k used by ``index`` (−1 left out): rows as a LongTensor."""
    index_ = torch.from_numpy(np.asarray(index, np.int64))
    return [(int(k), (index_ == k).nonzero().squeeze(1)) for k in torch.unique(index_).tolist() if k >= 0]


def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.index(index, N, K)
    x_, A_, B_ = _t(x), _t(A_stack), _t(B_stack)
    y = _base(x_, _t(W), _t(bias), D_out)
    h = torch.zeros((N, r), dtype=x_.dtype)
    for k, rows in _groups(index):
        h_k = x_.index_select(0, rows) @ A_[k].T                 # (n, D_in) @ (D_in, r)
        h.index_copy_(0, rows, h_k)
        y.index_add_(0, rows, h_k @ B_[k].T, alpha=float(scalings[k]))   # (n, r) @ (r, D_out)
    return y.numpy(), h.numpy()


def lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx=True):
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.index(index, N, K)
    dy_, x_, h_, A_, B_ = _t(dy), _t(x), _t(h), _t(A_stack), _t(B_stack)
    dx = dy_ @ _t(W) if need_dx else None                        # (N, D_out) @ (D_out, D_in)
    dA, dB = torch.zeros_like(A_), torch.zeros_like(B_)
    for k, rows in _groups(index):
        s, dy_k = float(scalings[k]), dy_.index_select(0, rows)
        dh = s * (dy_k @ B_[k])                                  # (n, D_out) @ (D_out, r)
        dB[k] = s * (dy_k.T @ h_.index_select(0, rows))          # (D_out, n) @ (n, r)
        dA[k] = dh.T @ x_.index_select(0, rows)                  # (r, n) @ (n, D_in)
        if need_dx:
            dx.index_add_(0, rows, dh @ A_[k])                   # (n, r) @ (r, D_in)
    return (None if dx is None else dx.numpy()), dA.numpy(), dB.numpy()


# -- SGMV: rows sorted by adapter, contiguous segments ---------------------------------------
def _segments(indptr, seg_index):
    """(k, start, stop) per non-empty segment with an adapter (k >= 0)."""
    ptr = np.asarray(indptr)
    return [(int(k), int(ptr[t]), int(ptr[t + 1])) for t, k in enumerate(np.asarray(seg_index))
            if k >= 0 and ptr[t + 1] > ptr[t]]


def lora_forward_sgmv(x, W, A_stack, B_stack, scalings, indptr, seg_index, bias=None):
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.segments(indptr, seg_index, N, K)
    x_, A_, B_ = _t(x), _t(A_stack), _t(B_stack)
    y = _base(x_, _t(W), _t(bias), D_out)
    h = torch.zeros((N, r), dtype=x_.dtype)
    for k, a, b in _segments(indptr, seg_index):
        torch.mm(x_[a:b], A_[k].T, out=h[a:b])                   # (n, D_in) @ (D_in, r), into h's rows
        y[a:b].addmm_(h[a:b], B_[k].T, alpha=float(scalings[k]))   # a slice: no gather, no scatter
    return y.numpy(), h.numpy()


def lora_backward_sgmv(dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx=True):
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.segments(indptr, seg_index, N, K)
    dy_, x_, h_, A_, B_ = _t(dy), _t(x), _t(h), _t(A_stack), _t(B_stack)
    dx = dy_ @ _t(W) if need_dx else None
    dA, dB = torch.zeros_like(A_), torch.zeros_like(B_)
    for k, a, b in _segments(indptr, seg_index):
        s = float(scalings[k])
        dh = s * (dy_[a:b] @ B_[k])                              # (n, D_out) @ (D_out, r)
        dB[k].addmm_(dy_[a:b].T, h_[a:b], alpha=s)               # += : an adapter may own several segments
        dA[k].addmm_(dh.T, x_[a:b])
        if need_dx:
            dx[a:b].addmm_(dh, A_[k])
    return (None if dx is None else dx.numpy()), dA.numpy(), dB.numpy()
