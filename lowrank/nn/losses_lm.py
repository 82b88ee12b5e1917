"""The causal language-modelling loss: each position predicts the next token.

Letters: B batch, T tokens, V vocabulary. logits z (B, T, V), labels (B, T) ints; positions
t < T−1 predict labels[:, t+1]; a label of ``ignore_index`` (−100) is not counted; the mean
runs over the n counted tokens (as transformers' ``ForCausalLMLoss``):

    ℓ  = (1/n) Σ_counted logsumexp(z[b, t]) − z[b, t, labels[b, t+1]]
    dz[b, t] = (softmax(z[b, t]) − onehot(labels[b, t+1])) / n   for counted (b, t), else 0
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .device import get_array_module
from .losses import Loss


class CausalLMCache(NamedTuple):
    shifted: object    # (B, T−1, V) logits minus their row max
    log_z: object      # (B, T−1) log Σ exp(shifted)
    target: object     # (B, T−1) next-token labels, ignored ones set to 0
    counted: object    # (B, T−1) bool, the tokens in the mean
    n: int             # how many are counted
    shape: tuple       # (B, T, V)


class CausalLMLoss(Loss):
    """Shifted next-token cross-entropy on logits (B, T, V) and labels (B, T), mean over counted tokens."""

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits, labels):
        self._check(logits, labels)
        if logits.ndim != 3:
            raise ValueError(f"CausalLMLoss: logits must be (B, T, V), got shape {tuple(logits.shape)}")
        B, T, V = logits.shape
        if not np.issubdtype(np.dtype(labels.dtype), np.integer) or tuple(labels.shape) != (B, T):
            raise TypeError(f"CausalLMLoss: labels must be an integer array of shape ({B}, {T}) like the ids, "
                            f"got {labels.dtype} {tuple(labels.shape)}")
        xp = get_array_module(logits)
        target = labels[:, 1:]                                                # (B, T−1)
        counted = target != self.ignore_index
        bad = counted & ((target < 0) | (target >= V))
        if bool(bad.any()):
            raise ValueError(f"CausalLMLoss: labels must lie in [0, {V}) or be ignore_index={self.ignore_index}, "
                             f"got {int(target[bad][0])}")
        n = int(counted.sum())
        if n == 0:
            raise ValueError(f"CausalLMLoss: no label to predict: every label after the first is "
                             f"ignore_index={self.ignore_index} (or T = {T} < 2)")
        target = xp.where(counted, target, 0)
        z = logits[:, :-1]                                                    # (B, T−1, V)
        shifted = z - z.max(axis=-1, keepdims=True)
        log_z = xp.log(xp.exp(shifted).sum(axis=-1))                          # (B, T−1)
        picked = xp.take_along_axis(shifted, target[..., None], axis=-1)[..., 0]   # (B, T−1)
        self._cache = CausalLMCache(shifted, log_z, target, counted, n, logits.shape)
        return float(((log_z - picked) * counted).sum() / n)

    def backward(self):
        shifted, log_z, target, counted, n, shape = self._need_cache()
        xp = get_array_module(shifted)
        d = xp.exp(shifted - log_z[..., None])                                # softmax (B, T−1, V)
        rows = d.reshape(-1, shape[-1])                                       # (B·(T−1), V), a view
        rows[xp.arange(rows.shape[0]), target.reshape(-1)] -= 1
        dz = xp.zeros(shape, dtype=shifted.dtype)                 # (B, T, V); position T−1 predicts nothing
        dz[:, :-1] = d * (counted[..., None] / n)
        return dz
