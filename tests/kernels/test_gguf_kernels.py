"""GGUF kernels (Q8_0, Q4_0, Q4_1, Q4_K in Numba; Q5_0, Q5_1, Q5_K, Q6_K in the reference, which Numba
falls back to): dequantize bit-exact to ``gguf``'s own ``dequantize`` in
the reference and in Numba; the products against float64 products with gguf's dequantized W; tiles
shrunk so tiny weights cross tile borders and the GEMV switched on for N > 1 to cover its row loop;
the blocks as gguf's writer and reader lay them out; and the errors."""
from unittest import mock

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.kernels import config
from lowrank.kernels.numba_cpu import gguf as numba_gguf
from lowrank.kernels.numba_cpu import gguf_vnni
from lowrank.kernels.reference import gguf as reference_gguf

BACKENDS = [reference_gguf, numba_gguf]
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K]
K_SCALES_AT = {Q.Q4_K: slice(0, 4), Q.Q5_K: slice(0, 4), Q.Q6_K: slice(208, 210)}   # a k-quant's f16 d (and dmin)


def blocks_of(rng, qtype, D_out, n_blocks):
    """Blocks of a (D_out, D_in) weight in gguf's layout: Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 quantized by gguf from random
    floats; the k-quants (gguf-py has no quantizer for them) random bytes with finite f16 d (and dmin)."""
    B, S = gguf.GGML_QUANT_SIZES[qtype]
    if qtype not in K_SCALES_AT:
        return quants.quantize(rng.standard_normal((D_out, n_blocks * B)).astype(np.float32), qtype)
    raw = rng.integers(0, 256, (D_out * n_blocks, S), dtype=np.uint8)
    at = K_SCALES_AT[qtype]
    raw[:, at] = rng.uniform(-0.02, 0.02, (raw.shape[0], (at.stop - at.start) // 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(D_out, n_blocks * S)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda m: m.__name__.split(".")[-2])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@given(D_out=st.integers(1, 9), n_blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_dequantize_is_bit_exact_to_gguf(backend, qtype, D_out, n_blocks, seed):
    blocks = blocks_of(np.random.default_rng(seed), qtype, D_out, n_blocks)
    shape = (D_out, n_blocks * gguf.GGML_QUANT_SIZES[qtype][0])
    want = quants.dequantize(blocks, qtype)                              # float32, gguf's own numbers
    got = backend.gguf_dequantize(blocks, qtype, shape)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    got64 = backend.gguf_dequantize(blocks, qtype.name, shape, "float64")   # gguf's values, widened
    assert got64.dtype == np.float64 and np.array_equal(got64, want.astype(np.float64))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda m: m.__name__.split(".")[-2])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("N", [0, 1, 3])
def test_products_equal_float64_products_with_ggufs_weights(backend, qtype, N):
    rng = np.random.default_rng(N)
    blocks = blocks_of(rng, qtype, 11, 2)
    W = quants.dequantize(blocks, qtype).astype(np.float64)              # (D_out, D_in)
    x, dy, b = rng.standard_normal((N, W.shape[1])), rng.standard_normal((N, 11)), rng.standard_normal(11)
    with mock.patch.object(config, "NF4_TILE_ROWS", 4), mock.patch.object(config, "NF4_POOL_TILE_ROWS", 4), \
            mock.patch.object(config, "NF4_GEMV_MAX_N", 3 if N == 3 and backend is numba_gguf else 1):
        y = backend.gguf_matmul(x, blocks, qtype, W.shape, b)
        dx = backend.gguf_matmul_dx(dy, blocks, int(qtype), W.shape)
        y32 = backend.gguf_matmul(x.astype(np.float32), blocks, qtype, W.shape)
    np.testing.assert_allclose(y, x @ W.T + b, rtol=1e-12, atol=1e-12 * np.abs(W).sum())
    np.testing.assert_allclose(dx, dy @ W, rtol=1e-12, atol=1e-12 * np.abs(W).sum())
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, x @ W.T, rtol=1e-5, atol=1e-6 * np.abs(W).sum())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("path", ["vpermps", "vector IR", "numba loops"])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_float32_path_gives_ggufs_weights_and_products(qtype, path, threads):
    """Numba's float32 kernels for Q8_0/Q4_0/Q4_1 three ways (the vector IR with AVX-512's vpermps decode, the
    generic vector IR, config.GGUF_VECTOR_IR off): W bit-exact to gguf's; the GEMV (N = 1: 11 rows, so whole
    passes of IR_ROWS and a remainder; on 2 threads rows split in chunks) and the tiles (N = 3) against float64."""
    if path == "vpermps" and not numba_gguf.PERMPS:
        pytest.skip("vpermps needs an AVX-512 CPU that Numba compiles for")
    rng = np.random.default_rng(int(qtype))
    blocks = blocks_of(rng, qtype, 11, 5)
    want = quants.dequantize(blocks, qtype)                              # (11, 160) float32
    W = want.astype(np.float64)
    x1, x3, dy = (rng.standard_normal(s).astype(np.float32) for s in ((1, 160), (3, 160), (3, 11)))
    with mock.patch.object(config, "GGUF_VECTOR_IR", path != "numba loops"), \
            mock.patch.object(numba_gguf, "PERMPS", path == "vpermps"), \
            mock.patch.object(config, "NF4_TILE_ROWS", 4), mock.patch.object(config, "NF4_POOL_TILE_ROWS", 4), \
            mock.patch.object(config, "NUMBA_POOL_MIN_ELEMENTS", 0), numba_gguf.pool.limit(threads):
        got = numba_gguf.gguf_dequantize(blocks, qtype, W.shape)
        y1, y3 = (numba_gguf.gguf_matmul(x, blocks, qtype, W.shape) for x in (x1, x3))
        dx = numba_gguf.gguf_matmul_dx(dy, blocks, qtype, W.shape)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    tol = dict(rtol=1e-5, atol=1e-6 * np.abs(W).sum())
    np.testing.assert_allclose(y1, x1 @ W.T, **tol)
    np.testing.assert_allclose(y3, x3 @ W.T, **tol)
    np.testing.assert_allclose(dx, dy @ W, **tol)


