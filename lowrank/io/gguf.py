"""GGUF files (llama.cpp's format) read through the ``gguf`` package, checked before they are trusted.

A GGUF is a header (magic "GGUF", version, tensor count, key-value count), the key-value metadata,
one info record per tensor (name, dims fastest first, ggml type, offset into the data), then the
tensor data, each tensor at an aligned offset. ``gguf.GGUFReader`` memory-maps the file and reads it
without bounds checks (an array length past the end makes it loop over empty views for as long as
the length says), so ``check_layout`` first walks the header on the memory map, checking every count,
length, type and offset against the file's size; nothing is allocated from a size before that.

``read_gguf(path)`` -> ``GGUFFile``: the metadata as Python values, the tensors as memory-mapped
arrays, and ``dequantize(name)`` -> float32 in NumPy order (rows = ggml's last dim). Errors are
``FileFormatError`` naming the file and what is wrong.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tensor_files import FileFormatError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)                       # what gguf's reader reads (version 1 had 32-bit counts)
GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
# GGUF value types: {type id: (name, size in bytes)}; 8 (string) and 9 (array) have variable size.
SCALARS = {0: ("uint8", 1), 1: ("int8", 1), 2: ("uint16", 2), 3: ("int16", 2), 4: ("uint32", 4), 5: ("int32", 4),
           6: ("float32", 4), 7: ("bool", 1), 10: ("uint64", 8), 11: ("int64", 8), 12: ("float64", 8)}
STRING, ARRAY = 8, 9
# Tensor types loaded as they are (F32, F16, BF16) and those dequantized with gguf.quants.dequantize.
PLAIN_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
SUPPORTED_TYPES = PLAIN_TYPES + QUANT_TYPES


class _Cursor:
    """Reads little-endian values from ``buf`` at ``pos``; FileFormatError instead of reading past ``end``."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, what: str):
        raise FileFormatError(f"{self.path}: {what} (at byte {self.pos} of {self.end}): not a valid GGUF file, "
                              f"or a truncated one")

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.end:
            self.fail(f"{what} needs {n} bytes but only {self.end - self.pos} are left")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", f"the length of {what}")
        self.need(n, f"{what} (a string of {n} bytes)")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def skip_string(self, what: str):
        n = self.unpack("Q", f"the length of {what}")
        self.need(n, f"{what} (a string of {n} bytes)")
        self.pos += n


def _skip_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    """Move past one value of type ``vtype``, checking every length against the file's end."""
    if vtype in SCALARS:
        cur.need(SCALARS[vtype][1], f"the value of {key!r}")
        cur.pos += SCALARS[vtype][1]
    elif vtype == STRING:
        cur.skip_string(f"the value of {key!r}")
    elif vtype == ARRAY and depth == 0:
        itype, count = cur.unpack("I", f"the item type of {key!r}"), cur.unpack("Q", f"the length of {key!r}")
        if itype in SCALARS:
            cur.need(count * SCALARS[itype][1], f"{key!r} (an array of {count} {SCALARS[itype][0]})")
            cur.pos += count * SCALARS[itype][1]
        elif itype == STRING:
            cur.need(count * 8, f"{key!r} (an array of {count} strings)")     # each string has an 8-byte length
            for _ in range(count):
                cur.skip_string(f"an item of {key!r}")
        else:
            cur.fail(f"{key!r} is an array of value type {itype}, expected a scalar or string type")
    else:
        cur.fail(f"{key!r} has value type {vtype}, expected one of {sorted([*SCALARS, STRING, ARRAY])}"
                 + (" (arrays of arrays are not supported)" if vtype == ARRAY else ""))


@dataclass
class TensorInfo:
    name: str
    type_name: str           # ggml type, e.g. "Q4_K"
    dims: tuple              # ggml order, fastest first
    start: int               # absolute byte offset of the data in the file
    nbytes: int


def _skip_metadata(cur: _Cursor, n_kv: int) -> int:
    """Move past ``n_kv`` key-values, each checked; returns general.alignment (default 32)."""
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cur.string("a metadata key").decode("utf-8", "replace")
        vtype = cur.unpack("I", f"the value type of {key!r}")
        if key != "general.alignment":
            _skip_value(cur, vtype, key)
            continue
        if vtype != 4:
            cur.fail(f"general.alignment has value type {vtype}, expected uint32 (4)")
        alignment = cur.unpack("I", "general.alignment")
        if alignment == 0 or alignment & (alignment - 1):
            cur.fail(f"general.alignment is {alignment}, expected a power of two")
    return alignment


