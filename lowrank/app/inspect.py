"""``lowrank inspect PATH``: what an adapter directory or a safetensors file holds.

For an adapter directory: its config (as written, and whether lowrank accepts it), its
tensors (name, shape, dtype, parameters, bytes) and any adapters in sub-directories. For a
model file: the architecture written by ``save_model`` and the tensors. The file's
integrity (safetensors structure, lowrank's checksums) is checked; NaN/Inf are reported.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..tuners.lora.config import AdapterFileError, read_config
from ..tuners.lora.save_and_load import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME
from .cli import printable as _p       # every name and value read from a file goes through it
from ..io.model_files import ARCH_KEY, CHECKSUM_KEY, FileFormatError, read_tensor_file


def add_arguments(parser):
    parser.add_argument("path", help="an adapter directory (adapter_config.json + adapter_model.safetensors) "
                                     "or a .safetensors file")


def run(args) -> int:
    path = Path(args.path)
    if path.is_dir():
        print(f"adapter directory {_p(path)}")
        _print_config(path / ADAPTER_CONFIG_NAME)
        _print_tensors(path / ADAPTER_SAFE_WEIGHTS_NAME)
        subs = sorted(_p(p.parent.name) for p in path.glob(f"*/{ADAPTER_CONFIG_NAME}"))
        if subs:
            print(f"adapters in sub-directories: {', '.join(subs)} (inspect {_p(path)}/<name>)")
    else:
        _print_tensors(path)
    return 0


def _print_config(path: Path):
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:
        raise FileFormatError(f"{path}: not valid JSON: {e}") from e
    print(f"config {path.name}:")
    for key, value in (sorted(raw.items()) if isinstance(raw, dict) else [("<not an object>", raw)]):
        print(f"  {_p(key)}: {json.dumps(value)}")
    try:
        read_config(path)
        print("  lowrank loads this config: yes")
    except AdapterFileError as e:
        print(f"  lowrank loads this config: no: {_p(str(e).removeprefix(f'{path}: '))}")


def _print_tensors(path: Path):
    tensors, metadata = read_tensor_file(path, allow_nonfinite=True)
    print(f"file {_p(path)} ({path.stat().st_size:,d} bytes)")
    if ARCH_KEY in metadata:
        print("architecture:")
        try:
            arch = json.loads(metadata[ARCH_KEY])
        except ValueError as e:
            raise FileFormatError(f"{path}: the architecture in the metadata is not valid JSON: {e}") from e
        _print_node(arch.get("module") if isinstance(arch, dict) else arch, "model")
    extra = sorted(set(metadata) - {ARCH_KEY, CHECKSUM_KEY})
    print(f"metadata: {', '.join(_p(f'{k}={metadata[k]}') for k in extra) or '-'}"
          f"{'; checksums verified' if CHECKSUM_KEY in metadata else '; no checksums'}")
    names = {k: _p(k) for k in tensors}
    width = max([len(n) for n in names.values()] + [6])
    print(f"  {'tensor':<{width}}  {'shape':<14} {'dtype':<8} {'params':>10} {'bytes':>12}")
    for name, a in sorted(tensors.items()):
        print(f"  {names[name]:<{width}}  {str(tuple(a.shape)):<14} {str(a.dtype):<8} {a.size:>10,d} {a.nbytes:>12,d}")
    print(f"total: {len(tensors)} tensors, {sum(a.size for a in tensors.values()):,d} parameters, "
          f"{sum(a.nbytes for a in tensors.values()):,d} bytes")
    nonfinite = sorted(k for k, a in tensors.items() if a.dtype.kind == "f" and not np.isfinite(a).all())
    if nonfinite:
        print(f"NaN/Inf in: {', '.join(names[k] for k in nonfinite)}")


def _print_node(node, name, depth=1):
    if not isinstance(node, dict):
        print(f"{'  ' * depth}{name}: {_p(repr(node))}")
        return
    settings = " ".join(f"{k}={v}" for k, v in node.items() if k not in ("type", "children"))
    print(_p(f"{'  ' * depth}{name}: {node.get('type')} {settings}".rstrip()))
    for i, child in enumerate(node.get("children", [])):
        _print_node(child, str(i), depth + 1)
