"""What every LoRA layer keeps per adapter, as PEFT's LoraLayer does: the factors ``lora_A`` (r, D_in)
and ``lora_B`` (D_out, r), ParameterDicts keyed by adapter name, beside the tables ``r``,
``lora_alpha``, ``scaling`` and ``lora_dropout``. Checking a new adapter's arguments, recording
it, switching, deleting and s·B·A are written once here for LoRALinear and LoRAEmbedding (whose
``lora_A``/``lora_B`` name its ``lora_embedding_A``/``lora_embedding_B``).

    s = lora_alpha / r            (rsLoRA: lora_alpha / sqrt(r))
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from ...nn.module import Parameter, check_number
from .batches import BASE


class AdapterTables:
    """Mixed into a LoRA layer that sets ``lora_A``, ``lora_B``, ``r``, ``lora_alpha``, ``scaling``,
    ``lora_dropout``, ``merged_adapters`` and ``active_adapter`` in its ``__init__``."""

    def _check_adapter(self, adapter_name: str, r, lora_alpha, lora_dropout) -> tuple[str, int]:
        """(how errors name it, r as an int) for a new adapter; ValueError naming the layer otherwise."""
        where = f"{self.label} adapter {adapter_name!r}"
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"{where}: r must be an integer >= 1, got {r!r}")
        check_number(where, "lora_alpha", lora_alpha)
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"{where}: lora_dropout must lie in [0, 1), got {lora_dropout!r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"{where}: an adapter of that name already exists")
        if adapter_name == BASE:
            raise ValueError(f"{where}: {BASE!r} is reserved for 'no adapter' in mixed batches")
        return where, int(r)

    @staticmethod
    def _warn_rank(where: str, r: int, dims: str, min_dim: int):
        """r above the smaller side is legal (PEFT allows it), but s·B·A has rank <= that side."""
        if r > min_dim:
            warnings.warn(f"{where}: r={r} exceeds {dims} = {min_dim}; the update s·B·A has rank at most "
                          f"{min_dim}, so the extra ranks add parameters, not rank", UserWarning, stacklevel=3)

    @staticmethod
    def _scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
        return lora_alpha / (math.sqrt(r) if use_rslora else r)

    def _record(self, name: str, A, B, r: int, lora_alpha, lora_dropout, scaling: float):
        """Store adapter ``name``: its factors as trainable Parameters and its row of every table."""
        self.lora_A[name], self.lora_B[name] = Parameter(A), Parameter(B)
        self.r[name], self.lora_alpha[name] = r, lora_alpha
        self.scaling[name], self.lora_dropout[name] = scaling, float(lora_dropout)

    # -- adapter management -------------------------------------------------------------
    def set_adapter(self, name: str | None):
        """Make ``name`` the active adapter (None: the base alone)."""
        if name is not None and name not in self.lora_A:
            raise ValueError(f"{self.label}: no adapter {name!r}; it has {list(self.lora_A)}")
        self.active_adapter = name

    def delete_adapter(self, name: str):
        if name not in self.lora_A:
            raise ValueError(f"{self.label}: no adapter {name!r}; it has {list(self.lora_A)}")
        if name in self.merged_adapters:
            raise ValueError(f"{self.label}: adapter {name!r} is merged; unmerge it before deleting")
        for table in (self.lora_A, self.lora_B, self.r, self.lora_alpha, self.scaling, self.lora_dropout):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = next(iter(self.lora_A), None)

    def delta_weight(self, name: str, dtype=None):
        """s·B·A (D_out, D_in): what adapter ``name`` adds to the base map (computed in ``dtype``, default
        the factors'); for an embedding (d, V), the transpose of what merging adds to its weight."""
        A, B = self.lora_A[name].data, self.lora_B[name].data
        if dtype is not None:
            A, B = A.astype(dtype, copy=False), B.astype(dtype, copy=False)
        return self.scaling[name] * (B @ A)                      # (D_out, r) @ (r, D_in)
