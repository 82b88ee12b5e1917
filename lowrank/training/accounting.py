"""What a fine-tuning method costs: parameters, stored bytes, and training memory.

Memory of one training step is split as the seed article does:
    weights      every parameter array (frozen and trainable)
    gradients    the .grad arrays that exist after backward (trainable parameters only)
    optimizer    the optimizer's state buffers after a step (Adam: two per trainable array)
    activations  the arrays the modules keep in their caches between forward and backward
Each is counted from the arrays that actually exist; ``measure_step`` also records the
tracemalloc peak of the step (NumPy reports its buffers to tracemalloc) as a cross-check.
"""
from __future__ import annotations

import gc
import tracemalloc
from dataclasses import asdict, dataclass

from ..nn.losses import BCEWithLogitsLoss
from ..nn.module import Module
from .loop import targets_for


@dataclass
class StepMemory:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    tracemalloc_peak: int       # bytes newly allocated at the step's peak (forward + backward + step)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _arrays(obj, seen: set):
    """Yield every distinct array reachable from a cache (tuples, NamedTuples, lists, dicts)."""
    if obj is None or isinstance(obj, (str, bool, int, float, Module)):
        return
    if hasattr(obj, "nbytes") and hasattr(obj, "shape"):
        key = id(obj.base) if getattr(obj, "base", None) is not None else id(obj)
        if key not in seen:
            seen.add(key)
            yield obj
        return
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (tuple, list)) else ()
    for item in items:
        yield from _arrays(item, seen)


def release(model: Module) -> Module:
    """Drop every gradient and forward cache (e.g. on a copy of a trained model)."""
    model.zero_grad()
    for _, m in model.named_modules():
        m._cache = None
    return model


def activation_bytes(model: Module) -> int:
    """Bytes of the arrays held in module caches right now (call between forward and backward)."""
    seen: set = set()
    return sum(int(a.nbytes) for _, m in model.named_modules() for a in _arrays(m._cache, seen))


def weight_bytes(model: Module, trainable_only: bool = False) -> int:
    return sum(int(p.data.nbytes) for p in model.parameters(trainable_only))


def gradient_bytes(model: Module) -> int:
    return sum(int(p.grad.nbytes) for p in model.parameters() if p.grad is not None)


def measure_step(model: Module, optimizer, X, y, loss_fn=None, **forward_kwargs) -> StepMemory:
    """Run one training step on (X, y) and count its memory (see the module docstring).

    A classifier: X (N, D_in) features, y (N,) labels, the default BCEWithLogitsLoss. A decoder
    (LlamaForCausalLM, or a LoraModel over one): X the token ids (B, T), y the labels (B, T) (the ids
    themselves for next-token prediction), ``loss_fn=CausalLMLoss()``, and ``forward_kwargs`` such as
    ``attention_mask`` go to ``model.forward``. Activations are counted after the forward, before the
    loss: the model's caches, not the loss's (B, T, V) softmax.
    """
    loss_fn = loss_fn or BCEWithLogitsLoss()
    model.train()
    release(model)
    gc.collect()
    tracemalloc.start()
    try:
        z = model.forward(X, **forward_kwargs)
        activations = activation_bytes(model)
        loss_fn.forward(z, targets_for(loss_fn, y, z))
        model.backward(loss_fn.backward())
        gradients = gradient_bytes(model)
        optimizer.step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return StepMemory(weights=weight_bytes(model), gradients=gradients, optimizer=optimizer.state_nbytes(),
                      activations=activations, tracemalloc_peak=peak)


def stored_bytes(model: Module) -> int:
    """Bytes a task must store beyond the shared frozen base: its trainable parameters."""
    return weight_bytes(model, trainable_only=True)


def lora_parameter_count(layer_shapes, r: int) -> int:
    """Closed form: r·(D_in + D_out) per adapted layer of shape (D_out, D_in)."""
    return sum(r * (d_in + d_out) for d_out, d_in in layer_shapes)
