"""RMSNorm (Llama's norm) with its backward, in float32 or wider as transformers computes it.

Letters: x (..., d), any leading shape; w (d,). With r = 1/sqrt(mean(x², last axis) + eps)
and x̂ = x r (computed in the wider of float32 and x's dtype, then cast back to x's dtype):

    y  = w ⊙ x̂
    dx = r (g − x̂ · mean(g ⊙ x̂)),   g = dy ⊙ w       (∂r/∂x_j = −r³ x_j / d)
    dw = Σ_rows dy ⊙ x̂

The casts are treated as the identity in the backward. transformers' LlamaRMSNorm upcasts
to float32 only, so a float64 transformers model *narrows* here; lowrank never narrows.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .device import get_array_module
from .layers import check_dtype
from .module import Module, Parameter


class RMSNormCache(NamedTuple):
    x_hat: object      # (..., d) normalized input, the compute dtype (float32 or wider)
    r: object          # (..., 1) 1 / RMS, the compute dtype
    shape: tuple       # x.shape, to check dy


class RMSNorm(Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps) over the last axis; ``weight`` starts at ones."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype="float32"):
        super().__init__()
        if dim < 1 or not eps >= 0:
            raise ValueError(f"RMSNorm: dim must be >= 1 and eps >= 0, got dim={dim}, eps={eps}")
        self.dim, self.eps = dim, float(eps)
        self.weight = Parameter(np.ones(dim, dtype=check_dtype("RMSNorm", dtype)))

    def forward(self, x):
        if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.label} expects input of shape (..., {self.dim}), "
                             f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        xp = get_array_module(x)
        wide = np.promote_types(np.float32, x.dtype)
        xf = x.astype(wide, copy=False)                                   # (..., d)
        r = 1 / xp.sqrt((xf * xf).mean(axis=-1, keepdims=True) + self.eps)  # (..., 1)
        x_hat = xf * r                                                    # (..., d)
        self._cache = RMSNormCache(x_hat, r, x.shape)
        return self.weight.data * x_hat.astype(x.dtype, copy=False)       # (..., d)

    def backward(self, dy):
        x_hat, r, shape = self._need_cache()
        self._check_dy(dy, shape)
        self._cache = None
        w = self.weight.data
        if self.weight.trainable:
            dw = (dy * x_hat).reshape(-1, self.dim).sum(axis=0)           # (d,)
            self.weight.accumulate(dw.astype(w.dtype, copy=False))
        g = (dy * w).astype(x_hat.dtype, copy=False)                      # (..., d)
        dx = r * (g - x_hat * (g * x_hat).mean(axis=-1, keepdims=True))  # (..., d)
        return dx.astype(dy.dtype, copy=False)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"
