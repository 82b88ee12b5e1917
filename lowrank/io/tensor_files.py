"""safetensors files, read and written here in one place (``safetensors.numpy`` has no bfloat16).

The format: an 8-byte little-endian header length n, n bytes of JSON, then the data:

    {"__metadata__": {str: str},                                   optional
     name: {"dtype": "BF16", "shape": [D_out, D_in], "data_offsets": [begin, end]}, ...}

Offsets count from the end of the header; the tensors tile the data exactly, little-endian
(lowrank assumes a little-endian host, as NumPy wheels and CUDA do), row-major. bfloat16 is ``ml_dtypes.bfloat16``. lowrank writes ``format: pt`` (PEFT's marker)
and a per-tensor sha256 table under ``lowrank.sha256``, checked on every load; files from
other writers carry none. Reading refuses, as FileFormatError naming the file: truncated or
malformed files, dtypes it can't read (naming the tensor and the dtype), checksum mismatches
and NaN/Inf unless ``allow_nonfinite``.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np

from ..nn.device import to_device

CHECKSUM_KEY = "lowrank.sha256"
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
          "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
SAVE_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32, None: None}


class FileFormatError(ValueError):
    """A file lowrank can't load; the message names the file and the problem."""


def is_float(dtype) -> bool:
    """Floating point, bfloat16 included (NumPy files it under kind 'V')."""
    return np.dtype(dtype).kind == "f" or np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# -- write ------------------------------------------------------------------------------
def cast_for_saving(tensors: dict, dtype) -> dict:
    """Float tensors converted to ``dtype`` ("bfloat16", "float16", "float32"; None keeps them);
    ValueError if a finite value would overflow to Inf."""
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {list(SAVE_DTYPES)}, got {dtype!r}")
    out = {}
    for k, v in tensors.items():
        a = np.ascontiguousarray(to_device(v, "cpu"))
        if dtype is not None and is_float(a.dtype):
            with np.errstate(over="ignore"):            # overflow is reported below, naming the tensor
                cast = a.astype(SAVE_DTYPES[dtype])
            if not np.array_equal(np.isfinite(cast), np.isfinite(a)):
                raise ValueError(f"tensor {k!r} holds values beyond {dtype}'s range "
                                 f"(max {float(ml_dtypes.finfo(cast.dtype).max):g}); save it in a wider dtype")
            a = cast
        out[k] = a
    return out


