"""NF4 blockwise quantization and double quantization against slow per-element references.

The references here are written from the definitions (nearest code by distance, ties to
the lower code; a byte per pair with the first element high), one element at a time,
independent of the vectorized code under test."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank.nn.quant import (DYNAMIC_CODE, DYNAMIC_HALF_GAP, NF4_CODE, NF4_HALF_GAP, NF4Tensor, double_dequantize,
                           double_quantize, merge_delta, pack_nibbles, quantize_blockwise_nf4, quantize_nf4,
                           unpack_nibbles)

BLOCKSIZE = st.sampled_from([2, 4, 6, 10, 64])
SEED = st.integers(0, 2**16)


def slow_nearest(v, code):
    """Index of the code nearest to v (float64 distances), the lower index on a tie."""
    best = 0
    for i in range(1, len(code)):
        if abs(float(v) - float(code[i])) < abs(float(v) - float(code[best])):
            best = i
    return best


def slow_nf4(w, blocksize):
    """(codes, packed bytes, absmax) one element at a time."""
    flat = [np.float32(v) for v in np.asarray(w, np.float32).reshape(-1)]
    absmax, codes = [], []
    for start in range(0, len(flat), blocksize):
        block = flat[start:start + blocksize]
        m = max(abs(v) for v in block)
        absmax.append(m)
        codes += [slow_nearest(v / m if m > 0 else np.float32(0), NF4_CODE) for v in block]
    padded = codes + [0] * (len(codes) % 2)
    packed = [padded[j] * 16 + padded[j + 1] for j in range(0, len(padded), 2)]
    return np.array(codes), np.array(packed), np.array(absmax, np.float32)


def representable_midpoints():
    """Midpoints between neighbouring NF4 codes that float32 holds exactly: exact ties."""
    mids = (NF4_CODE[:-1].astype(np.float64) + NF4_CODE[1:]) / 2
    return [m for m in mids if float(np.float32(m)) == m]


def weights_with_edge_blocks(seed, rows, cols, blocksize):
    """Random weights whose leading blocks are an all-zero block, an all-equal block and a
    block of exact ties (midpoints and their float32 neighbours, with absmax 1)."""
    rng = np.random.default_rng(seed)
    flat = rng.standard_normal(rows * cols).astype(np.float32)
    flat[rng.random(flat.size) < 0.1] = 0                                   # scattered zeros
    ties = [np.float32(1)]
    for m in representable_midpoints():
        m32 = np.float32(m)
        ties += [m32, -m32, np.nextafter(m32, np.float32(2)), np.nextafter(m32, np.float32(-2))]
    specials = [np.zeros(blocksize, np.float32), np.full(blocksize, np.float32(rng.standard_normal())),
                np.resize(np.array(ties, np.float32), blocksize)]
    for b, block in enumerate(specials):
        start = b * blocksize
        if start < flat.size:
            flat[start:start + blocksize] = block[:flat.size - start]
    return flat.reshape(rows, cols)


@given(rows=st.integers(1, 9), cols=st.integers(1, 40), blocksize=BLOCKSIZE, seed=SEED)
def test_codes_packing_and_absmax_equal_the_slow_reference(rows, cols, blocksize, seed):
    w = weights_with_edge_blocks(seed, rows, cols, blocksize)              # n need not be a multiple of blocksize
    codes, packed, absmax = slow_nf4(w, blocksize)
    got_codes, got_absmax = quantize_blockwise_nf4(w, blocksize)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_absmax, absmax)
    q = quantize_nf4(w, blocksize, double_quant=False)
    np.testing.assert_array_equal(q.data, packed)
    assert q.data.dtype == np.uint8 and q.data.shape == ((w.size + 1) // 2,)
    assert not np.isnan(q.dequantize()).any()


def test_ties_go_to_the_lower_code_and_neighbours_to_the_nearer_one():
    for m in representable_midpoints():
        lower = int(np.searchsorted(NF4_CODE, m)) - 1                       # the code just below m
        m32 = np.float32(m)
        w = np.array([1.0, m32, np.nextafter(m32, np.float32(2)), np.nextafter(m32, np.float32(-2))], np.float32)
        codes, _ = quantize_blockwise_nf4(w, 4)
        assert codes.tolist() == [15, lower, lower + 1, lower]


def test_all_zero_block_has_absmax_zero_and_dequantizes_to_zero():
    w = np.zeros((3, 10), np.float32)
    w[2, 5] = 0.5                                                           # only the last block is non-zero
    q = quantize_nf4(w, 8, double_quant=False)
    assert q.absmax()[0] == 0
    W = q.dequantize()
    assert np.isfinite(W).all() and (W[:2] == 0).all()


@given(rows=st.integers(1, 7), cols=st.integers(1, 30), blocksize=BLOCKSIZE, seed=SEED)
def test_values_on_the_grid_quantize_exactly(rows, cols, blocksize, seed):
    rng = np.random.default_rng(seed)
    n = rows * cols
    idx = rng.integers(0, 16, n)
    idx[::blocksize] = 15                                       # every block holds +1·scale: absmax = scale
    scale = np.repeat(rng.uniform(0.01, 10, -(-n // blocksize)).astype(np.float32), blocksize)[:n]
    w = (NF4_CODE[idx] * scale).reshape(rows, cols)
    q = quantize_nf4(w, blocksize, double_quant=False)
    np.testing.assert_array_equal(q.dequantize(), w)


@given(rows=st.integers(1, 9), cols=st.integers(1, 40), blocksize=BLOCKSIZE, seed=SEED, dq=st.booleans())
def test_error_is_at_most_absmax_times_half_the_largest_gap(rows, cols, blocksize, seed, dq):
    w = weights_with_edge_blocks(seed, rows, cols, blocksize).astype(np.float64) * 3
    q = quantize_nf4(w, blocksize, double_quant=dq)
    _, absmax = quantize_blockwise_nf4(w, blocksize)                      # exact block maxima
    per_element = np.repeat(absmax.astype(np.float64), blocksize)[:w.size].reshape(w.shape)
    dq_error = np.repeat(np.abs(q.absmax().astype(np.float64) - absmax), blocksize)[:w.size].reshape(w.shape)
    bound = per_element * NF4_HALF_GAP * (1 + 1e-6) + dq_error + 1e-30
    assert (np.abs(q.dequantize() - w) <= bound).all()
    assert NF4_HALF_GAP == pytest.approx((1 - 0.6961928009986877) / 2)     # the gap between -1 and the next code


def test_dynamic_map_is_bitsandbytes_signed_map():
    expected = [0.0, 1.0]
    for e in range(7):                                                      # means of 2**e + 1 points in [0.1, 1]
        for k in range(2**e):
            mean = 0.1 + 0.9 * (k + 0.5) / 2**e
            expected += [mean * 10.0 ** (e - 6), -mean * 10.0 ** (e - 6)]
    np.testing.assert_allclose(DYNAMIC_CODE, sorted(expected), rtol=1e-6, atol=0)
    assert DYNAMIC_CODE.dtype == np.float32 and len(set(DYNAMIC_CODE.tolist())) == 256
    assert DYNAMIC_HALF_GAP == pytest.approx(0.9 / 64 / 2, rel=1e-5)


@given(n_blocks=st.integers(1, 700), seed=SEED, constant=st.booleans())
def test_double_quantized_absmax_is_within_its_bound(n_blocks, seed, constant):
    rng = np.random.default_rng(seed)
    absmax = np.full(n_blocks, 0.7, np.float32) if constant else rng.uniform(0, 3, n_blocks).astype(np.float32)
    q, scale, offset = double_quantize(absmax)
    assert q.dtype == np.uint8 and scale.shape == (-(-n_blocks // 256),)
    centred = absmax.astype(np.float64) - np.float64(offset)
    expected_scale = [np.abs(centred[i:i + 256]).max() for i in range(0, n_blocks, 256)]
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6, atol=1e-7)
    for j in range(0, n_blocks, 97):                                        # the code is the nearest one
        s = float(scale[j // 256])
        assert q[j] == slow_nearest(np.float32(absmax[j] - offset) / np.float32(s) if s else 0, DYNAMIC_CODE)
    back = double_dequantize(q, scale, offset).astype(np.float64)
    scale_per_block = np.repeat(scale.astype(np.float64), 256)[:n_blocks]
    rounding = 2.0**-22 * (abs(float(offset)) + scale_per_block + absmax)  # float32 product and sum
    bound = scale_per_block * DYNAMIC_HALF_GAP + rounding
    assert (np.abs(back - absmax) <= bound).all()
    if constant:
        np.testing.assert_array_equal(back, absmax)


def test_storage_bits_per_weight_from_real_buffers():
    """Every buffer's size is linear in n; measured at 64×4096 and extrapolated to 4096×4096."""
    w = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
    small = {dq: quantize_nf4(w, 64, dq) for dq in (True, False)}
    n = w.size
    sizes = {k: a.nbytes for k, a in small[True].buffers().items()}
    assert sizes == {"packed": n // 2, "absmax_q": n // 64, "absmax_scale": 4 * (n // 64 // 256), "absmax_offset": 4}
    assert small[True].nbytes == sum(sizes.values())
    assert small[False].nbytes == n // 2 + 4 * (n // 64)
    big = 4096 * 4096                                                       # same per-buffer laws at 4096²
    bits_dq = 8 * (big // 2 + big // 64 + 4 * (big // 64 // 256) + 4) / big
    assert small[True].bits_per_param <= 4.13 and bits_dq <= 4.13
    assert small[False].bits_per_param == 4.5


def test_pack_unpack_roundtrip_with_an_odd_count():
    codes = np.array([1, 15, 0, 7, 9], np.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [0x1F, 0x07, 0x90]
    np.testing.assert_array_equal(unpack_nibbles(packed, 5), codes)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_dtypes_and_shapes_roundtrip(dtype):
    w = np.random.default_rng(1).standard_normal((3, 5, 7)).astype(dtype)
    q = quantize_nf4(w, 6)
    W = q.dequantize()
    assert W.shape == w.shape and W.dtype == w.dtype and q.dtype == w.dtype
    np.testing.assert_allclose(W, w, atol=0.2 * np.abs(w).max())
    assert q.dequantize("float64").dtype == np.float64
    assert "NF4Tensor" in repr(q) and "bits/param" in repr(q)


@pytest.mark.parametrize("blocksize", [0, -2, 3, 2.0, True, "64"])
def test_bad_blocksize_is_a_clear_error(blocksize):
    with pytest.raises(ValueError, match="blocksize must be a positive even integer"):
        quantize_nf4(np.ones((2, 4), np.float32), blocksize)
    with pytest.raises(ValueError, match="blocksize must be a positive even integer"):
        NF4Tensor.quantize(np.ones((2, 4), np.float32), 4, True, blocksize)    # the double-quant blocks


def test_bad_weights_are_clear_errors():
    with pytest.raises(TypeError, match="float16/32/64"):
        quantize_nf4(np.ones((2, 4), np.int32))
    with pytest.raises(TypeError, match="float16/32/64"):
        quantize_nf4([[1.0, 2.0]])
    for bad in (np.nan, np.inf, -np.inf):
        w = np.ones((2, 4), np.float32)
        w[1, 2] = bad
        with pytest.raises(ValueError, match=r"finite; 1 NaN/Inf value\(s\), first at index \(1, 2\)"):
            quantize_nf4(w)
    with pytest.raises(ValueError, match="must not be empty"):
        quantize_nf4(np.ones((0, 4), np.float32))
    with pytest.raises(ValueError, match="give absmax, or all of"):
        NF4Tensor(np.zeros(2, np.uint8), (1, 4), "float32", 4, absmax_q=np.zeros(1, np.uint8))


def test_merge_delta_requantizes_the_sum():
    rng = np.random.default_rng(2)
    w, delta = rng.standard_normal((4, 16)), 0.1 * rng.standard_normal((4, 16))
    q = quantize_nf4(w, 8, double_quant=False)
    merged = merge_delta(q, delta)
    expected = quantize_nf4(q.dequantize() + delta, 8, double_quant=False)
    np.testing.assert_array_equal(merged.data, expected.data)
    assert (merged.blocksize, merged.double_quant) == (8, False)
    with pytest.raises(ValueError, match=r"delta has shape \(16, 4\), expected \(4, 16\)"):
        merge_delta(q, delta.T)
