"""RMSNorm (Llama's norm) with its backward, in float32 or wider as transformers computes it.

The equations, forward and backward, are the kernels' (``kernels/reference/norm.py``:
``rms_norm``, ``rms_norm_backward``). The layer keeps x (..., d) and r = 1/RMS (..., 1) for its
backward, which recomputes x̂ = x r; the weight gets its gradient only when trainable.
transformers' LlamaRMSNorm upcasts to float32 only, so a float64 transformers model *narrows*
there; lowrank never narrows.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .dispatch import kernels_for
from .layers import check_dtype, initial
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
        self.weight = Parameter(initial((dim,), check_dtype("RMSNorm", dtype), lambda: np.ones(dim)))

    def _check(self, x):
        if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.label} expects input of shape (..., {self.dim}), "
                             f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")

    def forward(self, x):
        self._check(x)
        y, r = kernels_for(x, self.backend).rms_norm(x, self.weight.data, self.eps)   # (..., d), (..., 1)
        self._cache = RMSNormCache(x, r)
        return y

    def forward_inference(self, x):
        """``forward`` with nothing kept: no backward may follow (a decode step's)."""
        self._check(x)
        self._cache = None
        return kernels_for(x, self.backend).rms_norm(x, self.weight.data, self.eps)[0]            # (..., d)

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
