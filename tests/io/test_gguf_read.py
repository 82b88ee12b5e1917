"""Reading GGUF files (lowrank.io.gguf): tensor types against gguf's own arrays, and hostile files.

Files are written with gguf's GGUFWriter. Each tensor type reads back bit-exactly to what gguf's
``dequantize`` makes of the bytes written (block formats quantized by gguf where it can, K-quants and
IQ4 from random block bytes; F32/F16/BF16 equal to the arrays written). Each corruption, made by
overwriting one field at the offset gguf's reader reports for it, gives one FileFormatError naming the
file, before anything is allocated from the corrupted size (checked with tracemalloc).
"""
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from lowrank.app import cli
from lowrank.io.gguf import SUPPORTED_TYPES, FileFormatError, read_gguf

QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")          # gguf.quants.quantize writes these
RAW_BLOCKS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")   # gguf dequantizes only


def write(path, tensors: dict, arch="llama", kv=()):
    """A GGUF holding ``tensors`` {name: (array, raw_dtype or None)} and metadata ``kv`` [(key, value, type)]."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value, vtype in kv:
        w.add_key_value(key, value, vtype)
    for name, (array, raw_dtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_block_formats_match_gguf_dequantize(tmp_path, qtype):
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((5, 96)) * rng.uniform(0.01, 10, (5, 1))).astype(np.float32)
    blocks = gguf.quants.quantize(W, Q[qtype])
    f = read_gguf(write(tmp_path / "q.gguf", {"w.weight": (blocks, Q[qtype])}))
    assert f.tensors["w.weight"].type_name == qtype and f.shape("w.weight") == (5, 96)
    np.testing.assert_array_equal(bits(f.dequantize("w.weight")), bits(gguf.quants.dequantize(blocks, Q[qtype])))


@pytest.mark.parametrize("qtype", RAW_BLOCKS)
def test_raw_blocks_match_gguf_dequantize(tmp_path, qtype):
    block, block_bytes = gguf.GGML_QUANT_SIZES[Q[qtype]]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (3, 2 * block_bytes), dtype=np.uint8)     # 3 rows of 2 blocks
    f = read_gguf(write(tmp_path / "k.gguf", {"w.weight": (raw, Q[qtype])}))
    assert f.shape("w.weight") == (3, 2 * block)
    with np.errstate(all="ignore"):                  # random float16 scales include Inf and NaN
        ours, theirs = f.dequantize("w.weight"), gguf.quants.dequantize(raw, Q[qtype])
    np.testing.assert_array_equal(bits(ours), bits(theirs))


@pytest.mark.parametrize("dtype,raw", [(np.float32, None), (np.float16, None), ("bfloat16", Q.BF16)])
def test_float_types_load_as_they_are(tmp_path, dtype, raw):
    rng = np.random.default_rng(2)
    W = rng.standard_normal((4, 6, 8)).astype(np.float32)
    if raw is None:
        stored = W.astype(dtype)
        expected = stored.astype(np.float32)
    else:          # bfloat16: the top 16 bits of float32 values that are exact in bfloat16
        expected = (bits(W) & 0xFFFF0000).view(np.float32)
        stored = (bits(expected) >> 16).astype(np.uint16).view(np.uint8).reshape(4, 6, 16)
    f = read_gguf(write(tmp_path / "f.gguf", {"w.weight": (stored, raw)}))
    assert f.shape("w.weight") == (4, 6, 8)
    np.testing.assert_array_equal(f.dequantize("w.weight"), expected)


def test_file_is_memory_mapped(tmp_path):
    W = np.arange(64, dtype=np.float32).reshape(8, 8)
    f = read_gguf(write(tmp_path / "m.gguf", {"w.weight": (W, None)}))
    view = f.dequantize("w.weight")
    base = view
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap) and not view.flags.writeable
    np.testing.assert_array_equal(view, W)


# -- hostile files ------------------------------------------------------------------------------
@pytest.fixture()
def good(tmp_path):
    """A valid file: two tensors, a string key and a string array; returns (path, its bytes, gguf's reader)."""
    tensors = {"a.weight": (np.ones((4, 32), np.float32), None), "b.weight": (np.ones((2, 32), np.float32), None)}
    path = write(tmp_path / "good.gguf", tensors, kv=[("general.name", "tiny", gguf.GGUFValueType.STRING),
                                                       ("tokenizer.ggml.tokens", ["x", "yy", "zzz"],
                                                        gguf.GGUFValueType.ARRAY)])
    return path, bytearray(path.read_bytes()), gguf.GGUFReader(path)


def corrupt(tmp_path, data: bytearray, at: int, fmt: str, value):
    bad = bytearray(data)
    struct.pack_into("<" + fmt, bad, at, value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(bad))
    return path


def fails_cheaply(path, *words):
    """read_gguf(path) raises one FileFormatError naming the file and ``words``, allocating under 1 MiB."""
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError) as e:
            read_gguf(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert str(path) in message and "\n" not in message and all(w in message for w in words), message
    assert peak < 2 ** 20, f"{peak} bytes allocated before refusing"
    return message


def tensor_field(reader, name):
    """Byte offsets of tensor ``name``'s info: (its n_dims, its type, its offset)."""
    t = next(t for t in reader.tensors if t.name == name)
    start = t.field.offset + 8 + len(name)
    n_dims = 4 + 8 * len(t.shape)
    return start, start + n_dims, start + n_dims + 4


def test_good_file_reads(good):
    path, _, _ = good
    f = read_gguf(path)
    assert f.metadata["tokenizer.ggml.tokens"] == ["x", "yy", "zzz"] and f.metadata["general.name"] == "tiny"
    assert sorted(f.tensors) == ["a.weight", "b.weight"]


@pytest.mark.parametrize("keep", [0, 3, 20, 40, 90, -200, -1])
def test_truncated(tmp_path, good, keep):
    path, data, _ = good
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(bytes(data[:keep]))
    with pytest.raises(FileFormatError) as e:
        read_gguf(cut)
    assert str(cut) in str(e.value)


@pytest.mark.parametrize("at", [8, 16])                   # the tensor count, the key-value count
def test_absurd_counts(tmp_path, good, at):
    _, data, _ = good
    fails_cheaply(corrupt(tmp_path, data, at, "Q", 2 ** 62), "more than")


def test_string_length_past_end(tmp_path, good):
    _, data, reader = good
    field = reader.fields["general.name"]
    value_at = field.offset + 8 + len("general.name") + 4
    fails_cheaply(corrupt(tmp_path, data, value_at, "Q", 2 ** 60), "general.name", "string of")
    fails_cheaply(corrupt(tmp_path, data, field.offset, "Q", 2 ** 60), "metadata key")


def test_array_length_past_end(tmp_path, good):
    _, data, reader = good
    field = reader.fields["tokenizer.ggml.tokens"]
    length_at = field.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    fails_cheaply(corrupt(tmp_path, data, length_at, "Q", 2 ** 60), "tokenizer.ggml.tokens", "array of")
    first_item_at = length_at + 8
    fails_cheaply(corrupt(tmp_path, data, first_item_at, "Q", 2 ** 40), "tokenizer.ggml.tokens")


def test_tensor_offset_outside_data(tmp_path, good):
    _, data, reader = good
    _, _, offset_at = tensor_field(reader, "b.weight")
    fails_cheaply(corrupt(tmp_path, data, offset_at, "Q", 2 ** 40), "b.weight", "past the end")


def test_tensor_offsets_overlap(tmp_path, good):
    _, data, reader = good
    _, _, offset_at = tensor_field(reader, "b.weight")
    fails_cheaply(corrupt(tmp_path, data, offset_at, "Q", 32), "overlap")


def test_tensor_dims_absurd(tmp_path, good):
    _, data, reader = good
    n_dims_at, _, _ = tensor_field(reader, "a.weight")
    fails_cheaply(corrupt(tmp_path, data, n_dims_at + 4, "Q", 2 ** 62), "a.weight")
    fails_cheaply(corrupt(tmp_path, data, n_dims_at, "I", 2 ** 31), "a.weight", "dimensions")


@pytest.mark.parametrize("type_id,words", [(99, ("unknown type id 99",)), (int(Q.I32), ("I32", "Q4_K"))])
def test_unknown_or_unsupported_tensor_type(tmp_path, good, type_id, words):
    _, data, reader = good
    _, type_at, _ = tensor_field(reader, "a.weight")
    fails_cheaply(corrupt(tmp_path, data, type_at, "I", type_id), "a.weight", *words)


def test_unknown_value_type(tmp_path, good):
    _, data, reader = good
    field = reader.fields["general.name"]
    fails_cheaply(corrupt(tmp_path, data, field.offset + 8 + len("general.name"), "I", 77), "value type 77")


def test_not_gguf_and_empty(tmp_path):
    for content in (b"", b"GGML" + bytes(40), b"GGUF" + struct.pack("<IQQ", 99, 0, 0)):
        path = tmp_path / "x.gguf"
        path.write_bytes(content)
        with pytest.raises(FileFormatError) as e:
            read_gguf(path)
        assert str(path) in str(e.value)


def test_supported_types_listed():
    assert set(SUPPORTED_TYPES) >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K",
                                    "Q6_K"}


def test_cli_gives_one_line(tmp_path, good, capsys):
    _, data, _ = good
    bad = corrupt(tmp_path, data, 8, "Q", 2 ** 62)
    assert cli.main(["serve", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(bad) in err, err
