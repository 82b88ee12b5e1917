"""Rotary position embedding (RoPE): the cos/sin tables, as transformers computes them.

Letters: T positions 0..T−1, h = head_dim (even), θ = rope_theta, j < h/2.

    inv_freq_j = θ^(−2j/h)                                   "default"
    inv_freq_j = θ^(−2j/h) / factor                          "linear" (positions divided by factor)
    "llama3" (Llama 3.1+), with λ_j = 2π / inv_freq_j, L = original_max_position_embeddings:
        λ_j < L / high_freq_factor: inv_freq_j;   λ_j > L / low_freq_factor: inv_freq_j / factor;
        else, s = (L / λ_j − low_freq_factor) / (high_freq_factor − low_freq_factor):
        (1 − s) · inv_freq_j / factor + s · inv_freq_j
    angles = pos ⊗ inv_freq (T, h/2);  cos, sin = cos(concat(angles, angles)), sin(...)  (T, h)

The tables are computed in the wider of float32 and the model's dtype, as transformers computes
them in float32 (a float64 transformers model narrows there; lowrank does not). The rotation by
them, forward and backward, is the kernels' ``rope_forward``/``rope_backward`` (its equations are in
kernels/reference/attention.py); LlamaAttention calls them on q and k and keeps the (T, h) tables
of its forward for its backward.
"""
from __future__ import annotations

import math

import numpy as np

from .module import Module

ROPE_TYPES = {             # rope_type -> the numbers it reads besides rope_theta (transformers' rope_parameters keys)
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def rope_inv_freq(head_dim: int, theta: float, dtype, xp=np, rope_type: str = "default", scaling: dict | None = None):
    """inv_freq (h/2,) in ``dtype`` for ``rope_type`` and its ``scaling`` numbers (the formulas above)."""
    inv_freq = 1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=dtype) / head_dim)   # (h/2,)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        L = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq                                              # (h/2,) λ_j
        s = (L / wavelen - low) / (high - low)
        scaled = xp.where(wavelen > L / low, inv_freq / factor, inv_freq)
        between = ~(wavelen < L / high) & ~(wavelen > L / low)
        return xp.where(between, (1 - s) * scaled / factor + s * scaled, scaled)
    raise ValueError(f"RoPE: rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")


def rope_tables(T: int, head_dim: int, theta: float, dtype, xp=np, rope_type: str = "default",
                scaling: dict | None = None):
    """(cos, sin), each (T, head_dim), in ``dtype``; computed in float32 or wider."""
    wide = np.promote_types(np.float32, dtype)
    inv_freq = rope_inv_freq(head_dim, theta, wide, xp, rope_type, scaling)         # (h/2,)
    angles = xp.arange(T, dtype=wide)[:, None] * inv_freq[None, :]                 # (T, h/2)
    emb = xp.concatenate([angles, angles], axis=-1)                                 # (T, h)
    return xp.cos(emb).astype(dtype), xp.sin(emb).astype(dtype)


class RotaryEmbedding(Module):
    """One attention layer's RoPE tables (transformers' ``LlamaRotaryEmbedding``); no parameters, no forward:
    the attention rotates q and k by ``tables(T, dtype)`` with the kernels and keeps those tables."""

    def __init__(self, head_dim: int, rope_theta: float = 10000.0, max_position_embeddings: int | None = None,
                 rope_type: str = "default", rope_scaling: dict | None = None):
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even and >= 2, got {head_dim}")
        if not rope_theta > 0:
            raise ValueError(f"RotaryEmbedding: rope_theta must be > 0, got {rope_theta}")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"RotaryEmbedding: rope_type {rope_type!r} is not supported; supported: "
                             f"{', '.join(ROPE_TYPES)}")
        if sorted(rope_scaling or ()) != sorted(ROPE_TYPES[rope_type]):
            raise ValueError(f"RotaryEmbedding: rope_type {rope_type!r} takes rope_scaling with exactly "
                             f"{list(ROPE_TYPES[rope_type])}, got {rope_scaling}")
        self.head_dim, self.rope_theta = head_dim, float(rope_theta)
        self.rope_type, self.rope_scaling = rope_type, rope_scaling
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
            self._tables[key] = rope_tables(n, self.head_dim, self.rope_theta, dtype, xp, self.rope_type,
                                            self.rope_scaling)
        cos, sin = self._tables[key]
        return cos[:T], sin[:T]

    def extra_repr(self):
        scaled = f", rope_type={self.rope_type!r}, {self.rope_scaling}" if self.rope_type != "default" else ""
        return f"head_dim={self.head_dim}, rope_theta={self.rope_theta}{scaled}"
