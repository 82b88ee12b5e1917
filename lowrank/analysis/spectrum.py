"""The spectrum of what fine-tuning learns: ΔW = W_finetuned − W_pretrained, or s·B·A for LoRA.

For a matrix M with singular values σ₁ ≥ … ≥ σ_k ≥ 0:

    stable rank      ‖M‖_F² / ‖M‖₂² = Σ σ_i² / σ₁²            (1 ≤ · ≤ rank M)
    effective rank   exp(H(p)),  p_i = σ_i / Σ σ_j,  H(p) = −Σ p_i log p_i
                     (Roy & Vetterli, 2007; 0·log 0 = 0; 1 ≤ · ≤ rank M)
    captured at r    ‖M_r‖_F² / ‖M‖_F² = Σ_{i≤r} σ_i² / Σ σ_i²   (M_r the rank-r truncation)

Both ranks equal n for n equal singular values and 1 for a rank-1 matrix; they measure
how many directions carry the update, where the algebraic rank counts every direction
above rounding. Everything is computed in float64.
"""
from __future__ import annotations

import numpy as np

from ..nn.device import get_array_module
from ..tuners.lora.layer import LoraLinear
from ..nn.module import Module
from .svd import singular_values

__all__ = ["singular_values", "stable_rank", "effective_rank", "captured_fraction", "full_deltas",
           "lora_deltas", "spectrum_rows"]


def _sigma(M_or_sigma):
    """σ as a float64 NumPy vector, from a matrix or from σ itself."""
    s = M_or_sigma if getattr(M_or_sigma, "ndim", 1) == 1 else singular_values(M_or_sigma)
    return np.asarray(s.get() if hasattr(s, "get") else s, dtype=np.float64)


def stable_rank(M) -> float:
    """Σ σ_i² / σ₁² of a matrix (or of its σ); 0 for the zero matrix."""
    s = _sigma(M)
    return float((s ** 2).sum() / s[0] ** 2) if s.size and s[0] > 0 else 0.0


def effective_rank(M) -> float:
    """exp(entropy of σ / Σσ) of a matrix (or of its σ); 0 for the zero matrix."""
    s = _sigma(M)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def captured_fraction(M, r: int) -> float:
    """Σ_{i≤r} σ_i² / Σ σ_i²: the share of ‖M‖_F² kept by its best rank-r approximation."""
    s = _sigma(M)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"captured_fraction: r must be a positive integer, got {r!r}")
    total = (s ** 2).sum()
    return float((s[:r] ** 2).sum() / total) if total > 0 else 1.0


def _weight(module: Module):
    """The dense weight of a Dense or of a LoraLinear's base layer."""
    return module.base_layer.weight.data if isinstance(module, LoraLinear) else module.weight.data


def full_deltas(finetuned: Module, pretrained: Module, names) -> dict:
    """{name: W_finetuned − W_pretrained (D_out, D_in)} in float64, for the layers ``names``."""
    out = {}
    for name in names:
        W1, W0 = _weight(finetuned.get_submodule(name)), _weight(pretrained.get_submodule(name))
        if W1.shape != W0.shape:
            raise ValueError(f"full_deltas: layer {name!r} has weight shape {tuple(W1.shape)} after "
                             f"fine-tuning, expected {tuple(W0.shape)} as before")
        xp = get_array_module(W1)
        out[name] = xp.asarray(W1, dtype=np.float64) - xp.asarray(W0, dtype=np.float64)
    return out


def lora_deltas(lora_model, adapter: str | None = None) -> dict:
    """{layer name: s·B·A (D_out, D_in)} in float64 for ``adapter`` (default: the active one)."""
    adapter = adapter or lora_model.active_adapter
    out = {}
    for name, layer in lora_model.lora_layers():
        if adapter in layer.lora_A:
            out[name] = layer.delta_weight(adapter, np.float64)
    if not out:
        raise ValueError(f"lora_deltas: no LoRA layer holds adapter {adapter!r}")
    return out


def spectrum_rows(deltas: dict, method: str, ranks=(1, 2, 4, 8)) -> list[dict]:
    """One table row per layer: shape, ‖ΔW‖_F, stable and effective rank, captured fraction at ``ranks``."""
    rows = []
    for name, M in deltas.items():
        s = _sigma(M)
        rows.append({"method": method, "layer": name, "shape": tuple(M.shape),
                     "fro_norm": float(np.sqrt((s ** 2).sum())), "stable_rank": stable_rank(s),
                     "effective_rank": effective_rank(s),
                     **{f"captured@{r}": captured_fraction(s, r) for r in ranks}})
    return rows
