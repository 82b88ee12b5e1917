"""safetensors files, read and written here in one place (``safetensors.numpy`` has no bfloat16).

The format: an 8-byte little-endian header length n, n bytes of JSON, then the data:

    {"__metadata__": {str: str},                                   optional
     name: {"dtype": "BF16", "shape": [D_out, D_in], "data_offsets": [begin, end]}, ...}

Offsets count from the end of the header; the tensors tile the data exactly, little-endian
(lowrank assumes a little-endian host, as NumPy wheels and CUDA do), row-major. bfloat16 is ``ml_dtypes.bfloat16``. lowrank writes ``format: pt`` (PEFT's marker)
and a per-tensor sha256 table under ``lowrank.sha256``, checked on every load; files from
other writers carry none. A file may also record the sha256 of the files saved beside it
(``lowrank.bound_sha256``: a model folder's config.json), so a folder that mixes two saves is
refused. Reading refuses, as FileFormatError naming the file (never quoting the bytes of a file
that is not safetensors): truncated or malformed files, dtypes it can't read (naming the tensor
and the dtype), checksum mismatches and NaN/Inf unless ``allow_nonfinite``. It reads the header
first and maps the data copy-on-write: the tensors are views of the map, so a load holds the
file's bytes once.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ml_dtypes
import numpy as np

from ..nn.device import to_device

CHECKSUM_KEY = "lowrank.sha256"
BOUND_KEY = "lowrank.bound_sha256"             # {sibling file name: sha256}: files saved with this one
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
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


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


def tensor_file_bytes(tensors: dict, metadata: dict | None = None, bind: dict | None = None) -> bytes:
    """safetensors bytes of ``tensors`` (NumPy or CuPy), with PEFT's ``format: pt`` and checksums.

    ``bind`` {file name: bytes} names the files saved beside this one (a model folder's
    config.json, training_args.json): their sha256 goes in the metadata, and ``read_tensor_file``
    refuses the file when a sibling of that name holds other bytes (a mix of two saves).
    """
    arrays = {k: np.ascontiguousarray(to_device(v, "cpu")) for k, v in sorted(tensors.items())}
    bad = [name for name in (bind or {}) if not _plain_name(name)]
    if bad:
        raise ValueError(f"bind: {bad} are not plain file names (the bound files sit beside the tensor file)")
    meta = {"format": "pt", **(metadata or {}),
            CHECKSUM_KEY: json.dumps({k: _digest(a) for k, a in arrays.items()}, sort_keys=True),
            **({BOUND_KEY: json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in bind.items()}, sort_keys=True)}
               if bind else {})}
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
MAX_HEADER_BYTES = 100_000_000                  # safetensors' own limit on the JSON header
CHUNK_BYTES = 1 << 22                           # checksums and finiteness are checked this many bytes at a time


def _header_length(path, head: bytes, size: int) -> int:
    """The header length the first 8 bytes give; never echoed (the file may be anything)."""
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not 0 < n <= min(size - 8, MAX_HEADER_BYTES):
        raise FileFormatError(f"{path}: not a valid safetensors file (truncated or corrupted?): its first 8 bytes "
                              f"don't give a header length that fits the file's {size} bytes "
                              f"(and safetensors' {MAX_HEADER_BYTES:,}-byte limit)")
    return n


def parse_header(path, head: bytes, size: int) -> tuple[dict, dict, int]:
    """({name: (dtype, shape, (begin, end))}, metadata, data start) of a safetensors file of ``size``
    bytes that starts with ``head`` (the length and the whole header)."""
    bad = f"{path}: not a valid safetensors file (truncated or corrupted?)"
    n = _header_length(path, head, size)
    try:
        header = json.loads(bytes(head[8:8 + n]).decode("utf-8"))
    except UnicodeDecodeError as e:                # the message would quote the byte
        raise FileFormatError(f"{bad}: the header is not UTF-8 (at byte {8 + e.start})") from None
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{bad}: the header is not JSON: {e.msg} at byte {8 + e.pos}") from None
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
        raise FileFormatError(f"{bad}: tensor {name!r} has a malformed header entry (expected exactly dtype, "
                              f"shape: [int >= 0, ...] and data_offsets: [begin, end])")
    if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
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
    don't match the checksums lowrank wrote, NaN/Inf values unless ``allow_nonfinite``, and
    files bound to siblings (``bind``) that another save has replaced. The header is read and
    checked first; the tensors are then views of a copy-on-write map of the file (writable, and
    nothing is copied until a value is written), checked a chunk at a time.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    _refuse_interrupted_save(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(8)
        n = _header_length(path, first, size)
        entries, metadata, start = parse_header(path, first + f.read(n), size)
        data = _map(f) if size > start else b""
    tensors = {k: np.frombuffer(data, dtype, math.prod(shape), start + b).reshape(shape) if b < e
               else np.zeros(shape, dtype) for k, (dtype, shape, (b, e)) in entries.items()}
    _verify(path, tensors, metadata, allow_nonfinite)
    _verify_bound_files(path, metadata)
    return tensors, metadata


def _map(f):
    """The file mapped copy-on-write (its pages are shared with the page cache until written), or read once
    where the file system can't map files."""
    try:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        f.seek(0)
        return bytearray(f.read())


