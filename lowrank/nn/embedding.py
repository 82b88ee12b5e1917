"""Token embedding: a row lookup forward, a scatter-add backward, never a dense one-hot.

Letters: B batch, T tokens, V = num_embeddings, d = embedding_dim; ``weight`` (V, d) as in
``torch.nn.Embedding``.

    y[b, t] = W[ids[b, t]]                      (B, T) ints -> (B, T, d)
    dW[v]   = Σ_{(b,t): ids[b,t] = v} dy[b, t]  (V, d), rows of unused tokens stay 0

The backward uses ``xp.add.at`` (NumPy's unbuffered scatter-add; ``cupy.add.at`` on the GPU,
CuPy ≥ 13): a repeated id adds every occurrence, which plain ``dW[ids] += dy`` would not,
and the work is O(B·T·d), not the O(B·T·V·d) of a one-hot matmul. A sorted segment sum
(argsort + reduceat) would give a fixed summation order, but CuPy has no ``reduceat`` and the
order only matters at the rounding level, so the scatter-add is the one written once on ``xp``.
The ids get no gradient: ``backward`` returns None.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .device import get_array_module
from .layers import check_dtype, initial
from .module import Module, Parameter


class EmbeddingCache(NamedTuple):
    ids: object        # (B, T) ints, kept only when dW is needed (trainable weight)
    shape: tuple       # (B, T, d), to check dy


class Embedding(Module):
    """y = W[ids]; ``weight`` (V, d) starts at N(0, 1) like ``torch.nn.Embedding``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype="float32", seed=None):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"Embedding: num_embeddings and embedding_dim must be >= 1, "
                             f"got {num_embeddings}, {embedding_dim}")
        dt = check_dtype("Embedding", dtype)
        rng = np.random.default_rng(seed)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        shape = (num_embeddings, embedding_dim)
        self.weight = Parameter(initial(shape, dt, lambda: rng.standard_normal(shape)))

    def check_ids(self, ids):
        """TypeError/ValueError naming this layer unless ``ids`` is an integer array of ids in [0, V)."""
        if not hasattr(ids, "dtype") or not np.issubdtype(np.dtype(ids.dtype), np.integer):
            raise TypeError(f"{self.label} expects an integer array of token ids, "
                            f"got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise ValueError(f"{self.label}: token ids must lie in [0, {self.num_embeddings}) "
                             f"(num_embeddings={self.num_embeddings}), got id {bad}")

    def forward(self, ids):
        self.check_ids(ids)
        y = self.weight.data[ids]                                          # (B, T, d)
        self._cache = EmbeddingCache(ids if self.weight.trainable else None, y.shape)
        return y

    def backward(self, dy):
        ids, shape = self._need_cache()
        self._check_dy(dy, shape)
        self._cache = None
        if ids is not None:
            xp = get_array_module(dy)
            dW = xp.zeros_like(self.weight.data)                           # (V, d)
            xp.add.at(dW, ids.reshape(-1), dy.reshape(-1, self.embedding_dim))   # rows += (B·T, d)
            self.weight.accumulate(dW)
        return None

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"
