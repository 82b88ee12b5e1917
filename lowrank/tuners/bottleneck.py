"""Houlsby et al.'s bottleneck adapter: a small residual MLP inserted after a layer.

    y = x + up(act(down(x)))        down: D → m,  up: m → D,  m ≪ D

``up`` starts at zero, so at initialisation the adapter is the identity and the adapted
model starts exactly at the pretrained one (the seed article's second property).
"""
from __future__ import annotations

import numpy as np

from ..nn.layers import ACTIVATIONS, Dense
from ..nn.module import Module, Sequential


class BottleneckAdapter(Module):
    """y = x + up(act(down(x))); backward: dx = dy + down.backward(act.backward(up.backward(dy)))."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu", *, dtype="float32", seed=None):
        super().__init__()
        if not 1 <= bottleneck <= dim:
            raise ValueError(f"BottleneckAdapter: bottleneck must lie in [1, {dim}], got {bottleneck}")
        self.down = Dense(dim, bottleneck, dtype=dtype, seed=seed)
        self.act = ACTIVATIONS[activation]()
        self.up = Dense(bottleneck, dim, dtype=dtype, seed=None if seed is None else seed + 1)
        self.up.weight.data[...] = 0          # identity at init
        self.up.bias.data[...] = 0

    def forward(self, x):
        return x + self.up.forward(self.act.forward(self.down.forward(x)))

    def backward(self, dy):
        return dy + self.down.backward(self.act.backward(self.up.backward(dy)))


def insert_bottleneck_adapters(model: Sequential, after: list[str], bottleneck: int, *, seed: int = 0) -> Sequential:
    """A new Sequential with an adapter after each named child (e.g. each hidden activation).

    The original layers are shared (not copied) and frozen; only the adapters are trainable.
    """
    model.requires_grad_(False)
    layers = []
    for name, child in model.named_children():
        layers.append(child)
        if name in after:
            width = _width_before(model, name)
            layers.append(BottleneckAdapter(width, bottleneck, dtype=_dtype(model), seed=seed + len(layers)))
    return Sequential(*layers)


def _width_before(model: Sequential, name: str) -> int:
    """Output width of child ``name``: the out_features of the last Dense at or before it."""
    width = None
    for n, child in model.named_children():
        if hasattr(child, "out_features"):
            width = child.out_features
        if n == name:
            return width
    raise KeyError(name)


def _dtype(model) -> np.dtype:
    return next(p.dtype for p in model.parameters())
