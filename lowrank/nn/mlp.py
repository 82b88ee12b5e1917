"""Llama's SwiGLU MLP with its backward; gate/up/down projections are Dense layers (LoRA targets).

Letters: x (..., d), I = intermediate_size, N = the number of rows x holds.

    g = x W_gᵀ, u = x W_uᵀ  (N, I);   a = silu(g);   y = (a ⊙ u) W_dᵀ  (N, d)
    backward:  dh = dy W_d,  da = dh ⊙ u,  du = dh ⊙ a,  dg = silu'(g) ⊙ da,  dx = dg W_g + du W_u
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .layers import Dense
from .module import Module
from .activations import SiLU


class SwiGLUCache(NamedTuple):
    a: object          # (N, I) silu(gate_proj(x))
    u: object          # (N, I) up_proj(x)
    shape: tuple       # x.shape, to check dy


class LlamaMLP(Module):
    """y = down_proj(silu(gate_proj(x)) ⊙ up_proj(x)) on x (..., d)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False, dtype="float32", seed=None):
        super().__init__()
        s = [int(v) for v in np.random.default_rng(seed).integers(2**31, size=3)]
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = Dense(hidden_size, intermediate_size, bias, dtype=dtype, seed=s[0])
        self.up_proj = Dense(hidden_size, intermediate_size, bias, dtype=dtype, seed=s[1])
        self.down_proj = Dense(intermediate_size, hidden_size, bias, dtype=dtype, seed=s[2])
        self.act_fn = SiLU()

    def forward(self, x):
        if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{self.label} expects input of shape (..., {self.hidden_size}), "
                             f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        x2 = x.reshape(-1, self.hidden_size)                                  # (N, d)
        a = self.act_fn.forward(self.gate_proj.forward(x2))                   # (N, I)
        u = self.up_proj.forward(x2)                                          # (N, I)
        self._cache = SwiGLUCache(a, u, x.shape)
        return self.down_proj.forward(a * u).reshape(x.shape)                 # (..., d)

    def backward(self, dy):
        a, u, shape = self._need_cache()
        self._check_dy(dy, shape)
        self._cache = None
        dh = self.down_proj.backward(dy.reshape(-1, self.hidden_size))        # (N, I)
        dg = self.act_fn.backward(dh * u)                                     # (N, I)
        dx = self.gate_proj.backward(dg) + self.up_proj.backward(dh * a)      # (N, d)
        return dx.reshape(shape)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"
