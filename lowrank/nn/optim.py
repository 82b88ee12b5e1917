"""Optimizers over parameter groups. State exists only for trainable parameters.

A group is a dict ``{"params": [...], "lr": ..., ...}``; per-group settings override the
optimizer's defaults (LoRA+ gives lora_B a larger lr this way). Frozen parameters are
dropped at construction, so they never get a moment buffer.

    SGD    v ← μ v + g (+ wd·θ),  θ ← θ − lr·v
    Adam   m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − lr·m̂/(√v̂ + ε)   (wd added to g)
    AdamW  as Adam, with decoupled decay θ ← θ − lr·wd·θ
"""
from __future__ import annotations

import numbers

from .device import get_array_module
from .module import Parameter, check_number

# setting -> (lowest value, whether that value itself is allowed); every setting must also be finite
RANGES = {"lr": (0.0, False), "weight_decay": (0.0, True), "momentum": (0.0, True), "eps": (0.0, True)}


class Optimizer:
    defaults: dict = {}

    def __init__(self, params, **settings):
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown settings {sorted(unknown)}; "
                            f"expected some of {sorted(self.defaults)}")
        params = list(params)
        if params and isinstance(params[0], Parameter):
            params = [{"params": params}]
        self.param_groups = []
        for i, group in enumerate(params):
            g = {**self.defaults, **settings, **group}
            self._check_settings(g, i)                                     # per group: LoRA+ sets its own lr
            g["params"] = [p for p in group["params"] if p.trainable]      # frozen: no state, ever
            self.param_groups.append(g)
        seen = [id(p) for g in self.param_groups for p in g["params"]]
        if len(seen) != len(set(seen)):
            raise ValueError(f"{type(self).__name__}: a parameter appears in more than one param group "
                             f"(it would be updated twice per step)")
        self.state: dict[int, dict] = {}
        self.steps = 0

    def _check_settings(self, g: dict, i: int):
        """Every setting of param group ``i`` finite and in range (betas each in [0, 1))."""
        owner, where = type(self).__name__, f" in param group {i}"
        for key, (low, inclusive) in RANGES.items():
            if key in g:
                check_number(owner, key, g[key], low, inclusive, where)
        if "betas" in g:
            b = g["betas"]
            ok = isinstance(b, (tuple, list)) and len(b) == 2 and all(
                not isinstance(v, bool) and isinstance(v, numbers.Real) and 0 <= v < 1 for v in b)
            if not ok:
                raise ValueError(f"{owner}: betas must be two numbers in [0, 1), got {b!r}{where}")

    def zero_grad(self):
        for g in self.param_groups:
            for p in g["params"]:
                p.grad = None

    def step(self):
        self.steps += 1
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, self.state.setdefault(id(p), {}), g)

    def state_nbytes(self) -> int:
        """Bytes held as optimizer state (moment buffers), counted from the arrays."""
        return sum(int(a.nbytes) for s in self.state.values() for a in s.values() if hasattr(a, "nbytes"))


class SGD(Optimizer):
    defaults = {"lr": 1e-2, "momentum": 0.0, "weight_decay": 0.0}

    def _update(self, p, grad, state, g):
        if g["weight_decay"]:
            grad = grad + g["weight_decay"] * p.data
        if g["momentum"]:
            v = state.get("momentum_buffer")
            v = grad.copy() if v is None else g["momentum"] * v + grad
            state["momentum_buffer"] = v
            grad = v
        p.data -= (g["lr"] * grad).astype(p.dtype)


class Adam(Optimizer):
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    decoupled = False

    def _update(self, p, grad, state, g):
        xp = get_array_module(p.data)
        b1, b2 = g["betas"]
        if g["weight_decay"] and not self.decoupled:
            grad = grad + g["weight_decay"] * p.data
        if not state:
            state["step"] = 0
            state["exp_avg"], state["exp_avg_sq"] = xp.zeros_like(p.data), xp.zeros_like(p.data)
        state["step"] += 1
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        m *= b1
        m += (1 - b1) * grad
        v *= b2
        v += (1 - b2) * grad * grad
        if self.decoupled and g["weight_decay"]:
            p.data -= (g["lr"] * g["weight_decay"] * p.data).astype(p.dtype)
        step = g["lr"] * (m / (1 - b1**t)) / (xp.sqrt(v / (1 - b2**t)) + g["eps"])
        p.data -= step.astype(p.dtype)


class AdamW(Adam):
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
    decoupled = True
