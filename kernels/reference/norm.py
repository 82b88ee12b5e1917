"""NumPy reference normalization kernels: Llama's RMSNorm, forward and backward.

Letters: x (..., d), w = weight (d,), r = 1 / sqrt(mean(x², last axis) + eps) (..., 1), x̂ = x r.
Computed in the wider of float32 and x's dtype, as transformers' LlamaRMSNorm does:

    y  = w ⊙ x̂                                       (x̂ cast back to x's dtype first)
    dx = r (g − x̂ mean(g ⊙ x̂)),   g = dy ⊙ w           (∂r/∂x_j = −r³ x_j / d)
    dw = Σ_rows dy ⊙ x̂

The backward takes x and r and recomputes x̂: a layer keeps x (..., d) and r (..., 1).
"""
import numpy as np

from .. import validate
from ..common import xp as array_module


# -- RMSNorm ----------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """Semantics: y = weight ⊙ x r, r = 1 / sqrt(mean(x², last axis) + eps), in float32 or wider; x (..., d) -> (y, r (..., 1))."""
    validate.rms_norm(x, weight)
    xp = array_module(x)
    xf = x.astype(np.promote_types(np.float32, x.dtype), copy=False)             # (..., d)
    r = 1 / xp.sqrt((xf * xf).mean(axis=-1, keepdims=True) + eps)              # (..., 1)
    return weight * (xf * r).astype(x.dtype, copy=False), r


def rms_norm_backward(dy, x, weight, rstd, need_dw=True):
    """Semantics: x̂ = x rstd, g = dy ⊙ weight: dx = rstd (g − x̂ mean(g ⊙ x̂)), dw = Σ_rows dy ⊙ x̂ (None unless need_dw)."""
    validate.rms_norm(x, weight, dy, rstd)
    x_hat = x.astype(rstd.dtype, copy=False) * rstd                              # (..., d)
    dw = (dy * x_hat).reshape(-1, x.shape[-1]).sum(axis=0).astype(weight.dtype, copy=False) if need_dw else None
    g = (dy * weight).astype(rstd.dtype, copy=False)                             # (..., d)
    dx = rstd * (g - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))
    return dx.astype(dy.dtype, copy=False), dw
