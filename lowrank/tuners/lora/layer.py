"""The LoRA layers: ``AdapterTables``, what every LoRA layer keeps per adapter, and ``LoraLinear``, a frozen
base layer plus trainable low-rank adapters, y = x Wᵀ + b + s·B·A·x.

Letters: N rows, D_in, D_out, r rank.

    lora_A[name] (r, D_in)    lora_B[name] (D_out, r)    scaling[name] = lora_alpha / r   (/ √r with rsLoRA)

The forward and backward equations, with their shapes, are stated once, in the reference kernels
(``lora_forward``/``lora_backward`` in kernels/reference/lora.py, the mixed-batch ones in
kernels/reference/multi.py); this file picks the kernel and keeps what its backward needs
(``LoraCache``): the input x (N, D_in) and h = (x ⊙ mask) Aᵀ (N, r) for dA and dB, and the dropout
mask. W gets no gradient: the base is frozen, so the layer keeps no dW buffer and Adam no state for it.
Merging folds s·B·A into W (zero added latency) and the forward is the base product alone; only in
training mode with a trainable factor does it still compute h and keep x, so that dA, dB equal the
unmerged layer's. In eval mode, or with both factors frozen, it keeps nothing beyond the base's own
cache and the backward gives dx alone. Dropout applies to the LoRA branch's input only.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np

from ...nn.device import get_array_module
from ...nn.dispatch import kernels_for
from ...nn.layers import Dense, kaiming_uniform
from ...nn.module import Module, Parameter, ParameterDict, check_number
from .config import INIT_MODES, check_init_lora_weights, check_rank
from .mixed import BASE, mixed_plan, rows_for


class AdapterTables(Module):
    """Base of the LoRA layers; holds several named adapters, as PEFT's LoraLayer does, one active at a
    time or none (the base alone). Its ``__init__`` makes the tables, keyed by adapter name: the factors
    (``lora_A``/``lora_B``, ParameterDicts under the names in ``factor_names``) and ``r``, ``lora_alpha``,
    ``scaling``, ``lora_dropout``. Checking a new adapter's arguments, recording it, switching,
    deleting and s·B·A are written here once for LoraLinear and LoraEmbedding."""

    factor_names = ("lora_A", "lora_B")     # LoraEmbedding: PEFT's lora_embedding_A, lora_embedding_B

    # Set from outside for one mixed batch (``mixed.mixed_batch``, by LoraModel.forward/generate): one
    # adapter name per sequence, which the layer spreads over its rows (``mixed.rows_for``); None otherwise.
    row_adapters = None
    # Set from outside while the weights can't change (``mixed.frozen_stacks``, by LoraModel.generate): a dict
    # of the layer's MixedPlans, built once per set of adapters; None otherwise.
    stack_cache = None

    def __init__(self, base: Module, adapter_name: str, seed):
        super().__init__()
        self._set_path(base._path)                 # errors name the layer being replaced, e.g. '4'
        self.base_layer = base
        for name in self.factor_names:
            setattr(self, name, ParameterDict())
        self.r, self.lora_alpha, self.scaling, self.lora_dropout = {}, {}, {}, {}
        self.merged_adapters: list[str] = []
        self.active_adapter: str | None = adapter_name
        self._rng = np.random.default_rng(seed)

    def _add_first_adapter(self, adapter_name: str, *settings):
        """``update_layer`` for the adapter the layer is built with; a rejected one leaves the base as it was."""
        base = self.base_layer
        try:
            self.update_layer(adapter_name, *settings)
        except (ValueError, TypeError):
            base._set_path(self._path)
            raise
        base.requires_grad_(False)

    merged = property(lambda self: bool(self.merged_adapters))

    def _check_adapter(self, adapter_name: str, r, lora_alpha, lora_dropout, init_lora_weights,
                       init_modes, why: str = "") -> tuple[str, int]:
        """(how errors name it, r as an int) for a new adapter; ValueError naming the layer otherwise."""
        where = f"{self.label} adapter {adapter_name!r}"
        check_init_lora_weights(where, init_lora_weights, init_modes, why)
        r = check_rank(where, "r", r)
        check_number(where, "lora_alpha", lora_alpha)
        if not 0 <= lora_dropout < 1:
            raise ValueError(f"{where}: lora_dropout must lie in [0, 1), got {lora_dropout!r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"{where}: an adapter of that name already exists")
        if adapter_name == BASE:
            raise ValueError(f"{where}: {BASE!r} is reserved for 'no adapter' in mixed batches")
        return where, r

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


class LoraCache(NamedTuple):
    x: object              # (N, D_in) input, None when no adapter gradient needs it
    h: object              # (N, r) = (x ⊙ mask) Aᵀ, None when no adapter gradient needs it
    mask: object           # (N, D_in) dropout mask / keep-prob, or None
    adapter: str | None    # the adapter that was active
    fused: bool            # True: one lora_forward kernel did base + LoRA
    rows: int              # N, to check dy


class MixedCache(NamedTuple):
    x: object              # (N, D_in)
    h: object              # (N, r_max) per-row adapter activations
    index: object          # (N,) position of each row's adapter in ``names``, −1 = base
    names: list            # adapters in stack order
    A_stack: object        # (K, r_max, D_in) zero-padded
    B_stack: object        # (K, D_out, r_max) zero-padded
    scalings: object       # (K,)


class LoraLinear(AdapterTables):
    """A Dense-like base (frozen) with LoRA adapters; the math: ``lora_forward``/``lora_backward`` in
    kernels/reference/lora.py, what it keeps for the backward: the module docstring."""

    def __init__(self, base: Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights=True, *, adapter_name: str = "default",
                 seed=None, backend: str | None = None):
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise TypeError(f"LoraLinear: base must be a Dense-like layer with in_features/out_features, "
                            f"got {type(base).__name__}")
        super().__init__(base, adapter_name, seed)
        self.backend = backend
        self._add_first_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    # -- PEFT-style accessors ---------------------------------------------------------
    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    @property
    def _fusable(self) -> bool:
        """True when the base is a plain dense product the fused kernel can do."""
        return isinstance(self.base_layer, Dense)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights=True):
        """Add adapter ``adapter_name`` (PEFT's name for this method); validates everything first."""
        D_in, D_out = self.in_features, self.out_features
        where, r = self._check_adapter(adapter_name, r, lora_alpha, lora_dropout, init_lora_weights, INIT_MODES)
        if init_lora_weights == "pissa" and r > min(D_in, D_out):
            raise ValueError(f"{where}: PiSSA init needs r <= min(D_in, D_out) = {min(D_in, D_out)} (W has only "
                             f"that many singular triplets), got r={r}; use a smaller r or another init")
        self._warn_rank(where, r, "min(D_in, D_out)", min(D_in, D_out))
        scaling = self._scaling(r, lora_alpha, use_rslora)
        W = self.base_layer.weight
        xp, dtype = get_array_module(W.data), W.dtype
        if init_lora_weights == "pissa":
            A, B = self._pissa(r, scaling, where)
        else:
            A = (kaiming_uniform(self._rng, (r, D_in), D_in, dtype) if init_lora_weights != "gaussian"
                 else self._rng.normal(0.0, 1.0 / r, (r, D_in)).astype(dtype))   # PEFT: std = 1/r
            B = (np.zeros((D_out, r), dtype) if init_lora_weights is not False
                 else kaiming_uniform(self._rng, (D_out, r), r, dtype))
        self._record(adapter_name, xp.asarray(A), xp.asarray(B), r, lora_alpha, lora_dropout, scaling)

    def _pissa(self, r, scaling, where):
        """PiSSA: A, B from the top-r SVD of W; the frozen base keeps the residual W − s·B·A.

        Needs r <= min(D_in, D_out): W has no more singular triplets. ``update_layer`` raises a
        ValueError naming the layer for a larger r rather than padding A, B with zeros (zero rows of
        A and columns of B get zero gradients, so they would stay zero: a silently smaller rank).
        """
        if not self._fusable or self.merged:
            raise ValueError(f"{where}: PiSSA init needs an unmerged dense base layer")
        W = self.base_layer.weight
        xp = get_array_module(W.data)
        U, S, Vt = xp.linalg.svd(W.data.astype(np.float64), full_matrices=False)
        root = xp.sqrt(S[:r] / scaling)                     # divide S_r by s, split it evenly
        B = U[:, :r] * root                                 # (D_out, r)
        A = root[:, None] * Vt[:r]                          # (r, D_in)
        W.data = (W.data - scaling * (B @ A)).astype(W.dtype)
        return A.astype(W.dtype), B.astype(W.dtype)

    def merge(self, adapter_names=None):
        """W ← W + s·B·A for each adapter (default: the active one). Zero added inference latency."""
        names = [self.active_adapter] if adapter_names is None else list(adapter_names)
        if not self._fusable:
            raise TypeError(f"{self.label}: merge needs a dense base; for a 4-bit base use "
                            f"lowrank.tuners.lora.qlora.merge_nf4 (or LoraModel.merge_and_unload)")
        unknown = [n for n in names if n is not None and n not in self.lora_A]
        if unknown:                                # checked first: a failing merge changes nothing
            raise ValueError(f"{self.label}: no adapter {unknown[0]!r}; it has {list(self.lora_A)}")
        for name in names:
            if name is None or name in self.merged_adapters:
                continue
            self._merge_one(name)
            self.merged_adapters.append(name)

    def unmerge(self):
        """Undo every merge. W comes back to rounding only; for one merged adapter, per element

            |W_unmerged − W| <= min(eps · |W + s·B·A|, 2 · |s·B·A|)      (eps of W's dtype)

        since W + s·B·A and then its difference with s·B·A are each rounded to a float no
        farther away than W itself (tests/tuners/test_lora_layer.py). With several merged adapters
        each merge and unmerge adds one rounding.
        """
        while self.merged_adapters:
            self._unmerge_one(self.merged_adapters.pop())

    def _merge_one(self, name: str):
        """W ← W + s·B·A (a DoRA layer overrides this pair)."""
        W = self.base_layer.weight
        W.data = W.data + self.delta_weight(name).astype(W.dtype)

    def _unmerge_one(self, name: str):
        """W ← W − s·B·A."""
        W = self.base_layer.weight
        W.data = W.data - self.delta_weight(name).astype(W.dtype)

    # -- forward / backward -------------------------------------------------------------
    def _dropout_mask(self, x, name):
        p = self.lora_dropout[name]
        if not self.training or p == 0:
            return None
        keep = self._rng.random(x.shape) >= p
        return get_array_module(x).asarray(keep / (1 - p), dtype=x.dtype)   # (N, D_in)

    def forward(self, x, adapter_names=None):
        """y (N, D_out). ``adapter_names``: one name per row for a mixed batch ("__base__" = none)."""
        self._check_input(x, self.in_features, self.weight.dtype)
        if adapter_names is not None:
            return self._forward_mixed(x, adapter_names, strict=True)
        if self.row_adapters is not None:        # from LoraModel, which checks names model-wide
            return self._forward_mixed(x, rows_for(self.row_adapters, x.shape[0], self.label), strict=False)
        a = self.active_adapter
        k = kernels_for(x, self.backend)
        if a is not None and a not in self.merged_adapters and self._fusable:
            mask = self._dropout_mask(x, a)
            b = self.bias.data if self.bias is not None else None
            y, h = k.lora_forward(x, self.weight.data, self.lora_A[a].data, self.lora_B[a].data,
                                  self.scaling[a], b, mask)
            self._cache = LoraCache(x, h, mask, a, fused=True, rows=x.shape[0])
            return y
        y = self.base_layer.forward(x)                 # the base alone, merged adapters included
        h = mask = None
        if a is not None and a in self.merged_adapters:
            if self.training and (self.lora_A[a].trainable or self.lora_B[a].trainable):
                h = k.matmul(x, self.lora_A[a].data.T)   # (N, D_in) @ (D_in, r), for dA and dB only
        elif a is not None:
            mask = self._dropout_mask(x, a)
            y_lora, h = k.lora_forward(x, None, self.lora_A[a].data, self.lora_B[a].data, self.scaling[a],
                                       None, mask)
            y += y_lora
        self._cache = LoraCache(x if h is not None else None, h, mask, a, fused=False, rows=x.shape[0])
        return y

    def backward(self, dy):
        cache = self._need_cache()
        self._cache = None
        if isinstance(cache, MixedCache):
            self._check_dy(dy, (cache.x.shape[0], self.out_features))
            return self._backward_mixed(dy, cache)
        self._check_dy(dy, (cache.rows, self.out_features))
        k, a = kernels_for(dy, self.backend), cache.adapter
        if cache.fused:
            dx, dA, dB = k.lora_backward(dy, cache.x, cache.h, self.weight.data, self.lora_A[a].data,
                                         self.lora_B[a].data, self.scaling[a], True, cache.mask)
            self._base_param_grads(k, dy, cache.x)
        else:
            dx = self.base_layer.backward(dy)          # dy W, with W holding any merged adapters
            if cache.h is None:                        # no adapter, or a merged one nobody trains now
                return dx
            merged = a in self.merged_adapters
            dx_lora, dA, dB = k.lora_backward(dy, cache.x, cache.h, None, self.lora_A[a].data,
                                              self.lora_B[a].data, self.scaling[a], not merged, cache.mask)
            if not merged:
                dx = dx + dx_lora
        self.lora_A[a].accumulate(dA)
        self.lora_B[a].accumulate(dB)
        return dx

    def _base_param_grads(self, k, dy, x):
        """dW and db of a fused dense base, only for those of its parameters that are trainable."""
        need_dW = self.weight.trainable
        need_db = self.bias is not None and self.bias.trainable
        if need_dW or need_db:
            _, dW, db = k.dense_backward(dy, x, self.weight.data, False, need_dW, need_db)
            self.weight.accumulate(dW)
            if need_db:
                self.bias.accumulate(db)

    # -- mixed batches (Punica's BGMV): row i uses adapter adapter_names[i] ------------------
    def _forward_mixed(self, x, adapter_names, strict: bool):
        """strict=False: rows whose adapter this layer lacks use the base alone."""
        N = x.shape[0]
        if len(adapter_names) != N:
            raise ValueError(f"{self.label}: adapter_names has {len(adapter_names)} entries for {N} rows")
        if self.merged_adapters:
            raise ValueError(f"{self.label}: mixed-adapter batches need unmerged adapters; "
                             f"merged: {self.merged_adapters}")
        if not self._fusable:
            raise TypeError(f"{self.label}: mixed-adapter batches need a dense base layer")
        plan = mixed_plan(self, tuple(adapter_names), strict, x.dtype, get_array_module(x))
        b, k = (self.bias.data if self.bias is not None else None), kernels_for(x, self.backend)
        if plan.segments is not None:      # runs of rows (a prefill's B·T sequence-major rows): SGMV
            y, h = k.lora_forward_sgmv(x, self.weight.data, plan.A_stack, plan.B_stack, plan.scalings,
                                       *plan.segments, b)
        else:                              # scattered rows (a decode step: one row per sequence): BGMV
            y, h = k.lora_forward_multi(x, self.weight.data, plan.A_stack, plan.B_stack, plan.scalings,
                                        plan.index, b)
        self._cache = MixedCache(x, h, plan.index, plan.names, plan.A_stack, plan.B_stack, plan.scalings)
        return y

    def _backward_mixed(self, dy, c: MixedCache):
        k = kernels_for(dy, self.backend)
        dx, dA_stack, dB_stack = k.lora_backward_multi(dy, c.x, c.h, self.weight.data, c.A_stack, c.B_stack,
                                                       c.scalings, c.index, True)
        for i, n in enumerate(c.names):
            self.lora_A[n].accumulate(dA_stack[i, :self.r[n]])
            self.lora_B[n].accumulate(dB_stack[i, :, :self.r[n]])
        self._base_param_grads(k, dy, c.x)
        return dx

    def extra_repr(self):
        ads = ", ".join(f"{n}: r={self.r[n]}, alpha={self.lora_alpha[n]}" for n in self.lora_A)
        return f"{self.in_features} -> {self.out_features}, adapters {{{ads}}}, active={self.active_adapter!r}"
