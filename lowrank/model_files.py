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
name like any other. ``load_model(path)`` validates the whole file (integrity, checksums,
architecture, keys, shapes, dtypes, finiteness) and raises FileFormatError naming the file
and the problem.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors.numpy

from .atomic import atomic_write_bytes
from .backend import to_device
from .layers import GELU, Dense, ReLU, Sigmoid, Tanh
from .module import Module, Sequential
from .qlora import NF4Dense
from .quant import NF4Tensor

ARCH_KEY = "lowrank.architecture"
ARCH_FORMAT = "lowrank.architecture/1"
CHECKSUM_KEY = "lowrank.sha256"


class FileFormatError(ValueError):
    """A file lowrank can't load; the message names the file and the problem."""


# -- tensor files (shared with lowrank.adapter_files) ------------------------------------
def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def tensor_file_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """safetensors bytes of ``tensors`` (NumPy or CuPy), with PEFT's ``format: pt`` and checksums."""
    arrays = {k: np.ascontiguousarray(to_device(v, "cpu")) for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {}),
            CHECKSUM_KEY: json.dumps({k: _digest(a) for k, a in arrays.items()}, sort_keys=True)}
    return safetensors.numpy.save(arrays, metadata=meta)


def read_tensor_file(path, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, after checking its integrity.

    Refuses a missing, truncated or corrupted file, tensors that don't match the checksums
    lowrank wrote, and NaN/Inf values unless ``allow_nonfinite``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        tensors = safetensors.numpy.load(data)
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as e:                      # the safetensors parser's own error type, or JSON's
        raise FileFormatError(f"{path}: not a valid safetensors file (truncated or corrupted?): {e}") from e
    _verify_checksums(path, tensors, metadata)
    if not allow_nonfinite:
        bad = sorted(k for k, a in tensors.items() if a.dtype.kind == "f" and not np.isfinite(a).all())
        if bad:
            raise FileFormatError(f"{path}: tensors {bad} hold NaN or Inf; pass allow_nonfinite=True to load them")
    return tensors, metadata


def _verify_checksums(path, tensors, metadata):
    if CHECKSUM_KEY not in metadata:            # files from other writers (PEFT) carry none
        return
    try:
        table = json.loads(metadata[CHECKSUM_KEY])
    except ValueError as e:
        raise FileFormatError(f"{path}: the checksum table in the metadata is not valid JSON: {e}") from e
    if not isinstance(table, dict) or set(table) != set(tensors):
        listed = sorted(table) if isinstance(table, dict) else table
        raise FileFormatError(f"{path}: the checksum table lists {listed} but the file holds {sorted(tensors)} "
                              f"(tensors renamed, dropped or added after saving?)")
    bad = sorted(k for k, a in tensors.items() if table[k] != _digest(a))
    if bad:
        raise FileFormatError(f"{path}: tensors {bad} don't match their checksums: the file is corrupted")


def check_tensors(path, expected: dict, tensors: dict) -> dict:
    """Check ``tensors`` against ``expected`` {key: (shape, dtype, what)}; return them cast to the
    expected dtypes. Keys must match exactly; a dtype may differ only by a lossless float upcast."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FileFormatError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    out = {}
    for key, (shape, dtype, what) in expected.items():
        a, dtype = tensors[key], np.dtype(dtype)
        if tuple(a.shape) != tuple(shape):
            raise FileFormatError(f"{path}: {key!r} ({what}) has shape {tuple(a.shape)}, expected {tuple(shape)}")
        lossless = a.dtype.kind == dtype.kind == "f" and np.can_cast(a.dtype, dtype, "safe")
        if a.dtype != dtype and not lossless:
            raise FileFormatError(f"{path}: {key!r} ({what}) has dtype {a.dtype}; the model takes {dtype} "
                                  f"(or a float type that converts to it exactly)")
        out[key] = a.astype(dtype, copy=False)
    return out


# -- the architecture -------------------------------------------------------------------
@dataclass(frozen=True)
class LayerType:
    cls: type
    describe: Callable[[Module], dict]      # module -> JSON settings
    build: Callable[[dict], Module]         # settings -> module (parameters are loaded afterwards)
    settings: dict                          # setting name -> accepted Python type(s)


LAYER_TYPES: dict[str, LayerType] = {}


def register_layer(name: str, cls: type, describe, build, settings: dict | None = None):
    """Let ``save_model``/``load_model`` handle ``cls``, written as ``{"type": name, **describe(m)}``."""
    LAYER_TYPES[name] = LayerType(cls, describe, build, dict(settings or {}))


register_layer("Dense", Dense,
               lambda m: {"in_features": m.in_features, "out_features": m.out_features,
                          "bias": m.bias is not None, "dtype": str(m.weight.dtype)},
               lambda s: Dense(s["in_features"], s["out_features"], s["bias"], dtype=s["dtype"], seed=0),
               {"in_features": int, "out_features": int, "bias": bool, "dtype": str})
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
                "double_quant": bool, "dq_blocksize": int})


def describe_module(module: Module, where: str = "") -> dict:
    """The architecture node of ``module`` (a Sequential of registered layer types)."""
    if type(module) is Sequential:
        return {"type": "Sequential",
                "children": [describe_module(c, f"{where}.{n}" if where else n) for n, c in module.named_children()]}
    for name, lt in LAYER_TYPES.items():
        if type(module) is lt.cls:
            return {"type": name, **lt.describe(module)}
    hint = (" (a LoRA layer: save the adapter with save_pretrained, or merge_and_unload() first)"
            if hasattr(module, "lora_A") else "")
    raise TypeError(f"save_model: can't describe {type(module).__name__} at {where or '<root>'!r}{hint}; "
                    f"known layer types: Sequential, {sorted(LAYER_TYPES)}; add one with "
                    f"lowrank.model_files.register_layer")


def build_module(node, path, where: str = "<root>") -> Module:
    """A fresh module from an architecture node; FileFormatError naming the node when it is wrong."""
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        raise FileFormatError(f"{path}: architecture node {where} must be an object with a 'type', got {node!r}")
    kind, settings = node["type"], {k: v for k, v in node.items() if k != "type"}
    if kind == "Sequential":
        children = settings.get("children")
        if set(settings) != {"children"} or not isinstance(children, list):
            raise FileFormatError(f"{path}: Sequential node {where} needs exactly a 'children' list, got {settings}")
        return Sequential(*[build_module(c, path, f"{where}.{i}") for i, c in enumerate(children)])
    if kind not in LAYER_TYPES:
        raise FileFormatError(f"{path}: unknown layer type {kind!r} at {where}; known: Sequential, "
                              f"{sorted(LAYER_TYPES)}")
    lt = LAYER_TYPES[kind]
    wrong = {k: v for k, v in settings.items()
             if k not in lt.settings or isinstance(v, bool) != (lt.settings[k] is bool)
             or not isinstance(v, lt.settings[k])}
    if set(settings) != set(lt.settings) or wrong:
        raise FileFormatError(f"{path}: {kind} node {where} needs settings {lt.settings}, got {settings}")
    try:
        return lt.build(settings)
    except (ValueError, TypeError) as e:
        raise FileFormatError(f"{path}: {kind} node {where}: {e}") from e


# -- save / load ------------------------------------------------------------------------
def save_model(model: Module, path, overwrite: bool = False):
    """Write ``model``'s parameters (PyTorch names and layouts) and architecture to ``path``, atomically."""
    arch = json.dumps({"format": ARCH_FORMAT, "module": describe_module(model)}, sort_keys=True)
    atomic_write_bytes(path, tensor_file_bytes(model.state_dict(), {ARCH_KEY: arch}), overwrite=overwrite)


def load_model(path, allow_nonfinite: bool = False) -> Module:
    """The model ``save_model`` wrote to ``path``, checked completely before it is returned."""
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
    model = build_module(arch["module"], path)
    expected = {n: (p.shape, p.dtype, "parameter") for n, p in model.named_parameters()}
    return model.load_state_dict(check_tensors(path, expected, tensors))
