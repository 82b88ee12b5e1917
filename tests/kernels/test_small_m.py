"""numba_cpu's few-row product (numba_cpu/small_m.py): y = x Wᵀ (+ b) for 2 ≤ N ≤ config.NUMBA_SMALL_M rows,
against tests/naive.py's float64 loops, with the threshold shrunk so that tiny inputs cross it both ways;
and the products that reach it (dense, LoRA, BGMV, SGMV base products). It takes float64, and float32 when
config.NUMBA_GEMV_IR is off (float32's few rows go to numba_cpu/gemv.py otherwise: tests/kernels/test_gemv.py),
so these tests turn that off. Its values on the conformance suite's few-row cases (N = 2 … 70 at the shipped
threshold) are tests/kernels/test_conformance.py's.
"""
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
from lowrank.kernels import config
from lowrank.kernels import numba_cpu as nb
from lowrank.kernels.numba_cpu import small_m

TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _layout(a, how):
    """``a``'s values C-ordered, F-ordered or as a step-2 strided view."""
    if how == "F":
        return np.asfortranarray(a)
    if how == "strided":
        big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
        big[tuple(slice(None, None, 2) for _ in a.shape)] = a
        return big[tuple(slice(None, None, 2) for _ in a.shape)]
    return a


@pytest.fixture(autouse=True)
def no_ir_gemv():
    """float32's few rows come here only with numba_cpu/gemv.py's product off."""
    with mock.patch.object(config, "NUMBA_GEMV_IR", False):
        yield


def _spy():
    """small_m.product, counting its calls."""
    return mock.patch.object(small_m, "product", wraps=small_m.product)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(N=st.integers(1, 9), D_in=st.integers(1, 37), D_out=st.integers(1, 23), threshold=st.integers(0, 6),
       dtype=st.sampled_from([np.float32, np.float64]), x_layout=st.sampled_from(["C", "F", "strided"]),
       W_layout=st.sampled_from(["C", "C", "F", "strided"]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dense_forward_matches_the_naive_loops_on_both_sides_of_the_threshold(N, D_in, D_out, threshold, dtype,
                                                                              x_layout, W_layout, bias, seed):
    rng = np.random.default_rng(seed)
    x, W = rng.standard_normal((N, D_in)).astype(dtype), rng.standard_normal((D_out, D_in)).astype(dtype)
    b = rng.standard_normal(D_out).astype(dtype) if bias else None
    want = naive.dense_forward(x, W, b)
    x, W = _layout(x, x_layout), _layout(W, W_layout)
    with mock.patch.object(config, "NUMBA_SMALL_M", threshold), _spy() as spy:
        y = nb.dense_forward(x, W, b)
    rows_contiguous = W.flags.c_contiguous          # F-ordered or strided W is C-contiguous too when it is a row or column
    assert spy.call_count == (2 <= N <= threshold and rows_contiguous)     # which side of the threshold ran
    assert y.dtype == dtype and y.shape == (N, D_out) and y.flags.c_contiguous
    np.testing.assert_allclose(y, want, **TOL[dtype])


@pytest.mark.parametrize("N, D_out", [(2, 1), (3, 5), (4, 4), (7, 9), (8, 3), (13, 2)])
@pytest.mark.parametrize("run", ["serial", "parallel"])
def test_both_compilations_write_every_element_once(N, D_out, run, rng):
    """Whole 4×4 tiles, the rows left over (N mod 4) and a last block of fewer than 4 rows of W, on the serial
    and the parallel compilation; y starts as NaN, so an element not written stays NaN."""
    x, W, b = rng.standard_normal((N, 11)), rng.standard_normal((D_out, 11)), rng.standard_normal(D_out)
    y = np.full((N, D_out), np.nan)
    getattr(small_m._product, run)(W, x, b, y)
    np.testing.assert_allclose(y, naive.dense_forward(x, W, b), rtol=1e-12, atol=1e-12)


def test_a_non_finite_input_stays_in_its_row(rng):
    """IEEE arithmetic under config.NUMBA_FASTMATH: an Inf or NaN in x row n makes row n of y non-finite as
    BLAS does, and leaves the other rows exact."""
    x, W = rng.standard_normal((6, 19)).astype(np.float32), rng.standard_normal((10, 19)).astype(np.float32)
    x[1, 3], x[4, 0] = np.inf, np.nan
    with _spy() as spy:
        y = nb.dense_forward(x, W)
    assert spy.call_count == 1
    want = naive.dense_forward(x, W)
    np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    rows = [0, 2, 3, 5]
    np.testing.assert_allclose(y[rows], want[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_base_products_of_lora_bgmv_and_sgmv_take_it(dtype, rng):
    N, D_in, D_out, r = 5, 13, 7, 3
    d = naive.lora_inputs(rng, N, D_in, D_out, r, dtype, K=2)
    x, W, A, B, s, bias = d["x"], d["W"], d["A"], d["B"], d["s"], d["bias"]
    stacks, index = (d["A_stack"], d["B_stack"], d["scalings"]), np.array([1, -1, 0, 1, 1])
    with _spy() as spy:
        y, _ = nb.lora_forward(x, W, A, B, s, bias)
        np.testing.assert_allclose(y, naive.lora_forward(x, W, A, B, s, bias)[0], **TOL[dtype])
        y, _ = nb.lora_forward_multi(x, W, *stacks, index, bias)
        np.testing.assert_allclose(y, naive.lora_forward_multi(x, W, *stacks, index, bias)[0], **TOL[dtype])
        y, _ = nb.lora_forward_sgmv(x, W, *stacks, np.array([0, 2, 5]), np.array([0, 1]), bias)
        want = naive.lora_forward_multi(x, W, *stacks, np.array([0, 0, 1, 1, 1]), bias)[0]
        np.testing.assert_allclose(y, want, **TOL[dtype])
    assert spy.call_count == 3


def test_one_row_float16_and_a_threshold_of_zero_go_elsewhere(rng):
    """N = 1 is BLAS's GEMV for float64 (float32: numba_cpu/gemv.py); float16 is the reference's; NUMBA_SMALL_M = 0 turns
    it off."""
    W = rng.standard_normal((6, 5))
    with _spy() as spy:
        nb.dense_forward(rng.standard_normal((1, 5)), W)
        nb.dense_forward(rng.standard_normal((3, 5)).astype(np.float16), W.astype(np.float16))
        with mock.patch.object(config, "NUMBA_SMALL_M", 0):
            nb.dense_forward(rng.standard_normal((3, 5)), W)
        assert spy.call_count == 0
        nb.dense_forward(rng.standard_normal((3, 5)), W)
        assert spy.call_count == 1
