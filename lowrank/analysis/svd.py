"""Truncated SVD: the best rank-r approximation W ≈ B·C, what it stores and what it loses.

Letters: W (p, q), rank r ≤ min(p, q), singular values σ₁ ≥ σ₂ ≥ … ≥ σ_min(p,q) ≥ 0.

    W = U Σ Vᵀ                       U (p, k), Σ = diag(σ), V (q, k), k = min(p, q)
    B = U_r · diag(√σ_r)  (p, r)     C = diag(√σ_r) · V_rᵀ  (r, q)      (σ split evenly)
    storage   p·r + r·q  numbers instead of p·q
    Eckart–Young: B·C is the best rank-r approximation in both norms, and
        ‖W − B·C‖₂ = σ_{r+1}        ‖W − B·C‖_F = √(Σ_{i>r} σ_i²)
    energy kept  Σ_{i≤r} σ_i² / Σ σ_i²  =  1 − (‖W − B·C‖_F / ‖W‖_F)²

Everything is computed in float64 on the array module of W (NumPy or CuPy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..nn.device import get_array_module


@dataclass
class LowRankApprox:
    """W ≈ B·C at rank r, with what it costs and what it loses."""

    B: object                 # (p, r) = U_r √σ_r
    C: object                 # (r, q) = √σ_r V_rᵀ
    singular_values: object   # (min(p, q),) all of W's, descending
    r: int
    shape: tuple              # (p, q)

    @property
    def storage(self) -> int:
        """p·r + r·q numbers."""
        p, q = self.shape
        return p * self.r + self.r * q

    @property
    def dense_storage(self) -> int:
        """p·q numbers."""
        return self.shape[0] * self.shape[1]

    @property
    def compression(self) -> float:
        """p·q / (p·r + r·q): how many times smaller the factors are."""
        return self.dense_storage / self.storage

    @property
    def spectral_error(self) -> float:
        """‖W − B·C‖₂ = σ_{r+1} (0 at full rank)."""
        tail = self.singular_values[self.r:]
        return float(tail[0]) if len(tail) else 0.0

    @property
    def frobenius_error(self) -> float:
        """‖W − B·C‖_F = √(Σ_{i>r} σ_i²)."""
        return float(np.sqrt(float((self.singular_values[self.r:] ** 2).sum())))

    @property
    def relative_error(self) -> float:
        """‖W − B·C‖_F / ‖W‖_F (0 for W = 0)."""
        total = float(np.sqrt(float((self.singular_values ** 2).sum())))
        return self.frobenius_error / total if total > 0 else 0.0

    @property
    def energy(self) -> float:
        """Σ_{i≤r} σ_i² / Σ σ_i² (1 for W = 0)."""
        return 1.0 - self.relative_error ** 2

    def matrix(self):
        """B·C (p, q)."""
        return self.B @ self.C            # (p, r) @ (r, q)


def _check_matrix(W, who: str):
    if getattr(W, "ndim", None) != 2:
        raise ValueError(f"{who}: expected a 2-D matrix, got shape {tuple(getattr(W, 'shape', ()))}")


def truncated_svd(W, r: int) -> LowRankApprox:
    """The best rank-``r`` approximation of ``W`` (p, q) as factors B (p, r), C (r, q)."""
    _check_matrix(W, "truncated_svd")
    k = min(W.shape)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= k:
        raise ValueError(f"truncated_svd: r must be an integer in [1, min(p, q)] = [1, {k}] "
                         f"for W of shape {tuple(W.shape)}, got {r!r}")
    xp = get_array_module(W)
    U, S, Vt = xp.linalg.svd(xp.asarray(W, dtype=np.float64), full_matrices=False)
    root = xp.sqrt(S[:int(r)])
    return LowRankApprox(B=U[:, :r] * root, C=root[:, None] * Vt[:r], singular_values=S, r=int(r),
                         shape=tuple(W.shape))


def choose_rank(W_or_sigma, *, rel_error: float | None = None, energy: float | None = None) -> int:
    """The smallest r whose truncation meets the target: ‖W − W_r‖_F / ‖W‖_F ≤ ``rel_error``,
    or Σ_{i≤r} σ_i² / Σ σ_i² ≥ ``energy``. Give exactly one target; accepts W or its σ."""
    if (rel_error is None) == (energy is None):
        raise ValueError("choose_rank: give exactly one of rel_error or energy")
    target = energy if energy is not None else 1.0 - rel_error ** 2
    name, value = ("energy", energy) if energy is not None else ("rel_error", rel_error)
    if not 0 <= value <= 1:
        raise ValueError(f"choose_rank: {name} must lie in [0, 1], got {value!r}")
    sigma = W_or_sigma if getattr(W_or_sigma, "ndim", 1) == 1 else singular_values(W_or_sigma)
    sigma = np.asarray(sigma.get() if hasattr(sigma, "get") else sigma, dtype=np.float64)
    total = float((sigma ** 2).sum())
    if total == 0:
        return 1
    kept = np.cumsum(sigma ** 2) / total                      # energy kept at r = 1, 2, ...
    tol = 1e-12
    return int(min(np.searchsorted(kept, target - tol) + 1, len(sigma)))


def singular_values(W):
    """σ (min(p, q),) of ``W`` in float64, descending."""
    _check_matrix(W, "singular_values")
    xp = get_array_module(W)
    return xp.linalg.svd(xp.asarray(W, dtype=np.float64), compute_uv=False)