def ggufs_q8_0(x):
    """x rounded to Q8_0 blocks by gguf's own quantizer and dequantizer (llama.cpp's activations), float32."""
    return quants.dequantize(quants.quantize(np.asarray(x, np.float32), Q.Q8_0), Q.Q8_0)


@given(N=st.integers(0, 4), n_blocks=st.integers(1, 5), scale=st.sampled_from([1e-4, 1.0, 3e3]),
       seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_round_q8_0_is_bit_exact_to_ggufs_quantizer(N, n_blocks, scale, seed):
    """Ties (k + 0.5 after scaling) round away from zero, an all-zero block stays zero, d is stored as f16."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, 32 * n_blocks)) * scale).astype(np.float32)
    if N:
        x[0, :32] = 0                                                    # d = 0
        x[-1, -32:] = (np.arange(32) - 15.5) * scale                     # max 15.5·scale: q = x·127/max, ties
    got = reference_gguf.round_q8_0(x)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), ggufs_q8_0(x).view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda m: m.__name__.split(".")[-2])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("N", [0, 1, 3])
def test_q8_product_is_ggufs_rounded_x_times_ggufs_weights(backend, qtype, N):
    """gguf_matmul_q8 = (x rounded by gguf's Q8_0) · W in float64, for every format, float32 and float64 x."""
    rng = np.random.default_rng(N + 10)
    blocks = blocks_of(rng, qtype, 11, 2 if qtype in K_SCALES_AT else 5)
    W = quants.dequantize(blocks, qtype).astype(np.float64)
    x, b = rng.standard_normal((N, W.shape[1])), rng.standard_normal(11)
    want = ggufs_q8_0(x).astype(np.float64) @ W.T
    y64 = backend.gguf_matmul_q8(x, blocks, qtype, W.shape, b)
    y32 = backend.gguf_matmul_q8(x.astype(np.float32), blocks, qtype, W.shape)
    assert y64.dtype == np.float64 and y32.dtype == np.float32
    np.testing.assert_allclose(y64, want + b, rtol=1e-12, atol=1e-12 * np.abs(W).sum())
    np.testing.assert_allclose(y32, want, rtol=1e-5, atol=1e-6 * np.abs(W).sum())


@pytest.mark.skipif(not gguf_vnni.AVAILABLE, reason="the VNNI GEMV needs AVX-512 VNNI, VL and BW")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("threads", [1, 2])
@given(D_out=st.integers(1, 13), n_blocks=st.integers(1, 10), N=st.integers(1, 3), seed=st.integers(0, 2**16))
@settings(max_examples=12, deadline=None)
def test_vnni_gemv_gives_the_rounded_product(qtype, threads, D_out, n_blocks, N, seed):
    """The VNNI GEMV over whole groups of 4 blocks and the blocks after them (1 to 10 blocks a row), whole passes
    of IR_ROWS rows and the rest, rows split in chunks on 2 threads: (gguf's Q8_0 of x) · W, with zero-scale
    blocks and x with an all-zero block; and it is the path taken (not the tiles)."""
    rng = np.random.default_rng(seed)
    blocks = blocks_of(rng, qtype, D_out, n_blocks)
    blocks[rng.integers(D_out), :2] = 0                                  # a block with d = 0
    W = quants.dequantize(blocks, qtype).astype(np.float64)
    x = rng.standard_normal((N, W.shape[1])).astype(np.float32)
    x[0, :32] = 0
    with mock.patch.object(config, "NUMBA_POOL_MIN_ELEMENTS", 0), numba_gguf.pool.limit(threads), \
            mock.patch.object(numba_gguf, "gguf_matmul", side_effect=AssertionError("tiles taken")):
        y = numba_gguf.gguf_matmul_q8(x, blocks, qtype, W.shape)
    np.testing.assert_allclose(y, ggufs_q8_0(x).astype(np.float64) @ W.T, rtol=1e-5, atol=1e-6 * np.abs(W).sum())


def test_q8_product_without_vnni_rounds_x_then_multiplies():
    """Where the VNNI GEMV cannot run (no VNNI, more rows than GGUF_Q8_MAX_N), the same numbers through the tiles."""
    rng = np.random.default_rng(3)
    blocks = blocks_of(rng, Q.Q4_0, 7, 6)
    x = rng.standard_normal((2, 192)).astype(np.float32)
    want = ggufs_q8_0(x).astype(np.float64) @ quants.dequantize(blocks, Q.Q4_0).astype(np.float64).T
    for patch in (mock.patch.object(gguf_vnni, "AVAILABLE", False), mock.patch.object(config, "GGUF_Q8_MAX_N", 1)):
        with patch:
            np.testing.assert_allclose(numba_gguf.gguf_matmul_q8(x, blocks, "Q4_0", (7, 192)), want, rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("seed", range(11, 20))
def test_the_q4_k_gemv_multiplies_ggufs_float32_weights(seed):
    """Each Q4_K weight (d·sc)·q − dmin·mn rounds to float32 as gguf's own (the GEMV once summed d·(sc·Σ x·q)
    − dmin·(mn·Σ x) unrounded: 1e-8 off in float64 for some of these seeds)."""
    rng = np.random.default_rng(seed)
    blocks = blocks_of(rng, Q.Q4_K, 11, 2)
    W = quants.dequantize(blocks, Q.Q4_K).astype(np.float64)
    x = rng.standard_normal((1, W.shape[1]))
    np.testing.assert_allclose(numba_gguf.gguf_matmul(x, blocks, Q.Q4_K, W.shape), x @ W.T, rtol=1e-12,
                               atol=1e-12 * np.abs(W).sum())


def test_blocks_are_what_ggufs_writer_writes_and_its_reader_gives(tmp_path):
    """A tensor written by GGUFWriter and read back by GGUFReader: data is (D_out, bytes a row), shape reversed."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(tmp_path / "w.gguf", "llama")
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        writer.add_tensor(f"w.{qtype.name}", quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for t in gguf.GGUFReader(tmp_path / "w.gguf").tensors:
        shape = tuple(int(d) for d in reversed(t.shape))                 # GGUF lists (D_in, D_out)
        W = reference_gguf.gguf_dequantize(t.data, t.tensor_type, shape)
        assert shape == (6, 64) and np.array_equal(W, quants.dequantize(quants.quantize(w, t.tensor_type),
                                                                        t.tensor_type))
        np.testing.assert_array_equal(numba_gguf.gguf_matmul(w[:1], t.data, t.tensor_type, shape),
                                      numba_gguf.gguf_matmul(w[:1], np.array(t.data), t.tensor_type, shape))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda m: m.__name__.split(".")[-2])
def test_bad_inputs_are_named(backend):
    blocks = quants.quantize(np.ones((2, 32), np.float32), Q.Q4_0)       # (2, 18)
    with pytest.raises(ValueError, match="qtype must be one of"):
        backend.gguf_dequantize(blocks, "Q2_K", (2, 32))
    with pytest.raises(ValueError, match="qtype must be one of"):
        backend.gguf_dequantize(blocks, int(Q.IQ4_NL), (2, 32))
    with pytest.raises(ValueError, match=r"Q5_0 blocks must be uint8 of shape \(2, 22\)"):
        backend.gguf_dequantize(blocks, "Q5_0", (2, 32))
    with pytest.raises(ValueError, match=r"Q4_0 rows are whole blocks of 32 weights, got D_in = 30"):
        backend.gguf_dequantize(blocks, Q.Q4_0, (2, 30))
    with pytest.raises(ValueError, match=r"blocks must be uint8 of shape \(2, 36\)"):
        backend.gguf_dequantize(blocks, Q.Q4_0, (2, 64))
    with pytest.raises(TypeError, match="x must be float32 or float64, got dtype float16"):
        backend.gguf_matmul(np.ones((1, 32), np.float16), blocks, Q.Q4_0, (2, 32))
    with pytest.raises(ValueError, match=r"dy has shape \(1, 3\), expected \(N, 2\)"):
        backend.gguf_matmul_dx(np.ones((1, 3)), blocks, Q.Q4_0, (2, 32))
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        backend.gguf_dequantize(blocks, Q.Q4_0, (2, 32), "float16")
    with pytest.raises(ValueError, match=r"x has shape \(1, 64\), expected \(N, 32\)"):
        backend.gguf_matmul_q8(np.ones((1, 64), np.float32), blocks, Q.Q4_0, (2, 32))
    with pytest.raises(ValueError, match=r"bias must be float32 of shape \(2,\)"):
        backend.gguf_matmul_q8(np.ones((1, 32), np.float32), blocks, Q.Q4_0, (2, 32), np.ones(3, np.float32))
    for shape in ((2, True), (2,), (2, 32, 1), (2, 32.0), (0, 32), (2, -32)):     # not two positive ints
        with pytest.raises(ValueError, match=r"shape must be \(D_out, D_in\) with positive ints"):
            backend.gguf_dequantize(blocks, "Q4_0", shape)
    W = backend.gguf_dequantize(blocks, "Q4_0", (2, 32))
    for shape in ([2, 32], (np.int64(2), np.int32(32))):                          # any two ints are a shape
        np.testing.assert_array_equal(backend.gguf_dequantize(blocks, "q4_0", shape), W)
