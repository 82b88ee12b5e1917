"""Base-model files: a safetensors state dict with PyTorch's names plus the architecture.

``save_model(model, path)`` writes ``model.state_dict()`` ("0.weight" (D_out, D_in),
"0.bias" (D_out,), ...) so ``torch.nn.Sequential(Linear, ReLU, Linear)`` loads the file with
``load_state_dict`` unchanged, and puts the module tree in the file's ``__metadata__``:

    "lowrank.architecture": {"format": "lowrank.architecture/1",
                             "module": {"type": "Sequential", "children": [
                                 {"type": "Dense", "in_features": 4, "out_features": 8,
                                  "bias": true, "dtype": "float32"},
                                 {"type": "ReLU"}, ...]}}
    "lowrank.sha256": {tensor name: sha256 of its bytes}      (checked on every load)

Each node is ``{"type": NAME, **settings}``. A layer type plugs in with
``register_layer(NAME, cls, describe, build)``: ``describe(module) -> settings`` (JSON
values) and ``build(settings) -> module``; its parameters are then saved and checked by
name like any other; an optional ``shapes(settings)`` lets ``load_model`` compare what the
architecture claims with the file's tensor shapes before building anything (so a few bytes
of metadata can't make it allocate gigabytes). ``load_model(path)`` validates the whole file
(integrity, checksums, architecture, keys, shapes, dtypes, finiteness) and raises
FileFormatError naming the file and the problem. ``save_model(..., dtype="bfloat16")`` stores
the float parameters in half precision; loading upcasts them exactly to the layers' dtypes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .atomic import atomic_write_bytes
from ..nn.layers import GELU, Dense, ReLU, Sigmoid, Tanh
from ..nn.module import Module, Sequential
from ..nn.nf4_dense import NF4Dense
from ..nn.quant import NF4Tensor
from .tensor_files import (CHECKSUM_KEY, FileFormatError, cast_for_saving, check_tensors,  # noqa: F401
                           read_tensor_file, tensor_file_bytes)

ARCH_KEY = "lowrank.architecture"
ARCH_FORMAT = "lowrank.architecture/1"


# -- the architecture -------------------------------------------------------------------
@dataclass(frozen=True)
class LayerType:
    cls: type
    describe: Callable[[Module], dict]      # module -> JSON settings
    build: Callable[[dict], Module]         # settings -> module (parameters are loaded afterwards)
    settings: dict                          # setting name -> accepted Python type(s)
    shapes: Callable[[dict], dict] | None = None    # settings -> {parameter: shape}, checked before build


LAYER_TYPES: dict[str, LayerType] = {}


def register_layer(name: str, cls: type, describe, build, settings: dict | None = None, shapes=None):
    """Let ``save_model``/``load_model`` handle ``cls``, written as ``{"type": name, **describe(m)}``.

    ``shapes(settings) -> {parameter name: shape}`` (the large parameters at least) lets
    ``load_model`` check the settings against the file before ``build`` allocates anything;
    without it, ``build`` runs on settings only the file's own bytes vouch for.
    """
    LAYER_TYPES[name] = LayerType(cls, describe, build, dict(settings or {}), shapes)


def _dense_shapes(s) -> dict:
    return {"weight": (s["out_features"], s["in_features"]), **({"bias": (s["out_features"],)} if s["bias"] else {})}


register_layer("Dense", Dense,
               lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                          "bias": m.bias is not None, "dtype": str(m.weight.dtype)},
               lambda s: Dense(s["in_features"], s["out_features"], s["bias"], dtype=s["dtype"], seed=0),
               {"in_features": int, "out_features": int, "bias": bool, "dtype": str}, _dense_shapes)
for _name, _cls in (("ReLU", ReLU), ("Tanh", Tanh), ("Sigmoid", Sigmoid)):
    register_layer(_name, _cls, lambda m: {}, lambda s, c=_cls: c())
register_layer("GELU", GELU, lambda m: {"approximate": m.approximate}, lambda s: GELU(s["approximate"]),
               {"approximate": str})


def _build_nf4(s) -> NF4Dense:
    """An NF4Dense of the right shapes (zero buffers); load_state_dict then puts the saved codes in."""
    weight = NF4Tensor.empty((s["out_features"], s["in_features"]), s["dtype"], s["blocksize"], s["double_quant"],
                             s["dq_blocksize"])
    return NF4Dense(weight, np.zeros(s["out_features"], s["dtype"]) if s["bias"] else None)


register_layer("NF4Dense", NF4Dense,                  # uint8 codes + float32 scales, stored as its parameters
               lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                          "dtype": str(m.dtype), "blocksize": m.blocksize, "double_quant": m.double_quant,
                          "dq_blocksize": m.dq_blocksize},
               _build_nf4,
               {"in_features": int, "out_features": int, "bias": bool, "dtype": str, "blocksize": int,
                "double_quant": bool, "dq_blocksize": int},
               lambda s: {"weight_packed": (-(-s["in_features"] * s["out_features"] // 2),),   # two codes a byte
                          **({"bias": (s["out_features"],)} if s["bias"] else {})})


def describe_module(module: Module, where: str = "") -> dict:
    """The architecture node of ``module`` (a Sequential of registered layer types)."""
    if type(module) is Sequential:
        return {"type": "Sequential",
                "children": [describe_module(c, f"{where}.{n}" if where else n) for n, c in module.named_children()]}
    for name, lt in LAYER_TYPES.items():
        if type(module) is lt.cls:
            return {"type": name, **lt.describe(module)}
    hint = (" (an adapter layer over a base_layer: save the adapter with save_pretrained, or "
            "merge_and_unload() first)" if hasattr(module, "base_layer") else "")
    raise TypeError(f"save_model: can't describe {type(module).__name__} at {where or '<root>'!r}{hint}; "
                    f"known layer types: Sequential, {sorted(LAYER_TYPES)}; add one with "
                    f"lowrank.io.model_files.register_layer")


def _node(node, path, where):
    """(type name, settings) of an architecture node, checked against its layer type's settings."""
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise FileFormatError(f"{path}: architecture node {where} must be an object with a 'type', got {node!r}")
    kind, settings = node["type"], {k: v for k, v in node.items() if k != "type"}
    if kind == "Sequential":
        if set(settings) != {"children"} or not isinstance(settings["children"], list):
            raise FileFormatError(f"{path}: Sequential node {where} needs exactly a 'children' list, got {settings}")
        return kind, settings
    if kind not in LAYER_TYPES:
        raise FileFormatError(f"{path}: unknown layer type {kind!r} at {where}; known: Sequential, "
                              f"{sorted(LAYER_TYPES)}")
    lt = LAYER_TYPES[kind]
    wrong = {k: v for k, v in settings.items()
             if k not in lt.settings or isinstance(v, bool) != (lt.settings[k] is bool)
             or not isinstance(v, lt.settings[k])}
    if set(settings) != set(lt.settings) or wrong:
        raise FileFormatError(f"{path}: {kind} node {where} needs settings {lt.settings}, got {settings}")
    return kind, settings


