"""Llama's SwiGLU MLP with its backward; gate/up/down projections are Dense layers (LoRA targets).

Letters: x (..., d), I = intermediate_size, N = the number of rows x holds.

    g = x W_gᵀ, u = x W_uᵀ  (N, I);   m = silu(g) ⊙ u  (N, I);   y = m W_dᵀ  (N, d)
    backward:  dm = dy W_d,  (dg, du) = silu_and_mul's backward (dm, g, u),  dx = dg W_g + du W_u

silu(g) ⊙ u is one kernel each way (``lowrank.kernels``: ``silu_and_mul`` and its backward, vLLM's
name; the reference's ``activations.py`` states it): it keeps g and u, 2·N·I floats, and recomputes σ(g).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .dispatch import kernels_for
from .layers import Dense, stacked_product
from .module import Module


class SwiGLUCache(NamedTuple):
    g: object          # (N, I) gate_proj(x)
    u: object          # (N, I) up_proj(x)
    shape: tuple       # x.shape, to check dy


class LlamaMLP(Module):
    """y = down_proj(silu(gate_proj(x)) ⊙ up_proj(x)) on x (..., d)."""

    backend = None         # the kernel backend of silu(g) ⊙ u (None: the global setting; see nn.dispatch)

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False, dtype="float32", seed=None):
        super().__init__()
        s = [int(v) for v in np.random.default_rng(seed).integers(2**31, size=3)]
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.gate_proj = Dense(hidden_size, intermediate_size, bias, dtype=dtype, seed=s[0])
        self.up_proj = Dense(hidden_size, intermediate_size, bias, dtype=dtype, seed=s[1])
        self.down_proj = Dense(intermediate_size, hidden_size, bias, dtype=dtype, seed=s[2])

    def _check(self, x):
        if not hasattr(x, "shape") or x.ndim < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{self.label} expects input of shape (..., {self.hidden_size}), "
                             f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")

    def forward(self, x):
        self._check(x)
        x2 = x.reshape(-1, self.hidden_size)                                  # (N, d)
        g = self.gate_proj.forward(x2)                                        # (N, I)
        u = self.up_proj.forward(x2)                                          # (N, I)
        self._cache = SwiGLUCache(g, u, x.shape)
        m = kernels_for(g, self.backend).silu_and_mul(g, u)                   # (N, I) silu(g) ⊙ u
        return self.down_proj.forward(m).reshape(x.shape)                     # (..., d)

    def forward_inference(self, x):
        """``forward`` for inference (no backward may follow; a decode step's): gate and up in one product when
        their weights are stacked in memory (``stacked_product``), else each its own; nothing kept."""
        self._check(x)
        x2 = x.reshape(-1, self.hidden_size)                                  # (N, d)
        kern = kernels_for(x2, self.backend)
        gu = stacked_product(kern, x2, self, self.gate_proj, self.up_proj)    # (N, 2I): gate, up side by side
        I = self.intermediate_size
        g, u = ((gu[:, :I], gu[:, I:]) if gu is not None
                else (self.gate_proj.forward_inference(x2), self.up_proj.forward_inference(x2)))   # (N, I) each
        self._cache = None
        return self.down_proj.forward_inference(kern.silu_and_mul(g, u)).reshape(x.shape)       # (..., d)

    def backward(self, dy):
        g, u, shape = self._need_cache()
        self._check_dy(dy, shape)
        self._cache = None
        dm = self.down_proj.backward(dy.reshape(-1, self.hidden_size))        # (N, I)
        dg, du = kernels_for(dm, self.backend).silu_and_mul_backward(dm, g, u)   # (N, I) each
        dx = self.gate_proj.backward(dg) + self.up_proj.backward(du)          # (N, d)
        return dx.reshape(shape)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}"
