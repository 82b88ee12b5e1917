"""Reference dense and single-adapter LoRA kernels, forward and backward (letters: see __init__).

    forward   h = (x ⊙ mask) Aᵀ                      (N, r)
              y = x Wᵀ + b + s · h Bᵀ                (N, D_out)
    backward  dh = s · dy B                          (N, r)
              dB = s · dyᵀ h                         (D_out, r)
              dA = dhᵀ (x ⊙ mask)                    (r, D_in)
              dx = dy W + (dh A) ⊙ mask              (N, D_in)

``mask`` is the LoRA branch's dropout mask, already divided by the keep probability
(None = no dropout). ``W=None`` computes the LoRA term alone, for a base layer that is
not a plain dense product (a 4-bit base, say).
"""
from .. import validate
from ..common import xp


# -- dense -----------------------------------------------------------------------------------
def dense_forward(x, W, bias=None):
    """Semantics: y = x Wᵀ + b.   x (N, D_in), W (D_out, D_in), bias (D_out,) -> y (N, D_out)."""
    validate.dense(x, W, bias)
    y = x @ W.T                                   # (N, D_in) @ (D_in, D_out)
    if bias is not None:
        y += bias
    return y


def dense_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    """Semantics: dx = dy W, dW = dyᵀ x, db = Σ_i dy[i].   dy (N, D_out) -> dx, dW (D_out, D_in), db.

    Each is None when not needed (a frozen W gets no dW); ``x`` may be None when ``need_dW``
    is False: a frozen layer need not keep its input.
    """
    validate.dense_grad(dy, x, W, need_dW)
    dx = dy @ W if need_dx else None               # (N, D_out) @ (D_out, D_in)
    dW = dy.T @ x if need_dW else None             # (D_out, N) @ (N, D_in)
    db = dy.sum(axis=0) if need_db else None       # (D_out,)
    return dx, dW, db


# -- LoRA, one adapter -----------------------------------------------------------------------
def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
    """Semantics: h = (x ⊙ mask) Aᵀ, y = x Wᵀ + b + s · h Bᵀ.   A (r, D_in), B (D_out, r) -> y, h (N, r).

    mask (N, D_in) or None; h is kept for the backward. W=None: the LoRA term (+ b) alone.
    """
    N, D_in, D_out, r = validate.lora(x, W, A, B, bias, mask)
    xd = x if mask is None else x * mask
    h = xd @ A.T                                  # (N, D_in) @ (D_in, r)
    y = x @ W.T if W is not None else xp(x).zeros((N, D_out), x.dtype)   # (N, D_out)
    y += (scaling * h) @ B.T                      # (N, r) @ (r, D_out)
    if bias is not None:
        y += bias
    return y, h


def lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
    """Semantics: dh = s · dy B, dB = s · dyᵀ h, dA = dhᵀ (x ⊙ mask), dx = dy W + (dh A) ⊙ mask.

    -> dx (N, D_in) or None when not needed, dA (r, D_in), dB (D_out, r). W=None: LoRA term only.
    """
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
