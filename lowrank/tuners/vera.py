"""VeRA (Kopiczko et al. 2024): one frozen random pair A, B shared by every layer; each layer
trains two vectors only.

Letters: N rows, D_in, D_out, r rank. The shared projections are drawn once from
``projection_prng_key`` at the largest targeted sizes, and each layer takes its slice:

    vera_A (r, D_in_max)   vera_B (D_out_max, r)         frozen, shared (PEFT's names)
    A = vera_A[:, :D_in]   B = vera_B[:D_out, :]          (r, D_in), (D_out, r)
    y = x Wᵀ + b + λ_b ⊙ (B (λ_d ⊙ (A x)))                 λ_d = vera_lambda_d (r,), λ_b = vera_lambda_b (D_out,)

That is LoRA with scaled factors A' = λ_d ⊙ A (rows of A) and B' = λ_b ⊙ B (rows of B),
s = 1, so the fused LoRA kernels do the products, and the backward is the chain rule on top:
    dA', dB', dx = lora_backward(dy, ...)       (r, D_in), (D_out, r), (N, D_in)
    dλ_d = rowsum(dA' ⊙ A)                      (r,)
    dλ_b = rowsum(dB' ⊙ B)                      (D_out,)
λ_b starts at 0 (the model starts at the base), λ_d at ``d_initial`` = 0.1 (PEFT's default).
Trainable parameters: Σ over adapted layers of r + D_out, against r·(D_in + D_out) for LoRA,
so r can be large (PEFT's default r = 256). With ``save_projection=False`` only the
vectors and the key need storing; A and B are drawn again from the key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..nn.device import get_array_module
from ..nn.dispatch import kernels_for
from .lora.dora import rowdot
from ..nn.layers import Dense
from .lora.config import matches
from ..nn.module import Module, Parameter
from .lora.modules_to_save import ModulesToSave


@dataclass
class VeraConfig:
    """PEFT's ``VeraConfig`` names and defaults (no bias modes: biases stay frozen).

    r                    rank of the shared projections
    target_modules       layers to adapt (PEFT's matching: names, suffixes, a regex or "all-linear")
    projection_prng_key  seed of vera_A and vera_B
    save_projection      whether adapter files would carry vera_A, vera_B (else: the key only)
    vera_dropout         dropout on the VeRA branch input
    d_initial            λ_d's initial value
    init_weights         True: λ_b = 0, λ_d = d_initial; False: λ_b = 1, λ_d ~ N(0, 1) (tests)
    modules_to_save      modules trained in full (e.g. the classifier head)
    """

    r: int = 256
    target_modules: list | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    init_weights: bool = True
    modules_to_save: list | None = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"VeraConfig: r must be a positive integer, got {self.r!r}")
        if not 0 <= self.vera_dropout < 1:
            raise ValueError(f"VeraConfig: vera_dropout must lie in [0, 1), got {self.vera_dropout!r}")


class VeraCache(NamedTuple):
    x: object              # (N, D_in)
    h: object              # (N, r) = (x ⊙ mask) A'ᵀ
    mask: object           # (N, D_in) or None
    A: object              # (r, D_in) the slice of vera_A
    B: object              # (D_out, r) the slice of vera_B
    A_scaled: object       # (r, D_in) λ_d ⊙ A
    B_scaled: object       # (D_out, r) λ_b ⊙ B


class VeraLinear(Module):
    """A frozen Dense base plus VeRA's λ_b ⊙ (B (λ_d ⊙ (A x))); see the module docstring."""

    def __init__(self, base: Dense, vera_A: Parameter, vera_B: Parameter, d_initial: float = 0.1,
                 vera_dropout: float = 0.0, init_weights: bool = True, *, seed=None, backend: str | None = None):
        super().__init__()
        if not isinstance(base, Dense):
            raise TypeError(f"VeraLinear: base must be a Dense layer, got {type(base).__name__}")
        r, D_in, D_out = vera_A.shape[0], base.in_features, base.out_features
        if vera_A.shape[1] < D_in or vera_B.shape[0] < D_out or vera_B.shape[1] != r:
            raise ValueError(f"VeraLinear: vera_A {tuple(vera_A.shape)} and vera_B {tuple(vera_B.shape)} must be "
                             f"at least ({r}, {D_in}) and ({D_out}, {r}) for a {D_in} -> {D_out} layer")
        self.base_layer = base.requires_grad_(False)
        self._shared = (vera_A, vera_B)      # not registered: the VeraModel owns them, every layer slices them
        self.vera_dropout, self.backend = float(vera_dropout), backend
        self._rng = np.random.default_rng(seed)
        xp, dtype = get_array_module(base.weight.data), base.weight.dtype
        d = np.full(r, d_initial) if init_weights else self._rng.standard_normal(r)
        self.vera_lambda_d = Parameter(xp.asarray(d, dtype=dtype))                       # (r,)
        self.vera_lambda_b = Parameter(xp.zeros(D_out, dtype) if init_weights else xp.ones(D_out, dtype))

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    def forward(self, x):
        """y (N, D_out) = x Wᵀ + b + (x ⊙ mask) A'ᵀ B'ᵀ."""
        self._check_input(x, self.in_features, self.weight.dtype)
        vera_A, vera_B = self._shared
        A = vera_A.data[:, :self.in_features]                           # (r, D_in)
        B = vera_B.data[:self.out_features]                             # (D_out, r)
        A_scaled = self.vera_lambda_d.data[:, None] * A                 # (r, D_in)
        B_scaled = self.vera_lambda_b.data[:, None] * B                 # (D_out, r)
        mask = None
        if self.training and self.vera_dropout > 0:
            keep = self._rng.random(x.shape) >= self.vera_dropout
            mask = get_array_module(x).asarray(keep / (1 - self.vera_dropout), dtype=x.dtype)
        b = self.bias.data if self.bias is not None else None
        y, h = kernels_for(x, self.backend).lora_forward(x, self.weight.data, A_scaled, B_scaled, 1.0, b, mask)
        self._cache = VeraCache(x, h, mask, A, B, A_scaled, B_scaled)
        return y

    def backward(self, dy):
        c = self._need_cache()
        self._cache = None
        k = kernels_for(dy, self.backend)
        dx, dA_scaled, dB_scaled = k.lora_backward(dy, c.x, c.h, self.weight.data, c.A_scaled, c.B_scaled, 1.0,
                                                   True, c.mask)
        self.vera_lambda_d.accumulate(rowdot(dA_scaled, c.A))            # (r,)
        self.vera_lambda_b.accumulate(rowdot(dB_scaled, c.B))            # (D_out,)
        need_dW, need_db = self.weight.trainable, self.bias is not None and self.bias.trainable
        if need_dW or need_db:
            _, dW, db = k.dense_backward(dy, c.x, self.weight.data, False, need_dW, need_db)
            self.weight.accumulate(dW)
            if need_db:
                self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}, r={self.vera_lambda_d.shape[0]}"