def _refuse_interrupted_save(path: Path):
    """A save killed while renaming its files into place may have left a mix: refused until the next save there."""
    from .atomic import interrupted_commit          # atomic imports nothing of this module's
    found = interrupted_commit(path)
    if found is not None:
        folder, targets = found
        raise FileFormatError(f"{path}: a save into {folder} was interrupted while it put {targets} in place: "
                              f"those files may come from two different saves. Save again there (the next save "
                              f"finishes the interrupted one first), or call lowrank.io.atomic."
                              f"finish_interrupted_commits({str(folder)!r}) to complete it")


def _scan(a: np.ndarray, digest: bool, finite: bool) -> tuple[str | None, bool]:
    """(sha256 of ``a``'s bytes when ``digest``, whether it holds no NaN/Inf when ``finite``), in one pass
    of cache-sized chunks (no copy of ``a``, no mask of its size)."""
    flat, h, ok = a.reshape(-1), hashlib.sha256() if digest else None, True
    check = finite and is_float(a.dtype)
    step = max(1, CHUNK_BYTES // max(1, a.itemsize))
    for i in range(0, flat.size if digest or check else 0, step):
        chunk = flat[i:i + step]
        if digest:
            h.update(chunk.view(np.uint8))
        ok = ok and (not check or bool(np.isfinite(chunk).all()))
    return (h.hexdigest() if digest else None), ok


def _verify(path, tensors, metadata, allow_nonfinite):
    """Checksums (files lowrank wrote) and finiteness, the tensors scanned on a few threads."""
    table = _checksum_table(path, tensors, metadata)
    with ThreadPoolExecutor(min(len(tensors), os.cpu_count() or 1) or 1) as pool:
        scans = dict(zip(tensors, pool.map(lambda a: _scan(a, table is not None, not allow_nonfinite),
                                           tensors.values())))
    if table is not None:
        bad = sorted(k for k, (digest, _) in scans.items() if table[k] != digest)
        if bad:
            raise FileFormatError(f"{path}: tensors {bad} don't match their checksums: the file is corrupted")
    bad = sorted(k for k, (_, finite) in scans.items() if not finite)
    if bad:
        raise FileFormatError(f"{path}: tensors {bad} hold NaN or Inf; pass allow_nonfinite=True to load them")


def _checksum_table(path, tensors, metadata):
    """{name: sha256} lowrank recorded, checked to list exactly the file's tensors; None for other writers."""
    if CHECKSUM_KEY not in metadata:            # files from other writers (PEFT) carry none
        return None
    try:
        table = json.loads(metadata[CHECKSUM_KEY])
    except ValueError as e:
        raise FileFormatError(f"{path}: the checksum table in the metadata is not valid JSON: {e}") from e
    if not isinstance(table, dict) or set(table) != set(tensors):
        listed = sorted(table) if isinstance(table, dict) else table
        raise FileFormatError(f"{path}: the checksum table lists {listed} but the file holds {sorted(tensors)} "
                              f"(tensors renamed, dropped or added after saving?)")
    return table


def _verify_bound_files(path: Path, metadata: dict):
    """The sibling files this tensor file was saved with (``bind``) still hold the bytes saved with it."""
    if BOUND_KEY not in metadata:
        return
    try:
        bound = json.loads(metadata[BOUND_KEY])
        assert isinstance(bound, dict) and all(isinstance(v, str) for v in bound.values())
        assert all(_plain_name(name) for name in bound)
    except (ValueError, AssertionError):
        raise FileFormatError(f"{path}: the {BOUND_KEY!r} table in the metadata must map file names in the same "
                              f"folder to sha256 digests") from None
    for name, digest in sorted(bound.items()):
        other = path.parent / name
        if not other.is_file() or hashlib.sha256(other.read_bytes()).hexdigest() != digest:
            found = "is missing" if not other.is_file() else "holds other bytes"
            raise FileFormatError(f"{path} was saved with a different {other} (it {found}: its sha256 is not the "
                                  f"one recorded in the tensors): the two files come from two different saves "
                                  f"(one interrupted, or two writers at once?) or it was edited; save again")


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def check_tensors(path, expected: dict, tensors: dict, convert: bool = True) -> dict:
    """Check ``tensors`` against ``expected`` {key: (shape, dtype, what)}; return them cast to the
    expected dtypes (as they are with ``convert=False``: the caller casts them where it wants them).
    Keys must match exactly; a dtype may differ only by a lossless float upcast (bfloat16 and float16
    to float32 or float64, float32 to float64)."""
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
        out[key] = a.astype(dtype, copy=False) if convert else a
    return out
