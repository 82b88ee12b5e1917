"""The key/value cache of a decoder, for inference: prefill the prompt once, then one token per step.

Letters: L layers, B sequences, H_kv key/value heads, T_max positions, h = head_dim.

A step feeds T_new tokens (the whole prompt at prefill, 1 per decode step) at positions
P0 .. P0 + T_new − 1, P0 = ``length`` (the positions already cached). Each layer's attention
rotates its new q and k at those absolute positions, writes k and v into its slot here and
attends over all P0 + T_new cached keys. The padding mask is kept beside them, so a
left-padded prompt's padding stays invisible at every later step. A sliding-window layer
(Mistral, Qwen) caches every position too; its attention applies the window to them.

Memory: ``nbytes`` = 2 · L · B · H_kv · T_cap · h · itemsize bytes (keys and values; the
(B, T_cap) mask adds B · T_cap bytes), T_cap = ``capacity`` the positions allocated so far. A cache
made with ``capacity`` < ``max_length`` grows when a step needs more, to max(needed, 2 · T_cap) up to
``max_length`` (amortised one copy per position), so a generation that EOS cuts short holds only
what it used, not its whole ``max_new_tokens``. The demo's model, L = 4, B = 16, H_kv = 8, h = 32,
T_cap = 64, float32: 2 · 4 · 16 · 8 · 64 · 32 · 4 = 8,388,608 bytes (8 MiB).
"""
from __future__ import annotations

import numpy as np

from .device import get_array_module


class KVCache:
    """Rotated keys and values of every layer, k, v (L, B, H_kv, T_cap, h), filled left to right.

    One step: the model calls ``start(attention_mask, T_new)``, each layer i calls
    ``update(i, k, v)``, and the model calls ``advance(T_new)`` after the last layer.
    ``max_length`` bounds the positions; ``capacity`` (default ``max_length``) is how many to allocate
    now, the rest as steps need them.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int,
                 dtype="float32", xp=np, capacity: int | None = None):
        capacity = max_length if capacity is None else min(max(int(capacity), 1), max_length)
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.k = xp.zeros(shape, dtype)                        # (L, B, H_kv, T_cap, h)
        self.v = xp.zeros(shape, dtype)                        # (L, B, H_kv, T_cap, h)
        self.mask = xp.zeros((batch_size, capacity), bool)     # (B, T_cap): True = a real token, not padding
        self.length = 0                                        # P0: positions filled by earlier steps
        self.max_length = max_length

    @classmethod
    def for_model(cls, config, batch_size: int, max_length: int, dtype="float32", xp=np,
                  capacity: int | None = None) -> "KVCache":
        """A cache sized for a Llama ``config`` (num_hidden_layers, num_key_value_heads, head_dim)."""
        return cls(config.num_hidden_layers, batch_size, config.num_key_value_heads, config.head_dim, max_length,
                   dtype, xp, capacity)

    @property
    def capacity(self) -> int:
        """T_cap: the positions allocated (``length`` <= T_cap <= ``max_length``)."""
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """2 · L · B · H_kv · T_cap · h · itemsize: the keys and values."""
        return int(self.k.nbytes + self.v.nbytes)

    def start(self, attention_mask, T_new: int):
        """Begin a step of T_new tokens; ``attention_mask`` (B, T_new) of 0/1 or None (all tokens)."""
        B, end = self.mask.shape[0], self.length + T_new
        if end > self.max_length:
            raise ValueError(f"KVCache: {self.length} cached + {T_new} new positions exceed its max_length "
                             f"{self.max_length}")
        if end > self.capacity:
            self._grow(min(self.max_length, max(end, 2 * self.capacity)))
        if attention_mask is not None and tuple(attention_mask.shape) != (B, T_new):
            raise ValueError(f"KVCache: attention_mask must have shape (B, T_new) = ({B}, {T_new}) for the new "
                             f"tokens only (the cache keeps the earlier ones), got {tuple(attention_mask.shape)}")
        self.mask[:, self.length:end] = True if attention_mask is None else attention_mask != 0

    def update(self, layer: int, k, v):
        """Write layer ``layer``'s new k, v (B, H_kv, T_new, h) at P0..; return the cached ones
        (B, H_kv, P0 + T_new, h) each and the key mask (B, P0 + T_new)."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], self.mask[:, :end]

    def buffers(self, layer: int):
        """Layer ``layer``'s whole k, v (B, H_kv, T_cap, h) and the mask (B, T_cap), C-ordered: for a kernel that
        reads no key past the step's last position (causal_attention), so the buffers need no slicing copy."""
        return self.k[layer], self.v[layer], self.mask

    def _grow(self, capacity: int):
        """Reallocate k, v (L, B, H_kv, capacity, h) and the mask (B, capacity), keeping the P0 cached positions."""
        xp, P0 = get_array_module(self.k), self.length
        L, B, H_kv, _, h = self.k.shape
        for name in ("k", "v"):
            grown = xp.zeros((L, B, H_kv, capacity, h), self.k.dtype)
            grown[:, :, :, :P0] = getattr(self, name)[:, :, :, :P0]
            setattr(self, name, grown)
        mask = xp.zeros((B, capacity), bool)
        mask[:, :P0] = self.mask[:, :P0]
        self.mask = mask

    def advance(self, T_new: int):
        """End a step: the T_new new positions are cached."""
        self.length += T_new

    def __repr__(self):
        L, B, H_kv, T_cap, h = self.k.shape
        return (f"KVCache(layers={L}, batch={B}, kv_heads={H_kv}, max_length={self.max_length}, capacity={T_cap}, "
                f"head_dim={h}, length={self.length}, {self.nbytes:,d} bytes)")
