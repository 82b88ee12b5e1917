"""SiLU (swish), the gate of Llama's SwiGLU MLP, with its backward under its forward.

    y = z σ(z),    dy/dz = σ(z) (1 + z (1 − σ(z)))
"""
from __future__ import annotations

from .layers import sigmoid
from .module import Module


class SiLU(Module):
    """y = z σ(z) elementwise on any shape; keeps z for the backward (σ is recomputed)."""

    def forward(self, z):
        self._cache = z
        return z * sigmoid(z)

    def backward(self, dy):
        z = self._need_cache()
        self._cache = None
        self._check_dy(dy, z.shape)
        s = sigmoid(z)
        return dy * s * (1 + z * (1 - s))
