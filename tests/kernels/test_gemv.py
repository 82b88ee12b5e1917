"""numba_cpu's few-row float32 product (numba_cpu/gemv.py): y = x Wᵀ (+ b) for 1 to config.NUMBA_SMALL_M rows of
x, against tests/naive.py's float64 loops: whole 16-float steps and the masked last columns, whole passes of ROWS
rows of W and the rows left, x's rows 4 at a time and the 1 to 3 left, serial and parallel compilations, a
non-finite input kept in its row; and which products reach it."""
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import naive
from lowrank.kernels import config
from lowrank.kernels import numba_cpu as nb
from lowrank.kernels.numba_cpu import gemv


@settings(max_examples=40, deadline=None, derandomize=True)
@given(N=st.integers(1, 10), D_in=st.integers(1, 70), D_out=st.integers(1, 23), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_dense_forward_of_a_few_float32_rows_is_the_gemvs_and_matches_the_naive_loops(N, D_in, D_out, bias, seed):
    rng = np.random.default_rng(seed)
    x, W = rng.standard_normal((N, D_in)).astype(np.float32), rng.standard_normal((D_out, D_in)).astype(np.float32)
    b = rng.standard_normal(D_out).astype(np.float32) if bias else None
    with mock.patch.object(gemv, "product", wraps=gemv.product) as spy:
        y = nb.dense_forward(x, W, b)
    assert spy.call_count == 1 and y.dtype == np.float32 and y.shape == (N, D_out) and y.flags.c_contiguous
    np.testing.assert_allclose(y, naive.dense_forward(x, W, b), rtol=1e-5, atol=1e-5 * np.sqrt(D_in))


@pytest.mark.parametrize("N", [1, 3, 4, 9])
@pytest.mark.parametrize("D_in, D_out", [(16, 1), (48, 5), (37, 8), (5, 3), (1536, 577)])
@pytest.mark.parametrize("run", ["serial", "parallel"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_both_compilations_write_every_element_once(N, D_in, D_out, run, chunks, rng):
    """y starts as NaN, so an element not written stays NaN; chunks of rows as the pool's threads take them."""
    x, W = rng.standard_normal((N, D_in)).astype(np.float32), rng.standard_normal((D_out, D_in)).astype(np.float32)
    y = np.full((N, D_out), np.nan, np.float32)
    getattr(gemv._gemv, run)(W, x, y, min(chunks, D_out))
    np.testing.assert_allclose(y, naive.dense_forward(x, W), rtol=1e-5, atol=1e-4)


def test_a_non_finite_input_stays_in_its_row(rng):
    """An Inf or NaN in x row n makes row n of y non-finite as BLAS does, and leaves the other rows exact."""
    x, W = rng.standard_normal((6, 19)).astype(np.float32), rng.standard_normal((10, 19)).astype(np.float32)
    x[1, 3], x[4, 0] = np.inf, np.nan
    y, want = gemv.product(x, W), naive.dense_forward(x, W)
    np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
    np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
    np.testing.assert_allclose(y[[0, 2, 3, 5]], want[[0, 2, 3, 5]], rtol=1e-5, atol=1e-5)


def test_other_products_go_elsewhere(rng):
    """float64, a W that is not C-contiguous, more than config.NUMBA_SMALL_M rows and config.NUMBA_GEMV_IR off:
    BLAS or small_m."""
    W = rng.standard_normal((6, 40)).astype(np.float32)
    x = rng.standard_normal((1, 40)).astype(np.float32)
    many = np.repeat(x, config.NUMBA_SMALL_M + 1, axis=0)
    with mock.patch.object(gemv, "product", wraps=gemv.product) as spy:
        for args in ((x.astype(np.float64), W.astype(np.float64)), (x, np.asfortranarray(W)), (many, W)):
            np.testing.assert_allclose(nb.dense_forward(*args)[0], naive.dense_forward(x, W)[0], rtol=1e-5, atol=1e-5)
        with mock.patch.object(config, "NUMBA_GEMV_IR", False):
            nb.dense_forward(x, W)
        assert spy.call_count == 0
        nb.dense_forward(x, W)
        assert spy.call_count == 1