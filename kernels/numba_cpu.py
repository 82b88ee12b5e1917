"""Numba CPU kernels: BLAS for the big products, in-place accumulation for the LoRA term.

Letters: N rows, D_in, D_out, r rank. The math is ``reference``'s, line for line:

    forward   h = (x ⊙ mask) Aᵀ            y = x Wᵀ + b,  then  y += s · h Bᵀ   in place
    backward  dh = s · dy B    dB = s · dyᵀ h    dA = dhᵀ (x ⊙ mask)
              dx = dy W,  then  dx += (dh A) ⊙ mask   in place

Which form of the LoRA term, measured (4096², r = 16, float32, adding s·h Bᵀ to a finished
y = x Wᵀ, medians; microbenchmark with 2 BLAS threads on the shared 2-core machine):

    N = 2048   GEMM with beta = 1 into y (``gemm_acc``)   3.7 ms   <- kept
               NumPy temporary + add (PEFT's unfused)    14.3 ms
               Numba row loop y[i] += (s h[i]) Bᵀ         17.7 ms (no reassociation: axpy per t)
               Numba row loop, reduction over r          28.6 ms
    N = 256    beta = 1: 0.52 ms, temporary + add: 0.94 ms, Numba loop: 1.42 ms

and in ``python -m benchmarks.kernels --threads 1`` (results/kernels.json, same shapes), the
whole LoRA work (h = x Aᵀ plus the beta = 1 GEMM) costs 0.8 % / 1.5 % / 2.1 % of the base
product at N = 1 / 256 / 2048, against 0.6 % / 2.3 % / 3.6 % for the NumPy temporary + add;
the fused forward / base medians are 1.012 / 1.025 / 1.002. The concatenated [x, h]·[W, s·B]ᵀ
form costs 1.6-5× the base, merged-per-step W + s·B·A 1.3-13×.
So the expand is one more BLAS call that writes into the base GEMM's output: no (N, D_out)
temporary and no separate add pass. The concatenated [W | s·B]·[x ; h] form must copy W every
step (B changes) and merged weights W + s·B·A cost a full (D_out, D_in) pass per change; both
are in the benchmark table for contrast. The shrink h = x Aᵀ is a BLAS call too (0.45 ms vs a
Numba dot loop's 1.8 ms at N = 256); the Numba loops of ``numba_multi`` carry what BLAS cannot
do in place: the dropout mask folded into h, dA and dx without an (N, D_in) x ⊙ mask
temporary, and the per-row adapter gather of multi-adapter batches. ``parallel`` is off (see
``config.NUMBA_PARALLEL``): BLAS supplies the threads.

Inputs of any layout are accepted: BLAS takes strided/F-ordered operands, and the Numba loops
get ``np.ascontiguousarray`` copies (a no-op for C-ordered inputs). float16 has neither BLAS
nor Numba arithmetic here, so float16 calls go to ``reference`` explicitly.
"""
import numpy as np

from . import reference, validate
from .numba_multi import (_expand, _outer, _shrink, base_product, c, gemm_acc, is_half,  # noqa: F401
                          lora_backward_multi, lora_backward_sgmv, lora_forward_multi, lora_forward_sgmv)


def _single(N, dtype):
    """index ≡ 0 and coef = [1]: one adapter as a K = 1 stack for the Numba loops."""
    return np.zeros(N, np.int64), np.ones(1, dtype)


def dense_forward(x, W, bias=None):
    """y = x Wᵀ + b. x (N, D_in), W (D_out, D_in), bias (D_out,) -> y (N, D_out)."""
    validate.dense(x, W, bias)
    if is_half(x):
        return reference.dense_forward(x, W, bias)
    return base_product(x, W, bias)


def dense_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    """(dx, dW, db) of y = x Wᵀ + b; each is None when not needed (a frozen W gets no dW).

    ``x`` may be None when ``need_dW`` is False: a frozen layer need not keep its input.
    """
    validate.dense_grad(dy, x, W, need_dW)
    if is_half(dy):
        return reference.dense_backward(dy, x, W, need_dx, need_dW, need_db)
    dx = c(dy @ W) if need_dx else None            # (N, D_out) @ (D_out, D_in)
    dW = c(dy.T @ x) if need_dW else None          # (D_out, N) @ (N, D_in)
    db = dy.sum(axis=0) if need_db else None       # (D_out,)
    return dx, dW, db


def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
    """y = x Wᵀ + b + s·(x⊙mask) Aᵀ Bᵀ -> (y (N, D_out), h (N, r)), h kept for backward."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, bias, mask)
    if is_half(x):
        return reference.lora_forward(x, W, A, B, scaling, bias, mask)
    if mask is None:
        h = c(x @ A.T)                             # (N, D_in) @ (D_in, r)
    else:                                          # (x ⊙ mask) Aᵀ without the (N, D_in) temporary
        index, one = _single(N, x.dtype)
        h = np.empty((N, r), x.dtype)
        _shrink(c(x), c(mask), c(A)[None], one, index, h)
    if W is not None:
        y = base_product(x, W, bias)               # (N, D_in) @ (D_in, D_out) + b
    else:
        y = np.zeros((N, D_out), x.dtype) if bias is None else np.tile(bias, (N, 1))
    gemm_acc(y, h, B.T, scaling)                   # y += s · (N, r) @ (r, D_out), in place
    return y, h


def lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
    """(dx, dA, dB) of lora_forward; dx is None when not needed. W=None: LoRA term only."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, mask=mask, dy=dy, h=h)
    if is_half(x):
        return reference.lora_backward(dy, x, h, W, A, B, scaling, need_dx, mask)
    index, one = _single(N, x.dtype)
    dh = c(dy @ B)                                 # (N, D_out) @ (D_out, r)
    dh *= scaling
    dB = c(dy.T @ h)                               # (D_out, N) @ (N, r)
    dB *= scaling
    if mask is None:
        dA = c(dh.T @ x)                           # (r, N) @ (N, D_in)
    else:
        dA = np.zeros((1, r, D_in), x.dtype)
        _outer(c(x), dh, c(mask), one, index, dA)  # dhᵀ (x ⊙ mask) without the temporary
        dA = dA[0]
    dx = None
    if need_dx:
        dx = c(dy @ W) if W is not None else np.zeros((N, D_in), x.dtype)   # (N, D_out) @ (D_out, D_in)
        if mask is None:
            gemm_acc(dx, dh, A, 1.0)               # dx += (N, r) @ (r, D_in), in place
        else:
            _expand(dx, dh, c(A)[None], one, index, c(mask))   # dx += (dh A) ⊙ mask
    return dx, dA, dB

# --- NF4 (QLoRA) kernels are re-exported below this line ---
from .numba_nf4 import nf4_dequantize, nf4_matmul, nf4_matmul_dx  # noqa: E402,F401