def _kaiming(rng, shape, fan_in, dtype):
    """PEFT's VeRA init: U(−√(6/fan_in), √(6/fan_in)) (Kaiming-uniform, gain √2)."""
    bound = math.sqrt(6.0 / fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class VeraModel(Module):
    """A base model with VeRA layers; holds the shared ``vera_A``, ``vera_B`` (frozen)."""

    def __init__(self, model: Module, config: VeraConfig, adapter_name: str = "default"):
        super().__init__()
        targets = [n for n, m in model.named_modules() if n and isinstance(m, Dense)
                   and matches(config.target_modules or [], n)]
        if not targets:
            layers = [n for n, m in model.named_modules() if isinstance(m, Dense)]
            raise ValueError(f"VeraConfig.target_modules {config.target_modules!r} match no Dense layer; "
                             f"this model's Dense layers: {layers}")
        self.model, self.peft_config = model.requires_grad_(False), {adapter_name: config}
        layers = [model.get_submodule(n) for n in targets]
        W = layers[0].weight.data
        xp, dtype, r = get_array_module(W), W.dtype, config.r
        D_in_max, D_out_max = max(l.in_features for l in layers), max(l.out_features for l in layers)
        rng = np.random.default_rng(config.projection_prng_key)
        self.vera_A = Parameter(xp.asarray(_kaiming(rng, (r, D_in_max), D_in_max, dtype)), trainable=False)
        self.vera_B = Parameter(xp.asarray(_kaiming(rng, (D_out_max, r), r, dtype)), trainable=False)
        for i, (name, layer) in enumerate(zip(targets, layers)):
            model.set_submodule(name, VeraLinear(layer, self.vera_A, self.vera_B, config.d_initial,
                                                 config.vera_dropout, config.init_weights,
                                                 seed=config.projection_prng_key + 1 + i))
        for name in config.modules_to_save or []:
            hits = [n for n, _ in model.named_modules() if n and matches([name], n)]
            if not hits:
                raise ValueError(f"VeraConfig.modules_to_save entry {name!r} matches no layer of the model")
            for n in hits:
                wrapper = ModulesToSave(model.get_submodule(n), adapter_name)
                wrapper.set_adapter(adapter_name)
                model.set_submodule(n, wrapper)

    def vera_layers(self) -> list[tuple[str, VeraLinear]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, VeraLinear)]

    def forward(self, x):
        return self.model.forward(x)

    def backward(self, dy):
        return self.model.backward(dy)


def get_vera_model(model: Module, config: VeraConfig, adapter_name: str = "default") -> VeraModel:
    """Wrap ``model`` (modified in place) with VeRA layers as ``config`` says."""
    return VeraModel(model, config, adapter_name)


def vera_parameter_count(layer_shapes, r: int) -> int:
    """Closed form of VeRA's trainable parameters: r + D_out per adapted layer of shape (D_out, D_in)."""
    return sum(r + d_out for d_out, _ in layer_shapes)
