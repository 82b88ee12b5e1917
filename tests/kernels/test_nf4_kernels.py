"""NF4 kernels: the NumPy reference against a slow per-element float64 definition, and
Numba against the reference. Tiles are shrunk (config.NF4_TILE_ROWS, NF4_POOL_TILE_ROWS) so tiny inputs
cross tile borders, and the fused GEMV is switched on for N > 1 to cover its row loop."""
import inspect
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank.kernels import config
from lowrank.kernels.common import NF4_CODE
from lowrank.kernels.numba_cpu import nf4 as numba_nf4, nf4_avx2
from lowrank.kernels.reference import nf4 as reference_nf4

BACKENDS = [reference_nf4, numba_nf4]
NAMES = ("nf4_dequantize", "nf4_matmul", "nf4_matmul_dx")
SEED = st.integers(0, 2**16)
SHAPES = dict(N=st.integers(1, 6), D_out=st.integers(1, 13), D_in=st.integers(1, 21),
              blocksize=st.sampled_from([2, 4, 6, 8, 64]), seed=SEED)


def random_nf4(rng, D_out, D_in, blocksize):
    """Random packed codes and block scales (incl. a zero scale) for a (D_out, D_in) weight."""
    n = D_out * D_in
    packed = rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8)
    absmax = rng.uniform(0, 2, -(-n // blocksize)).astype(np.float32)
    absmax[rng.integers(absmax.size)] = 0
    return packed, absmax


def slow_dequantize(packed, absmax, shape, blocksize):
    """W[o, i] = code[q] · absmax[k // blocksize], k = o·D_in + i, in float64, one element at a time."""
    D_out, D_in = shape
    W = np.empty(shape)
    for o in range(D_out):
        for i in range(D_in):
            k = o * D_in + i
            byte = int(packed[k // 2])
            q = byte // 16 if k % 2 == 0 else byte % 16
            W[o, i] = float(NF4_CODE[q]) * float(absmax[k // blocksize])
    return W


def scale_of(a, b):
    """|a| @ |b|: the size against which a float rounding error of a product is measured."""
    return np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)


@given(**SHAPES)
def test_reference_equals_the_slow_float64_definition(N, D_out, D_in, blocksize, seed):
    rng = np.random.default_rng(seed)
    packed, absmax = random_nf4(rng, D_out, D_in, blocksize)
    W = slow_dequantize(packed, absmax, (D_out, D_in), blocksize)
    x, dy, b = rng.standard_normal((N, D_in)), rng.standard_normal((N, D_out)), rng.standard_normal(D_out)
    with mock.patch.object(config, "NF4_TILE_ROWS", 3):
        np.testing.assert_array_equal(reference_nf4.nf4_dequantize(packed, absmax, (D_out, D_in), blocksize,
                                                                   "float64"), W)
        y = reference_nf4.nf4_matmul(x, packed, absmax, (D_out, D_in), blocksize, b)
        dx = reference_nf4.nf4_matmul_dx(dy, packed, absmax, (D_out, D_in), blocksize)
    assert np.all(np.abs(y - (x @ W.T + b)) <= 1e-13 * (scale_of(x, W.T) + np.abs(b)))
    assert np.all(np.abs(dx - dy @ W) <= 1e-13 * scale_of(dy, W))
    W32 = reference_nf4.nf4_dequantize(packed, absmax, (D_out, D_in), blocksize)
    assert W32.dtype == np.float32
    np.testing.assert_array_equal(W32, W.astype(np.float32))              # one rounding of an exact product


@given(dtype=st.sampled_from(["float32", "float64"]), gemv_max_n=st.sampled_from([1, 3]),
       tile=st.sampled_from([1, 3, 256]), bias=st.booleans(), **SHAPES)
def test_numba_equals_the_reference(N, D_out, D_in, blocksize, seed, dtype, gemv_max_n, tile, bias):
    rng = np.random.default_rng(seed)
    packed, absmax = random_nf4(rng, D_out, D_in, blocksize)
    shape = (D_out, D_in)
    x = rng.standard_normal((N, D_in)).astype(dtype)
    dy = rng.standard_normal((N, D_out)).astype(dtype)
    b = rng.standard_normal(D_out).astype(dtype) if bias else None
    tol = config.RTOL[dtype] if dtype == "float32" else 1e-13
    with mock.patch.multiple(config, NF4_TILE_ROWS=tile, NF4_POOL_TILE_ROWS=tile, NF4_GEMV_MAX_N=gemv_max_n):
        W = reference_nf4.nf4_dequantize(packed, absmax, shape, blocksize, dtype)
        np.testing.assert_array_equal(numba_nf4.nf4_dequantize(packed, absmax, shape, blocksize, dtype), W)
        y_ref = reference_nf4.nf4_matmul(x, packed, absmax, shape, blocksize, b)
        y = numba_nf4.nf4_matmul(x, packed, absmax, shape, blocksize, b)
        dx_ref = reference_nf4.nf4_matmul_dx(dy, packed, absmax, shape, blocksize)
        dx = numba_nf4.nf4_matmul_dx(dy, packed, absmax, shape, blocksize)
    assert y.dtype == dx.dtype == np.dtype(dtype)
    assert np.all(np.abs(y - y_ref) <= tol * (scale_of(x, W.T) + (np.abs(b) if bias else 0)) + 1e-30)
    assert np.all(np.abs(dx - dx_ref) <= tol * scale_of(dy, W) + 1e-30)


@pytest.mark.parametrize("avx2", [True, False])
@pytest.mark.parametrize("D_in", [4096, 4095])
def test_numba_gemv_at_a_wide_row(D_in, avx2):
    """The fused GEMV and GEMVᵀ on rows of whole blocks (AVX2 or portable), and the element / tile
    paths (odd D_in)."""
    rng = np.random.default_rng(3)
    packed, absmax = random_nf4(rng, 5, D_in, 64)
    x, dy = rng.standard_normal((1, D_in)).astype(np.float32), rng.standard_normal((1, 5)).astype(np.float32)
    W = reference_nf4.nf4_dequantize(packed, absmax, (5, D_in), 64, "float64")
    with mock.patch.object(config, "NF4_AVX2", avx2):
        y = numba_nf4.nf4_matmul(x, packed, absmax, (5, D_in), 64)
        dx = numba_nf4.nf4_matmul_dx(dy, packed, absmax, (5, D_in), 64)
    assert np.all(np.abs(y - x @ W.T) <= 1e-5 * scale_of(x, W.T))
    assert np.all(np.abs(dx - dy @ W) <= 1e-5 * scale_of(dy, W))


AVX2 = pytest.mark.skipif(not nf4_avx2.AVAILABLE, reason="the CPU has no AVX2 (or NUMBA_CPU_NAME is set)")


@AVX2
@given(N=st.integers(1, 3), D_out=st.integers(1, 9), blocks=st.integers(1, 3), blocksize=st.sampled_from([32, 64, 128]),
       gemv=st.booleans(), bias=st.booleans(), seed=SEED)
def test_avx2_kernels_equal_the_reference(N, D_out, blocks, blocksize, gemv, bias, seed):
    """The byte-shuffle decode (every code, lane order, block scales, chunks of rows, tiles of 2 rows)
    vs the reference, and the AVX2 kernels are the ones that ran: the GEMV pair, or the tile decoder."""
    rng = np.random.default_rng(seed)
    D_in = blocks * blocksize
    packed, absmax = random_nf4(rng, D_out, D_in, blocksize)
    x = rng.standard_normal((N, D_in)).astype(np.float32)
    dy = rng.standard_normal((N, D_out)).astype(np.float32)
    b = rng.standard_normal(D_out).astype(np.float32) if bias else None
    W = reference_nf4.nf4_dequantize(packed, absmax, (D_out, D_in), blocksize, "float64")
    spies = [mock.patch.object(nf4_avx2, name, wraps=getattr(nf4_avx2, name))
             for name in ("gemv", "gemv_t", "dequantize_tile")]
    with mock.patch.multiple(config, NF4_GEMV_MAX_N=3 if gemv else 0, NF4_TILE_ROWS=2, NF4_POOL_TILE_ROWS=2), \
            spies[0] as dot, spies[1] as dot_t, spies[2] as tile:
        y = numba_nf4.nf4_matmul(x, packed, absmax, (D_out, D_in), blocksize, b)
        dx = numba_nf4.nf4_matmul_dx(dy, packed, absmax, (D_out, D_in), blocksize)
    assert (dot.call_count, dot_t.call_count, tile.call_count) == ((N, N, 0) if gemv else (0, 0, 2 * -(-D_out // 2)))
    tol = config.RTOL["float32"]
    assert np.all(np.abs(y - (x @ W.T + (b if bias else 0))) <= tol * (scale_of(x, W.T) + (np.abs(b) if bias else 0)))
    assert np.all(np.abs(dx - dy @ W) <= tol * scale_of(dy, W))


@AVX2
def test_avx2_tile_is_the_reference_dequantization_exactly():
    rng = np.random.default_rng(5)
    packed, absmax = random_nf4(rng, 7, 192, 64)
    tile = np.empty((3, 192), np.float32)
    nf4_avx2.dequantize_tile(packed, absmax, 192, 64, 4, tile)                  # rows 4, 5, 6
    W = reference_nf4.nf4_dequantize(packed, absmax, (7, 192), 64)
    np.testing.assert_array_equal(nf4_avx2.unpermute(tile), W[4:])


def test_avx2_lane_order_round_trips_and_the_kernel_says_what_it_takes():
    v = np.arange(48.0).reshape(2, 24)
    assert list(nf4_avx2.permute(v)[1, 8:16]) == [32, 34, 36, 38, 33, 35, 37, 39]     # along the last axis
    np.testing.assert_array_equal(nf4_avx2.unpermute(nf4_avx2.permute(v)), v)
    assert not nf4_avx2._available("generic", {"avx2": True})            # Numba told to target another CPU
    assert not nf4_avx2._available(None, {"avx2": False})
    assert not nf4_avx2._available(None, {"avx2": True}, disable_jit=True)
    assert nf4_avx2._available(None, {"avx2": True})
    with mock.patch.object(nf4_avx2, "AVAILABLE", True):
        assert nf4_avx2.usable(np.float32, 4096, 64)
        assert not nf4_avx2.usable(np.float64, 4096, 64)                  # float32 only
        assert not nf4_avx2.usable(np.float32, 4096, 16)                  # blocks of whole 32-code steps
        assert not nf4_avx2.usable(np.float32, 4095, 64)                  # rows of whole blocks


def test_reference_never_dequantizes_more_than_a_tile():
    rng = np.random.default_rng(4)
    packed, absmax = random_nf4(rng, 10, 7, 4)
    sizes = []
    real = reference_nf4._dequantize_range

    def spy(packed, absmax, start, stop, blocksize, dtype):
        sizes.append(stop - start)
        return real(packed, absmax, start, stop, blocksize, dtype)

    with mock.patch.object(config, "NF4_TILE_ROWS", 3), mock.patch.object(reference_nf4, "_dequantize_range", spy):
        reference_nf4.nf4_matmul(np.ones((2, 7)), packed, absmax, (10, 7), 4)
        reference_nf4.nf4_matmul_dx(np.ones((2, 10)), packed, absmax, (10, 7), 4)
    assert sizes == [21, 21, 21, 7] * 2                                     # 3 rows of 7 at a time


def test_backends_share_signatures_and_the_backend_modules_reexport_them():
    from lowrank.kernels import numba_cpu, reference
    for name in NAMES:
        assert inspect.signature(getattr(numba_nf4, name)) == inspect.signature(getattr(reference_nf4, name))
        assert getattr(reference, name) is getattr(reference_nf4, name)
        assert getattr(numba_cpu, name) is getattr(numba_nf4, name)


@pytest.mark.parametrize("kernels", BACKENDS, ids=["numpy", "numba"])
def test_bad_inputs_are_clear_errors(kernels):
    packed, absmax, shape = np.zeros(6, np.uint8), np.ones(3, np.float32), (3, 4)
    x = np.ones((2, 4), np.float32)
    odd_blocks = "blocksize must be a positive even integer"
    cases = [
        (ValueError, odd_blocks, lambda: kernels.nf4_matmul(x, packed, absmax, shape, 3)),
        (ValueError, odd_blocks, lambda: kernels.nf4_dequantize(packed, absmax, shape, 0)),
        (ValueError, r"shape must be \(D_out, D_in\)", lambda: kernels.nf4_dequantize(packed, absmax, (12,), 4)),
        (ValueError, r"shape must be \(D_out, D_in\)", lambda: kernels.nf4_dequantize(packed, absmax, (0, 4), 4)),
        (ValueError, r"packed must be uint8 of shape \(6,\)", lambda: kernels.nf4_matmul(x, packed.astype(np.int8),
                                                                                          absmax, shape, 4)),
        (ValueError, r"packed must be uint8 of shape \(6,\)", lambda: kernels.nf4_matmul(x, packed[:5], absmax,
                                                                                          shape, 4)),
        (ValueError, r"absmax must be float32 of shape \(3,\)", lambda: kernels.nf4_matmul(x, packed, absmax[:2],
                                                                                            shape, 4)),
        (ValueError, r"absmax must be float32 of shape \(3,\)", lambda: kernels.nf4_matmul(x, packed,
                                                                                            absmax.astype(np.float64),
                                                                                            shape, 4)),
        (TypeError, "x must be float32 or float64", lambda: kernels.nf4_matmul(x.astype(np.int64), packed, absmax,
                                                                               shape, 4)),
        (ValueError, r"x has shape \(2, 3\), expected \(N, 4\)", lambda: kernels.nf4_matmul(x[:, :3], packed, absmax,
                                                                                             shape, 4)),
        (ValueError, r"bias must be float32 of shape \(3,\)", lambda: kernels.nf4_matmul(x, packed, absmax, shape, 4,
                                                                                          np.ones(4, np.float32))),
        (TypeError, "dy must be float32 or float64", lambda: kernels.nf4_matmul_dx(np.ones((2, 3), np.int32), packed,
                                                                                   absmax, shape, 4)),
        (TypeError, "dtype must be float32 or float64", lambda: kernels.nf4_dequantize(packed, absmax, shape, 4,
                                                                                       "int32")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
