"""QLoRA: a frozen 4-bit NF4 base layer under trainable LoRA factors.

The frozen 4-bit layer itself, ``NF4Dense``, is an engine layer (``lowrank.nn.nf4_dense``).
``LoraLinear(NF4Dense(...))`` is QLoRA unchanged: its forward is y = base(x) + s·(x Aᵀ) Bᵀ and
its backward dx = base.backward(dy) + dx_lora. Merging an adapter into a 4-bit base
(dequantize, add s·B·A, requantize) is lossy: ``merge_nf4`` does it and ``output_error``
measures what it costs; ``merge_nf4(..., exact=True)`` keeps the merged weight in float.
"""
from __future__ import annotations

import numpy as np

from ...nn.device import to_device
from ...nn.layers import Dense
from ...nn.module import Module, Parameter
from ...nn.nf4_dense import NF4Dense
from ...nn.quant import merge_delta
from .layer import LoraLinear


def _matches(name: str, pattern: str) -> bool:
    """PEFT's suffix rule: 'head' matches module 'head' and 'encoder.head', not 'subhead'."""
    return name == pattern or name.endswith("." + pattern)


def quantize_model(model: Module, skip=None, blocksize: int = 64, double_quant: bool = True) -> Module:
    """Replace every Dense in ``model`` by an NF4Dense in place (except modules named in ``skip``,
    e.g. the head); returns the model (a new NF4Dense when ``model`` itself is a Dense).

    ``skip=None`` keeps a causal LM's ``lm_head`` in float when the model has one (QLoRA's and
    PEFT's choice: every linear layer but the output head) and skips nothing otherwise. Only Dense
    layers are quantized, so a decoder's embedding, norms and a tied head (a view of the
    embedding) always stay in float.
    """
    if skip is None:
        skip = ("lm_head",) if "lm_head" in dict(model.named_modules()) else ()
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    names = [name for name, _ in model.named_modules()]
    unknown = [s for s in skip if not any(_matches(n, s) for n in names)]
    if unknown:
        raise ValueError(f"quantize_model: skip names {unknown} match no module; modules are {names[1:]}")
    if isinstance(model, Dense):
        return model if "" in skip else NF4Dense.from_dense(model, blocksize, double_quant)
    targets = [n for n, m in model.named_modules() if isinstance(m, Dense) and not any(_matches(n, s) for s in skip)]
    for name in targets:
        model.set_submodule(name, NF4Dense.from_dense(model.get_submodule(name), blocksize, double_quant))
    return model.flatten_parameters()           # what stays in float moves out of the old block, which is freed


def merge_nf4(layer: LoraLinear, adapter_name: str | None = None, *, exact: bool = False) -> Module:
    """The base layer with adapter ``adapter_name`` (default: the active one) merged in: W' = Ŵ + s·B·A.

    exact=False: an NF4Dense holding requant(W') (lossy; measure it with ``output_error``).
    exact=True:  a float Dense holding W' in the base's dtype (no requantization error).
    """
    base = layer.base_layer
    if not isinstance(base, NF4Dense):
        raise TypeError(f"merge_nf4: {layer.label} has a {type(base).__name__} base; use LoraLinear.merge for a "
                        f"float base")
    name = layer.active_adapter if adapter_name is None else adapter_name
    if name not in layer.lora_A:
        raise ValueError(f"merge_nf4: {layer.label} has no adapter {name!r}; it has {list(layer.lora_A)}")
    delta = layer.delta_weight(name)                                            # (D_out, D_in)
    if exact:
        merged = base.dequantized()
        merged.weight.data = (merged.weight.data + delta).astype(base.dtype)
        return merged
    requant = merge_delta(base.weight, delta)
    out = NF4Dense(requant, None, backend=base.backend)
    out.bias = Parameter(base.bias.data.copy(), base.bias.trainable) if base.bias is not None else None
    return out


def merge_model_nf4(model: Module, *, exact: bool = False) -> Module:
    """Replace every LoraLinear over an NF4Dense in ``model`` by ``merge_nf4`` of it; returns the model."""
    targets = [n for n, m in model.named_modules() if isinstance(m, LoraLinear) and isinstance(m.base_layer, NF4Dense)]
    if "" in targets:
        return merge_nf4(model, exact=exact)
    for name in targets:
        model.set_submodule(name, merge_nf4(model.get_submodule(name), exact=exact))
    return model


def output_error(reference: Module, candidate: Module, x) -> dict:
    """How far ``candidate``'s outputs are from ``reference``'s on x (both in eval mode, modes restored).

    Returns {"max_abs": max |Δy|, "rel_fro": ‖Δy‖_F / ‖y_ref‖_F}.
    """
    modes = [reference.training, candidate.training]
    y_ref = reference.eval().forward(x)
    y = candidate.eval().forward(x)
    reference.train(modes[0])
    candidate.train(modes[1])
    y, y_ref = (np.asarray(to_device(a, "cpu"), np.float64) for a in (y, y_ref))
    diff = y - y_ref
    norm = float(np.linalg.norm(y_ref))
    return {"max_abs": float(np.abs(diff).max(initial=0.0)), "rel_fro": float(np.linalg.norm(diff)) / (norm or 1.0)}