def tensor_file_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """safetensors bytes of ``tensors`` (NumPy or CuPy), with PEFT's ``format: pt`` and checksums."""
    arrays = {k: np.ascontiguousarray(to_device(v, "cpu")) for k, v in sorted(tensors.items())}
    meta = {"format": "pt", **(metadata or {}),
            CHECKSUM_KEY: json.dumps({k: _digest(a) for k, a in arrays.items()}, sort_keys=True)}
    header, offset = {"__metadata__": meta}, 0
    for k, a in arrays.items():
        if a.dtype not in CODES:
            raise TypeError(f"tensor {k!r} has dtype {a.dtype}, which safetensors can't store")
        header[k] = {"dtype": CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                 # the data starts 8-byte aligned, as safetensors writes it
    return b"".join([len(text).to_bytes(8, "little"), text, *(a.tobytes() for a in arrays.values())])


# -- read -------------------------------------------------------------------------------
def _header_length(path, head: bytes, size: int) -> int:
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not 0 < n <= size - 8:
        raise FileFormatError(f"{path}: not a valid safetensors file (truncated or corrupted?): the header "
                              f"length {n} does not fit the file's {size} bytes")
    return n


def parse_header(path, head: bytes, size: int) -> tuple[dict, dict, int]:
    """({name: (dtype, shape, (begin, end))}, metadata, data start) of a safetensors file of ``size``
    bytes that starts with ``head`` (the length and the whole header)."""
    bad = f"{path}: not a valid safetensors file (truncated or corrupted?)"
    n = _header_length(path, head, size)
    try:
        header = json.loads(bytes(head[8:8 + n]))
    except ValueError as e:                        # bad UTF-8 or bad JSON
        raise FileFormatError(f"{bad}: the header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise FileFormatError(f"{bad}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(f"{bad}: __metadata__ must map names to strings")
    entries = {name: _entry(path, bad, name, e) for name, e in header.items()}
    end = 0
    for name, (_, _, (b, e)) in sorted(entries.items(), key=lambda kv: kv[1][2]):
        if b != end:
            raise FileFormatError(f"{bad}: tensor {name!r} starts at byte {b}, expected {end}")
        end = e
    if end != size - 8 - n:
        raise FileFormatError(f"{bad}: the tensors take {end} bytes, the file holds {size - 8 - n}")
    return entries, metadata, 8 + n


def _entry(path, bad, name, e):
    """(dtype, shape, offsets) of one header entry, checked."""
    if not (isinstance(e, dict) and set(e) == {"dtype", "shape", "data_offsets"} and isinstance(e["shape"], list)
            and all(type(d) is int and d >= 0 for d in e["shape"]) and isinstance(e["data_offsets"], list)
            and len(e["data_offsets"]) == 2 and all(type(o) is int and o >= 0 for o in e["data_offsets"])):
        raise FileFormatError(f"{bad}: tensor {name!r} has a malformed header entry {str(e)[:200]}")
    if e["dtype"] not in DTYPES:
        raise FileFormatError(f"{path}: tensor {name!r} has dtype {str(e['dtype'])[:20]}, which lowrank does not "
                              f"read (it reads {sorted(DTYPES)})")
    dtype, (b, end) = np.dtype(DTYPES[e["dtype"]]), e["data_offsets"]
    if end - b != math.prod(e["shape"]) * dtype.itemsize:
        raise FileFormatError(f"{bad}: tensor {name!r} of shape {tuple(e['shape'])} and dtype {e['dtype']} "
                              f"needs {math.prod(e['shape']) * dtype.itemsize} bytes, its offsets give {end - b}")
    return dtype, tuple(e["shape"]), (b, end)


def read_tensor_file(path, allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, after checking its integrity.

    Refuses a missing, truncated or corrupted file, dtypes lowrank can't read, tensors that
    don't match the checksums lowrank wrote, and NaN/Inf values unless ``allow_nonfinite``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    data = bytearray(path.read_bytes())            # writable: the arrays below are views of it
    entries, metadata, start = parse_header(path, data, len(data))
    tensors = {k: np.frombuffer(data, dtype, math.prod(shape), start + b).reshape(shape) if b < e
               else np.zeros(shape, dtype) for k, (dtype, shape, (b, e)) in entries.items()}
    _verify_checksums(path, tensors, metadata)
    if not allow_nonfinite:
        bad = sorted(k for k, a in tensors.items() if is_float(a.dtype) and not np.isfinite(a).all())
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
    expected dtypes. Keys must match exactly; a dtype may differ only by a lossless float upcast
    (bfloat16 and float16 to float32 or float64, float32 to float64)."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FileFormatError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    out = {}
    for key, (shape, dtype, what) in expected.items():
        a, dtype = tensors[key], np.dtype(dtype)
        if tuple(a.shape) != tuple(shape):
            raise FileFormatError(f"{path}: {key!r} ({what}) has shape {tuple(a.shape)}, expected {tuple(shape)}")
        lossless = is_float(a.dtype) and is_float(dtype) and np.can_cast(a.dtype, dtype, "safe")
        if a.dtype != dtype and not lossless:
            raise FileFormatError(f"{path}: {key!r} ({what}) has dtype {a.dtype}; the model takes {dtype} "
                                  f"(or a float type that converts to it exactly)")
        out[key] = a.astype(dtype, copy=False)
    return out
