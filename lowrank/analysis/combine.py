"""Combining LoRA adapters: PEFT's ``add_weighted_adapter``, exactly or by truncated SVD.

Adapters i = 1..n on one layer, with weights w_i, add the update

    ΔW = Σ_i w_i · s_i · B_i A_i                                    (D_out, D_in)

"cat"  concatenate the factors, the weights and scalings folded into B:
           A = [A_1; …; A_n]                  (Σr_i, D_in)
           B = [w_1 s_1 B_1, …, w_n s_n B_n]  (D_out, Σr_i),   s = 1
       then s·B·A = ΔW exactly: rank Σ r_i, no approximation.
"svd"  the best rank-k approximation of the exact ΔW (lowrank.analysis.svd), s = 1:
           B = U_k √σ_k,  A = √σ_k V_kᵀ,   ‖ΔW − B A‖₂ = σ_{k+1},  ‖·‖_F = √Σ_{i>k} σ_i²
"linear" (PEFT's default) forms (Σ w_i B_i)(Σ w_i A_i) = Σ_ij w_i w_j B_i A_j, whose cross terms
       i ≠ j are no adapter's update; it is refused here.

The new adapter is added to each LoRA layer that holds any of the adapters (update_layer, then
its factors are set) and registered in the LoraModel's ``peft_config``. A module trained in
full per adapter (``modules_to_save``, e.g. a head) cannot be combined: with one of the
adapters owning a copy the new adapter gets a copy of it; with two or more it is an error,
as in PEFT.
"""
from __future__ import annotations

import copy
import re
from dataclasses import replace

import numpy as np

from ..nn.device import get_array_module
from .svd import truncated_svd

COMBINATIONS = ("cat", "svd")


def add_weighted_adapter(lora_model, adapters, weights, adapter_name: str, combination_type: str = "svd",
                         svd_rank: int | None = None) -> dict:
    """Add adapter ``adapter_name`` = Σ w_i · (adapter i); returns {layer: error row}.

    Error rows: {"rank", "spectral_error", "frobenius_error", "relative_error"} of the new
    s·B·A against the exact weighted sum (all 0 for "cat" up to rounding; the SVD tail for "svd").
    ``svd_rank`` defaults to the largest rank among the adapters (PEFT's default).
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check(lora_model, adapters, weights, adapter_name, combination_type)
    wrappers = _saved_module_owners(lora_model, adapters)
    plans = []                                        # every factor is computed before anything changes
    for name, layer in lora_model.lora_layers():
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.lora_A]
        if not present:
            continue
        exact = _exact_delta(layer, present)                                      # (D_out, D_in)
        if combination_type == "cat":
            A, B = _cat(layer, present)
        else:
            approx = truncated_svd(exact, svd_rank or max(layer.r[a] for a, _ in present))
            A, B = approx.C, approx.B                                             # (k, D_in), (D_out, k)
        plans.append((name, layer, A, B, _error_row(exact, B, A)))
    for name, layer, A, B, row in plans:
        layer.update_layer(adapter_name, r=row["rank"], lora_alpha=row["rank"], use_rslora=False)   # s = 1
        layer.lora_A[adapter_name].data = A.astype(layer.lora_A[adapter_name].dtype)
        layer.lora_B[adapter_name].data = B.astype(layer.lora_B[adapter_name].dtype)
    errors = {name: row for name, _, _, _, row in plans}
    for wrapper, owner in wrappers:
        wrapper.modules_to_save[adapter_name] = copy.deepcopy(wrapper.modules_to_save[owner])
    base = lora_model.peft_config[adapters[0]]
    pattern = {re.escape(n): row["rank"] for n, row in errors.items()}             # per-layer rank, alpha = r
    rank = max(row["rank"] for row in errors.values())
    lora_model.peft_config[adapter_name] = replace(base, r=rank, lora_alpha=rank, use_rslora=False,
                                                   target_modules=list(errors), rank_pattern=pattern,
                                                   alpha_pattern=dict(pattern))
    return errors


def _check(lora_model, adapters, weights, adapter_name, combination_type):
    if combination_type not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination_type must be one of {COMBINATIONS}, got "
                         f"{combination_type!r} ('linear' mixes cross terms B_i A_j that belong to no adapter)")
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"add_weighted_adapter: need one weight per adapter, got {len(adapters)} adapters "
                         f"and {len(weights)} weights")
    unknown = [a for a in adapters if a not in lora_model.peft_config]
    if unknown:
        raise ValueError(f"add_weighted_adapter: no adapter {unknown}; adapters: {list(lora_model.peft_config)}")
    if adapter_name in lora_model.peft_config:
        raise ValueError(f"add_weighted_adapter: adapter {adapter_name!r} already exists")


def _saved_module_owners(lora_model, adapters) -> list:
    """(wrapper, the one adapter with a trained copy in it); an error when several adapters have one."""
    owners = []
    for wrapper in lora_model._wrappers():
        have = [a for a in adapters if a in wrapper.modules_to_save]
        if len(have) > 1:
            raise ValueError(f"add_weighted_adapter: adapters {have} each train their own copy of "
                             f"{wrapper.original_module.label} (modules_to_save); such copies cannot be combined")
        if have:
            owners.append((wrapper, have[0]))
    return owners


def _exact_delta(layer, present):
    """Σ w_i s_i B_i A_i (D_out, D_in) in float64."""
    return sum(w * layer.delta_weight(a, np.float64) for a, w in present)


def _cat(layer, present):
    """A = [A_1; …; A_n] (Σr, D_in), B = [w_1 s_1 B_1, …] (D_out, Σr), in float64."""
    xp = get_array_module(layer.weight.data)
    A = xp.concatenate([xp.asarray(layer.lora_A[a].data, np.float64) for a, _ in present], axis=0)   # (Σr, D_in)
    B = xp.concatenate([w * layer.scaling[a] * xp.asarray(layer.lora_B[a].data, np.float64)
                        for a, w in present], axis=1)                                             # (D_out, Σr)
    if A.shape[0] > min(layer.in_features, layer.out_features):
        raise ValueError(f"add_weighted_adapter: 'cat' on {layer.label} needs rank {A.shape[0]} (the sum of "
                         f"the ranks) but the layer allows at most {min(layer.in_features, layer.out_features)}; "
                         f"use 'svd' with svd_rank")
    return A, B


def _error_row(exact, B, A) -> dict:
    """How far B·A (float64, before the cast to the layer's dtype) is from the exact sum."""
    xp = get_array_module(exact)
    err = exact - B @ A                                       # (D_out, D_in)
    total = float(xp.linalg.norm(exact))
    fro = float(xp.linalg.norm(err))
    return {"rank": int(A.shape[0]), "spectral_error": float(xp.linalg.norm(err, 2)), "frobenius_error": fro,
            "relative_error": fro / total if total > 0 else 0.0}