def _tensor_info(cur: _Cursor) -> TensorInfo:
    """One tensor's info record (``start`` still relative to the data section), its type and dims checked."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = cur.string("a tensor name").decode("utf-8", "replace")
    n_dims = cur.unpack("I", f"the dimension count of {name!r}")
    if not 1 <= n_dims <= GGML_MAX_DIMS:
        cur.fail(f"tensor {name!r} has {n_dims} dimensions, expected 1 to {GGML_MAX_DIMS}")
    dims = tuple(cur.unpack("Q", f"the dims of {name!r}") for _ in range(n_dims))
    raw_type, offset = cur.unpack("I", f"the type of {name!r}"), cur.unpack("Q", f"the offset of {name!r}")
    try:
        ggml_type = GGMLQuantizationType(raw_type).name
    except ValueError:
        ggml_type = f"unknown type id {raw_type}"
    if ggml_type not in SUPPORTED_TYPES:
        raise FileFormatError(f"{cur.path}: tensor {name!r} has ggml type {ggml_type}; lowrank reads "
                              f"{', '.join(SUPPORTED_TYPES)}")
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    n = int(np.prod(dims, dtype=object))                        # Python ints: no overflow
    if n == 0 or dims[0] % block:
        cur.fail(f"tensor {name!r} has dims {list(dims)}: needs at least one element and a first dim that is a "
                 f"multiple of {ggml_type}'s block of {block}")
    return TensorInfo(name, ggml_type, dims, offset, n // block * block_bytes)


def check_layout(buf, path: Path) -> list[TensorInfo]:
    """Walk a GGUF's header on ``buf`` (the file's bytes, memory-mapped) and check it against the file's
    size: counts, string and array lengths, value and tensor types, tensor sizes, offsets and overlaps.
    Returns the tensors' infos; FileFormatError naming the first problem."""
    cur = _Cursor(buf, path)
    cur.need(24, "the 24-byte header")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise FileFormatError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version, n_tensors, n_kv = cur.unpack("I", "version"), cur.unpack("Q", "tensor count"), cur.unpack("Q", "kv count")
    if version not in GGUF_VERSIONS:
        raise FileFormatError(f"{path}: GGUF version {version} (or a big-endian file); lowrank reads little-endian "
                              f"versions {GGUF_VERSIONS}")
    left = cur.end - cur.pos
    if n_kv > left // 13 or n_tensors > left // 24:       # smallest key-value: 8 + 1 + 4 bytes; tensor info: 24
        raise FileFormatError(f"{path}: the header claims {n_kv} key-values and {n_tensors} tensors, more than "
                              f"{left} bytes can hold")
    alignment = _skip_metadata(cur, n_kv)
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    if len({t.name for t in infos}) != len(infos):
        raise FileFormatError(f"{path}: two tensors share a name")
    for t in infos:
        if t.start % alignment:
            raise FileFormatError(f"{path}: tensor {t.name!r} starts at offset {t.start}, not a multiple of the "
                                  f"alignment {alignment}")
        t.start += data_start
        if t.start + t.nbytes > cur.end:
            raise FileFormatError(f"{path}: tensor {t.name!r} ({t.nbytes} bytes at {t.start}) ends past the end of "
                                  f"the file ({cur.end} bytes): truncated, or a bad offset")
    ordered = sorted(infos, key=lambda t: t.start)
    for a, b in zip(ordered, ordered[1:]):
        if a.start + a.nbytes > b.start:
            raise FileFormatError(f"{path}: tensors {a.name!r} and {b.name!r} overlap ({a.name!r} holds bytes "
                                  f"{a.start}..{a.start + a.nbytes}, {b.name!r} starts at {b.start})")
    return infos


def _reader(path):
    """gguf's GGUFReader over a plain ndarray view of its memory map: the same bytes, but its many small slices
    (several per token and merge) skip np.memmap's per-slice bookkeeping, which dominates reading a large vocabulary."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        @property
        def data(self):
            return self._mapped

        @data.setter
        def data(self, mapped):
            self._mapped = mapped.view(np.ndarray)        # its .base is the np.memmap, kept alive

    return Reader(path)


class GGUFFile:
    """A checked GGUF, memory-mapped: ``metadata`` {key: value}, ``tensors`` {name: TensorInfo},
    ``dequantize(name)`` -> float32 array in NumPy order (rows, ..., cols)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileFormatError(f"{self.path}: file not found")
        mm = np.memmap(self.path, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        self.tensors = {t.name: t for t in check_layout(memoryview(mm), self.path)}
        try:
            self.reader = _reader(self.path)
            self.metadata = {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}
        except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError) as e:
            raise FileFormatError(f"{self.path}: gguf's reader refused it: {e}") from e
        self._data = {t.name: t.data for t in self.reader.tensors}

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type):
        """The metadata value of ``key``, checked to be a ``kind``; FileFormatError if absent or mistyped."""
        value = self.metadata.get(key)
        if value is None:
            raise FileFormatError(f"{self.path}: metadata key {key!r} is missing")
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise FileFormatError(f"{self.path}: metadata key {key!r} is {value!r}, expected a {kind.__name__}")
        return value

    def shape(self, name: str) -> tuple:
        """The tensor's NumPy shape (ggml dims reversed)."""
        return tuple(reversed(self.tensors[name].dims))

    def raw(self, name: str) -> np.ndarray:
        """Tensor ``name`` as stored, a read-only view of the memory map: a block format's (rows, row bytes) uint8."""
        return self._data[name]

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 in NumPy order; F32 is a read-only view of the memory map."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        data = self._data[name]
        if info.type_name == "F32":
            return data.reshape(self.shape(name))
        return dequantize(data, GGMLQuantizationType[info.type_name]).reshape(self.shape(name))


def read_gguf(path) -> GGUFFile:
    """A checked, memory-mapped GGUF (``GGUFFile``); FileFormatError naming the file and the problem."""
    return GGUFFile(path)