def check_claims(node, path, shapes: dict, prefix: str = "", where: str = "<root>"):
    """Check the parameter shapes the architecture claims against the file's ``shapes`` {name: shape},
    before anything is built: a few bytes of metadata can't make ``load_model`` allocate gigabytes."""
    kind, settings = _node(node, path, where)
    if kind == "Sequential":
        for i, child in enumerate(settings["children"]):
            check_claims(child, path, shapes, f"{prefix}{i}.", f"{where}.{i}")
        return
    claims = LAYER_TYPES[kind].shapes(settings) if LAYER_TYPES[kind].shapes else {}
    for name, shape in claims.items():
        if prefix + name not in shapes:
            raise FileFormatError(f"{path}: missing tensors {[prefix + name]} ({kind} node {where} needs it)")
        if tuple(shapes[prefix + name]) != tuple(shape):
            raise FileFormatError(f"{path}: {kind} node {where} claims {prefix + name!r} of shape {tuple(shape)} "
                                  f"({math.prod(shape):,} values), but the file holds {tuple(shapes[prefix + name])}")


def build_module(node, path, where: str = "<root>") -> Module:
    """A fresh module from an architecture node; FileFormatError naming the node when it is wrong."""
    kind, settings = _node(node, path, where)
    if kind == "Sequential":
        return Sequential(*[build_module(c, path, f"{where}.{i}") for i, c in enumerate(settings["children"])])
    try:
        return LAYER_TYPES[kind].build(settings)
    except (ValueError, TypeError) as e:
        raise FileFormatError(f"{path}: {kind} node {where}: {e}") from e


# -- save / load ------------------------------------------------------------------------
def save_model(model: Module, path, overwrite: bool = False, dtype: str | None = None):
    """Write ``model``'s parameters (PyTorch names and layouts) and architecture to ``path``, atomically.

    ``dtype`` ("bfloat16", "float16", "float32") stores the float parameters in that type
    (rounded; the architecture keeps the layers' own dtypes, and ``load_model`` upcasts).
    """
    arch = json.dumps({"format": ARCH_FORMAT, "module": describe_module(model)}, sort_keys=True)
    tensors = cast_for_saving(model.state_dict(), dtype)
    atomic_write_bytes(path, tensor_file_bytes(tensors, {ARCH_KEY: arch}), overwrite=overwrite)


def load_model(path, allow_nonfinite: bool = False) -> Module:
    """The model ``save_model`` wrote to ``path``, checked completely before it is returned
    (the architecture against the file's shapes before anything is built)."""
    tensors, metadata = read_tensor_file(path, allow_nonfinite)
    if ARCH_KEY not in metadata:
        raise FileFormatError(f"{path}: no {ARCH_KEY!r} in the metadata: not a file written by save_model "
                              f"(a bare state dict: build the model yourself and call load_state_dict)")
    try:
        arch = json.loads(metadata[ARCH_KEY])
    except ValueError as e:
        raise FileFormatError(f"{path}: the architecture in the metadata is not valid JSON: {e}") from e
    if not isinstance(arch, dict) or arch.get("format") != ARCH_FORMAT or "module" not in arch:
        raise FileFormatError(f"{path}: the architecture must be {{'format': {ARCH_FORMAT!r}, 'module': ...}}, "
                              f"got {str(arch)[:200]}")
    check_claims(arch["module"], path, {k: a.shape for k, a in tensors.items()})
    model = build_module(arch["module"], path)
    expected = {n: (p.shape, p.dtype, "parameter") for n, p in model.named_parameters()}
    return model.load_state_dict(check_tensors(path, expected, tensors), allow_nonfinite=True)
