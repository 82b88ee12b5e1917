"""Rotary position embedding (RoPE), transformers' Llama convention ("default" rope type).

Letters: T positions 0..T−1, h = head_dim (even), θ = rope_theta.

    inv_freq_j = θ^(−2j/h), j < h/2;   angles = pos ⊗ inv_freq  (T, h/2)
    emb = concat(angles, angles)  (T, h);   cos, sin = cos(emb), sin(emb)
    rotate_half(x) = concat(−x[..., h/2:], x[..., :h/2])
    y  = x cos + rotate_half(x) sin                 (rotation of each pair (j, j+h/2) by +angle)
    dx = dy cos − rotate_half(dy) sin               (rotate_half is skew: Rᵀ = −R; the rotation by −angle)

The tables are computed in the wider of float32 and the input's dtype, as transformers
computes them in float32 (a float64 transformers model narrows there; lowrank does not).
The rotation itself is a kernel (``lowrank.kernels``: ``rope_forward``, ``rope_backward``; the
reference's ``attention.py`` states it), so Numba runs it in one pass on the CPU.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .device import get_array_module
from .dispatch import kernels_for
from .module import Module


def rope_tables(T: int, head_dim: int, theta: float, dtype, xp=np):
    """(cos, sin), each (T, head_dim), in ``dtype``; angles computed in float32 or wider."""
    wide = np.promote_types(np.float32, dtype)
    inv_freq = 1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=wide) / head_dim)   # (h/2,)
    angles = xp.arange(T, dtype=wide)[:, None] * inv_freq[None, :]                 # (T, h/2)
    emb = xp.concatenate([angles, angles], axis=-1)                                 # (T, h)
    return xp.cos(emb).astype(dtype), xp.sin(emb).astype(dtype)


def rotate_half(x):
    """concat(−x2, x1) over the last axis, x = concat(x1, x2)."""
    xp = get_array_module(x)
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin, backend: str | None = None):
    """x (..., T, h) rotated by +angle: x cos + rotate_half(x) sin (the kernel API's ``rope_forward``)."""
    return kernels_for(x, backend).rope_forward(x, cos, sin)


def apply_rope_backward(dy, cos, sin, backend: str | None = None):
    """dy (..., T, h) rotated by −angle: the transpose of ``apply_rope``, dy cos − rotate_half(dy) sin."""
    return kernels_for(dy, backend).rope_backward(dy, cos, sin)


class RotaryCache(NamedTuple):
    cos: object        # (T, h)
    sin: object        # (T, h)
    shape: tuple       # x.shape, to check dy


class RotaryEmbedding(Module):
    """RoPE on x (..., T, h) at positions 0..T−1; no parameters (attention calls the functions)."""

    backend = None         # the kernel backend of the rotation (None: the global setting; see nn.dispatch)

    def __init__(self, head_dim: int, rope_theta: float = 10000.0, max_position_embeddings: int | None = None):
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even and >= 2, got {head_dim}")
        if not rope_theta > 0:
            raise ValueError(f"RotaryEmbedding: rope_theta must be > 0, got {rope_theta}")
        self.head_dim, self.rope_theta = head_dim, float(rope_theta)
        self.max_position_embeddings = max_position_embeddings
        self._tables = {}          # (dtype, array module) -> (cos, sin) of the longest T asked for so far

    def tables(self, T: int, dtype, xp=np):
        """(cos, sin) for positions 0..T−1; ValueError past ``max_position_embeddings``. Row t depends
        on t alone, so the longest tables computed so far are kept and sliced (every forward and every
        decode step asks for them)."""
        if self.max_position_embeddings is not None and T > self.max_position_embeddings:
            raise ValueError(f"{self.label}: sequence length {T} exceeds max_position_embeddings="
                             f"{self.max_position_embeddings}")
        key = (np.dtype(dtype), xp.__name__)
        have = len(self._tables[key][0]) if key in self._tables else 0
        if have < T:                      # grown geometrically: decoding asks for one more position per step
            n = max(T, 2 * have) if self.max_position_embeddings is None else min(max(T, 2 * have),
                                                                                 self.max_position_embeddings)
            self._tables[key] = rope_tables(n, self.head_dim, self.rope_theta, dtype, xp)
        cos, sin = self._tables[key]
        return cos[:T], sin[:T]

    def forward(self, x):
        if not hasattr(x, "shape") or x.ndim < 2 or x.shape[-1] != self.head_dim:
            raise ValueError(f"{self.label} expects input of shape (..., T, {self.head_dim}), "
                             f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        cos, sin = self.tables(x.shape[-2], x.dtype, get_array_module(x))
        self._cache = RotaryCache(cos, sin, x.shape)
        return apply_rope(x, cos, sin, self.backend)

    def backward(self, dy):
        cos, sin, shape = self._need_cache()
        self._check_dy(dy, shape)
        self._cache = None
        return apply_rope_backward(dy, cos, sin, self.backend)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, rope_theta={self.rope_theta}"
