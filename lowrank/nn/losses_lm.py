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
from .dispatch import kernels_for
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


class LinearCrossEntropyCache(NamedTuple):
    dx: object         # (B, T−1, d) the gradient of the hidden states, computed with the loss
    dW: object         # (V, d) the head weight's gradient, or None when it is frozen
    shape: tuple       # (B, T, d)


class LinearCrossEntropyLoss(Loss):
    """``CausalLMLoss`` of ``hidden Wᵀ`` without those logits: the LM head (weight W (V, d), tied or not)
    and the loss in one kernel (``linear_cross_entropy``), a chunk of rows at a time. The gradients come
    out of the forward's pass and are kept for ``backward``; W's only when it is trainable."""

    backend = None          # the kernel backend (None: the global setting; see nn.dispatch)

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, hidden, weight, labels, need_grad: bool = True):
        """hidden (B, T, d), ``weight`` the head's Parameter (V, d), labels (B, T) -> the mean loss (float)."""
        if getattr(hidden, "ndim", 0) != 3 or hidden.shape[-1] != weight.shape[1]:
            raise ValueError(f"LinearCrossEntropyLoss: hidden must be (B, T, {weight.shape[1]}), got "
                             f"{tuple(getattr(hidden, 'shape', ())) or type(hidden).__name__}")
        B, T, d = hidden.shape
        if not np.issubdtype(np.dtype(labels.dtype), np.integer) or tuple(labels.shape) != (B, T):
            raise TypeError(f"LinearCrossEntropyLoss: labels must be an integer array of shape ({B}, {T}) like "
                            f"the ids, got {labels.dtype} {tuple(labels.shape)}")
        x = hidden[:, :-1].reshape(-1, d)                                     # (B·(T−1), d), positions that predict
        target = labels[:, 1:].reshape(-1)                                    # (B·(T−1),)
        n = int((target != self.ignore_index).sum())
        if n == 0:
            raise ValueError(f"LinearCrossEntropyLoss: no label to predict: every label after the first is "
                             f"ignore_index={self.ignore_index} (or T = {T} < 2)")
        loss, dx, dW = kernels_for(x, self.backend).linear_cross_entropy(
            x, weight.data, target, 1.0 / n, self.ignore_index, need_grad, need_grad and weight.trainable)
        self._cache = LinearCrossEntropyCache(dx, dW, (B, T, d)) if need_grad else None
        self._weight = weight
        return float(loss) / n

    def backward(self):
        """d hidden (B, T, d) (the last position predicts nothing: 0); the weight's gradient accumulated."""
        dx, dW, (B, T, d) = self._need_cache()
        xp = get_array_module(dx)
        dhidden = xp.zeros((B, T, d), dx.dtype)
        dhidden[:, :-1] = dx.reshape(B, T - 1, d)
        self._weight.accumulate(dW)
        return dhidden
