"""Losses with mean reduction: ``forward(logits, target) -> float``, ``backward() -> dlogits``.

All three are stable for large logits (no exp of a large positive number).

    BCEWithLogits  ℓ = max(z, 0) − z·t + log(1 + e^{−|z|})       dz = (σ(z) − t) / n
    CrossEntropy   ℓ = logsumexp(z) − z_t                         dz = (softmax(z) − onehot(t)) / N
    MSE            ℓ = mean((y − t)²)                              dy = 2 (y − t) / n
"""
from __future__ import annotations

import numpy as np

from .device import get_array_module
from .layers import sigmoid
from .module import CallOrderError


class Loss:
    """Shared checks and the cache for the three losses below."""

    def __init__(self):
        self._cache = None

    def __call__(self, logits, target):
        return self.forward(logits, target)

    def _check(self, logits, target):
        name = type(self).__name__
        if not hasattr(logits, "dtype") or np.dtype(logits.dtype) not in (np.float32, np.float64):
            raise TypeError(f"{name}: logits must be a float32/float64 array, got "
                            f"{getattr(logits, 'dtype', type(logits).__name__)}")
        xp = get_array_module(logits)
        if logits.size == 0:
            raise ValueError(f"{name}: logits are empty")
        if not hasattr(target, "dtype") or not hasattr(target, "shape"):
            raise TypeError(f"{name}: target must be an array, got {type(target).__name__}")
        for what, a in (("logits", logits), ("target", target)):
            bad = int((~xp.isfinite(a)).sum()) if np.dtype(a.dtype).kind == "f" else 0
            if bad:
                raise ValueError(f"{name}: {what} must be finite, got {bad} NaN/Inf of {a.size} values")

    def _need_cache(self):
        if self._cache is None:
            raise CallOrderError(f"{type(self).__name__}: backward called before forward")
        cache, self._cache = self._cache, None
        return cache


class BCEWithLogitsLoss(Loss):
    """Binary cross-entropy on logits z (any shape) against targets t in [0, 1] (same shape)."""

    def forward(self, logits, target):
        self._check(logits, target)
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(f"BCEWithLogitsLoss: target shape {tuple(target.shape)} != logits shape "
                             f"{tuple(logits.shape)}")
        xp = get_array_module(logits)
        if bool((target < 0).any()) or bool((target > 1).any()):
            raise ValueError(f"BCEWithLogitsLoss: targets must lie in [0, 1], got values in "
                             f"[{float(target.min())}, {float(target.max())}]")
        z, t = logits, target.astype(logits.dtype)
        loss = xp.maximum(z, 0) - z * t + xp.log1p(xp.exp(-xp.abs(z)))
        self._cache = (z, t)
        return float(loss.mean())

    def backward(self):
        z, t = self._need_cache()
        return (sigmoid(z) - t) / z.size


class CrossEntropyLoss(Loss):
    """Softmax cross-entropy: logits (N, C), integer class targets (N,)."""

    def forward(self, logits, target):
        self._check(logits, target)
        if logits.ndim != 2:
            raise ValueError(f"CrossEntropyLoss: logits must be (N, C), got shape {tuple(logits.shape)}")
        N, C = logits.shape
        if not np.issubdtype(np.dtype(target.dtype), np.integer) or tuple(target.shape) != (N,):
            raise TypeError(f"CrossEntropyLoss: target must be an integer array of shape ({N},), "
                            f"got {target.dtype} {tuple(target.shape)}")
        if int(target.min()) < 0 or int(target.max()) >= C:
            raise ValueError(f"CrossEntropyLoss: class targets must lie in [0, {C}), "
                             f"got [{int(target.min())}, {int(target.max())}]")
        xp = get_array_module(logits)
        shifted = logits - logits.max(axis=1, keepdims=True)       # (N, C), max 0 per row
        log_z = xp.log(xp.exp(shifted).sum(axis=1))                # (N,)
        rows = xp.arange(N)
        self._cache = (shifted, log_z, target)
        return float((log_z - shifted[rows, target]).mean())

    def backward(self):
        shifted, log_z, target = self._need_cache()
        xp = get_array_module(shifted)
        N = shifted.shape[0]
        d = xp.exp(shifted - log_z[:, None])                       # softmax (N, C)
        d[xp.arange(N), target] -= 1
        return d / N


class MSELoss(Loss):
    """Mean squared error between predictions and targets of the same shape."""

    def forward(self, pred, target):
        self._check(pred, target)
        if tuple(target.shape) != tuple(pred.shape):
            raise ValueError(f"MSELoss: target shape {tuple(target.shape)} != prediction shape {tuple(pred.shape)}")
        diff = pred - target.astype(pred.dtype)
        self._cache = diff
        return float((diff * diff).mean())

    def backward(self):
        diff = self._need_cache()
        return 2 * diff / diff.size
