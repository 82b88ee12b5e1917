"""RMSNorm (Llama's norm) with its backward, in float32 or wider as transformers computes it.

Letters: x (..., d), any leading shape; w (d,). With r = 1/sqrt(mean(x², last axis) + eps)
and x̂ = x r (computed in the wider of float32 and x's dtype, then cast back to x's dtype):

    y  = w ⊙ x̂
    dx = r (g − x̂ · mean(g ⊙ x̂)),   g = dy ⊙ w       (∂r/∂x_j = −r³ x_j / d)
    dw = Σ_rows dy ⊙ x̂

The casts are treated as the identity in the backward. transformers' LlamaRMSNorm upcasts
to float32 only, so a float64 transformers model *narrows* here; lowrank never narrows.
Both directions are kernels (``lowrank.kernels``: ``rms_norm``, ``rms_norm_backward``; the
reference's ``norm.py`` computes them as above): the layer keeps x and r and the backward
recomputes x̂.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .dispatch import kernels_for
from .layers import check_dtype
from .module import Module, Parameter


class RMSNormCache(NamedTuple):
    x: object          # (..., d) the input
    r: object          # (..., 1) 1 / RMS, the compute dtype (float32 or wider)


class RMSNorm(Module):
    """y = w ⊙ x / sqrt(mean(x²) + eps) over the last axis; ``weight`` starts at ones."""

    backend = None         # the kernel backend (None: the global setting; see nn.dispatch)

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
        y, r = kernels_for(x, self.backend).rms_norm(x, self.weight.data, self.eps)   # (..., d), (..., 1)
        self._cache = RMSNormCache(x, r)
        return y

    def backward(self, dy):
        x, r = self._need_cache()
        self._check_dy(dy, x.shape)
        self._cache = None
        w = self.weight
        dx, dw = kernels_for(dy, self.backend).rms_norm_backward(dy, x, w.data, r, w.trainable)
        if w.trainable:
            w.accumulate(dw)
        return dx

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"
