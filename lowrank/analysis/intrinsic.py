"""Intrinsic dimension: train only z ∈ ℝᵈ, with every chosen parameter tied to it by a fixed
random projection (Li et al., 2018; Aghajanyan et al., 2020).

Letters: D the number of chosen parameters (flattened and concatenated in
``named_parameters`` order), d the subspace dimension, θ₀ (D,) their starting values.

    forward    θ = θ₀ + P z          P (D, d) fixed: dense Gaussian with unit-norm columns,
               y = f(x; θ)                         or Fastfood (lowrank.analysis.fastfood)
    backward   dθ = ∂L/∂θ             the wrapped model's own hand-written backward, flattened
               dz = Pᵀ dθ             (d,) = (d, D) @ (D,)

z starts at 0, so training starts exactly at the pretrained model. d90 is the smallest d
whose trained model reaches 90% of the accuracy of full fine-tuning.
"""
from __future__ import annotations

import time

import numpy as np

from ..nn.device import get_array_module
from ..nn.module import Module, Parameter
from .fastfood import Fastfood

DENSE_LIMIT = 1 << 24          # "auto" uses a dense P up to this many entries (D·d), Fastfood beyond


class DenseProjection:
    """P (D, d): N(0, 1) entries with each column scaled to unit norm, or a given ``matrix``."""

    def __init__(self, D: int, d: int, seed: int = 0, dtype=np.float32, xp=np, matrix=None):
        if matrix is None:
            if not 1 <= d <= D:
                raise ValueError(f"DenseProjection: need 1 <= d <= D, got d={d}, D={D}")
            P = np.random.default_rng(seed).standard_normal((D, d))
            matrix = P / np.linalg.norm(P, axis=0)                 # unit-norm columns
        elif tuple(matrix.shape) != (D, d):
            raise ValueError(f"DenseProjection: matrix has shape {tuple(matrix.shape)}, expected ({D}, {d})")
        self.P = xp.asarray(matrix, dtype=dtype)

    @property
    def shape(self) -> tuple:
        return tuple(self.P.shape)

    def matvec(self, z):
        """P z (D,)."""
        return self.P @ z                  # (D, d) @ (d,)

    def rmatvec(self, v):
        """Pᵀ v (d,): the backward of ``matvec``."""
        return self.P.T @ v                # (d, D) @ (D,)


def make_projection(kind: str, D: int, d: int, seed: int = 0, dtype=np.float32, xp=np):
    """"dense", "fastfood", or "auto" (dense while D·d <= DENSE_LIMIT)."""
    if kind == "auto":
        kind = "dense" if D * d <= DENSE_LIMIT else "fastfood"
    if kind == "dense":
        return DenseProjection(D, d, seed, dtype, xp)
    if kind == "fastfood":
        return Fastfood(D, d, seed, dtype, xp)
    raise ValueError(f"projection must be 'auto', 'dense' or 'fastfood', got {kind!r}")


class SubspaceModel(Module):
    """``model`` with its chosen parameters θ = θ₀ + P z; z (d,) is this module's only parameter.

    Parameters
    ----------
    model : Module        trained in place (its chosen parameters are overwritten with θ)
    d : int               subspace dimension
    names : list | None   parameter names (or dotted prefixes) to tie to z; None = all
    projection : str or object with ``shape``, ``matvec`` and ``rmatvec``
    """

    def __init__(self, model: Module, d: int, names=None, projection="auto", seed: int = 0):
        super().__init__()
        params = [(n, p) for n, p in model.named_parameters() if _chosen(n, names)]
        if not params:
            raise ValueError(f"SubspaceModel: names {names!r} match no parameter of {type(model).__name__}; "
                             f"its parameters: {[n for n, _ in model.named_parameters()]}")
        object.__setattr__(self, "model", model)                   # not a child: only z is trainable here
        model.requires_grad_(False)
        for _, p in params:
            p.trainable = True                                     # so the model's backward fills dθ
        self.params = params
        xp, dtype = get_array_module(params[0][1].data), params[0][1].dtype
        self.theta0 = [p.data.copy() for _, p in params]
        self.D = sum(p.size for _, p in params)
        self.P = projection if not isinstance(projection, str) else make_projection(projection, self.D, d, seed,
                                                                                     dtype, xp)
        if tuple(self.P.shape) != (self.D, d):
            raise ValueError(f"SubspaceModel: projection has shape {tuple(self.P.shape)}, expected ({self.D}, {d})")
        self.z = Parameter(xp.zeros(d, dtype))
        self._z_written = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)
        return self

    def materialize(self) -> Module:
        """Write θ = θ₀ + P z into the model (when z moved since the last write); returns it."""
        z = self.z.data
        xp = get_array_module(z)
        if self._z_written is not None and xp.array_equal(z, self._z_written):
            return self.model
        delta = self.P.matvec(z)                                   # (D,)
        start = 0
        for (_, p), theta0 in zip(self.params, self.theta0):
            p.data = theta0 + delta[start:start + p.size].reshape(p.shape).astype(p.dtype)
            start += p.size
        self._z_written = z.copy()
        return self.model

    def forward(self, x):
        return self.materialize().forward(x)

    def backward(self, dy):
        for _, p in self.params:
            p.grad = None
        dx = self.model.backward(dy)
        xp = get_array_module(dy)
        dtheta = xp.concatenate([(p.grad if p.grad is not None else xp.zeros(p.shape, p.dtype)).ravel()
                                 for _, p in self.params])         # (D,)
        self.z.accumulate(self.P.rmatvec(dtheta))                  # dz = Pᵀ dθ  (d,)
        return dx

    def extra_repr(self):
        return f"d={self.z.size}, D={self.D}, projection={type(self.P).__name__}"


def _chosen(name: str, names) -> bool:
    return names is None or any(name == n or name.startswith(n + ".") for n in names)


def intrinsic_sweep(make_model, train, evaluate, d_values, *, projection="auto", seed: int = 0,
                    names=None) -> list[dict]:
    """Train a SubspaceModel at each d; rows {d, accuracy, projection, seconds}.

    make_model()          a fresh copy of the pretrained model
    train(module)         trains ``module`` (a SubspaceModel) in place
    evaluate(module)      its accuracy on held-out data
    """
    rows = []
    for d in d_values:
        start = time.perf_counter()
        sub = SubspaceModel(make_model(), d, names=names, projection=projection, seed=seed)
        train(sub)
        rows.append({"d": int(d), "accuracy": float(evaluate(sub)), "projection": type(sub.P).__name__,
                     "seconds": time.perf_counter() - start})
    return rows


def d90(rows, full_accuracy: float, fraction: float = 0.9):
    """The smallest d whose accuracy reaches ``fraction`` × ``full_accuracy``; None when none does."""
    hits = [r["d"] for r in rows if r["accuracy"] >= fraction * full_accuracy]
    return min(hits) if hits else None
