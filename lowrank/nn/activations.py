"""SiLU (swish), the gate of Llama's SwiGLU MLP, as a layer of its own (LlamaMLP uses the fused
``silu_and_mul`` kernel), with its backward under its forward.

    y = z σ(z),    dy/dz = σ(z) (1 + z (1 − σ(z)))
"""
from __future__ import annotations

from ..kernels.common import silu_slope
from .layers import sigmoid
from .module import Module


class SiLU(Module):
    """y = z σ(z) elementwise on any shape; keeps z for the backward (σ is recomputed)."""

    def forward(self, z):
        self._cache = z
        y = sigmoid(z)
        y *= z                                  # z σ(z), in σ's fresh buffer
        return y

    def backward(self, dy):
        z = self._need_cache()
        self._cache = None
        self._check_dy(dy, z.shape)
        dz = silu_slope(z, sigmoid(z))
        dz *= dy                                # dy σ(z) (1 + z (1 − σ(z))), in one buffer
        return dz
