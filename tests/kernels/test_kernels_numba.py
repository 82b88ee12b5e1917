"""Numba CPU kernels: what only Numba has. Its values against the reference on every layout, dtype
and adapter pattern (np.empty poisoned with NaN, so an unwritten element fails) are the conformance
suite's, in tests/kernels/test_conformance.py; here: the in-place GEMM, the float16 fallback, input checks
before any kernel, and the BLAS pinning.
"""
from unittest import mock

import numpy as np
import pytest

import naive
from lowrank.kernels import reference as ref
from lowrank.kernels import validate

import numba  # noqa: F401  (a required dependency: a broken install fails here, it is never skipped)
from lowrank.kernels import numba_cpu as nb  # noqa: E402
from lowrank.kernels.numba_cpu import blas, loops, pool  # noqa: E402


@pytest.mark.parametrize("order", ["C", "F"])
def test_gemm_acc_accumulates_in_place_or_writes_back(order, rng):
    P, Q = rng.standard_normal((4, 3)), rng.standard_normal((3, 5))
    C = np.asarray(rng.standard_normal((4, 5)), order=order)
    want = C + 0.5 * P @ Q
    assert blas.gemm_acc(C, P, Q, 0.5) is C
    np.testing.assert_allclose(C, want, rtol=1e-12)
    np.testing.assert_array_equal(blas.gemm_acc(C, P[:, :0], Q[:0], 0.5), want)   # k = 0: unchanged


def test_float16_goes_to_the_reference_explicitly(rng):
    d = naive.lora_inputs(rng, 3, 4, 5, 2, np.float16, masked=True, K=2)
    x, W, A, B, dy, s, mask = d["x"], d["W"], d["A"], d["B"], d["dy"], d["s"], d["mask"]
    stacks, index, indptr, seg = (W, d["A_stack"], d["B_stack"], d["scalings"]), np.array([1, -1, 0]), \
        np.array([0, 1, 3]), np.array([1, 0])
    calls = [("dense_forward", (x, W, d["bias"])), ("dense_backward", (dy, x, W)),
             ("lora_forward", (x, W, A, B, s, d["bias"], mask)),
             ("lora_backward", (dy, x, x[:, :2], W, A, B, s, True, mask)),
             ("lora_forward_multi", (x, *stacks, index)), ("lora_backward_multi", (dy, x, x[:, :2], *stacks, index)),
             ("lora_forward_sgmv", (x, *stacks, indptr, seg)),
             ("lora_backward_sgmv", (dy, x, x[:, :2], *stacks, indptr, seg))]
    patches = _kernels_must_not_run()                     # float16 never reaches a Numba loop or BLAS call
    for p in patches:
        p.start()
    try:
        for name, args in calls:
            assert getattr(nb, name).__wrapped__              # the one declared fallback (blas.half_to_reference)
            for g, w in zip(getattr(nb, name)(*args), getattr(ref, name)(*args)):
                assert g.dtype == np.float16
                np.testing.assert_array_equal(g, w)
    finally:
        for p in patches:
            p.stop()


def _kernels_must_not_run():
    boom = mock.Mock(side_effect=AssertionError("a kernel ran before the input check"))
    return [mock.patch.object(loops, n, boom) for n in ("shrink", "expand", "outer")] + \
        [mock.patch.object(blas, n, boom) for n in ("gemm_acc", "base_product")]


@pytest.mark.parametrize("case, error, match", [
    ("A wrong width", ValueError, r"A has shape \(2, 4\), expected \(\?, 5\)"),
    ("mask wrong shape", ValueError, r"mask has shape"),
    ("W wrong dtype", TypeError, r"W has dtype float32, expected float64"),
    ("integer x", TypeError, r"x must be a float16/32/64 array"),
    ("index out of range", ValueError, r"index values must lie in \[-1, 2\)"),
    ("float index", TypeError, r"index must be an integer array"),
    ("indptr not ending at N", ValueError, r"indptr must rise from 0 to N=3"),
    ("dense x missing for dW", ValueError, r"x is needed to compute dW"),
])
def test_bad_input_raises_before_any_kernel(case, error, match, rng):
    d = naive.lora_inputs(rng, 3, 5, 4, 2, K=2, masked=True)
    x, W, A, B, s = d["x"], d["W"], d["A"], d["B"], d["s"]
    stacks = (W, d["A_stack"], d["B_stack"], d["scalings"])
    call = {
        "A wrong width": lambda: nb.lora_forward(x, W, A[:, :4], B, s),
        "mask wrong shape": lambda: nb.lora_backward(d["dy"], x, x[:, :2], W, A, B, s, True, d["mask"][:2]),
        "W wrong dtype": lambda: nb.lora_forward(x, W.astype(np.float32), A, B, s),
        "integer x": lambda: nb.dense_forward(x.astype(np.int64), W),
        "index out of range": lambda: nb.lora_forward_multi(x, *stacks, np.array([0, 2, -1])),
        "float index": lambda: nb.lora_backward_multi(d["dy"], x, x[:, :2], *stacks, np.zeros(3)),
        "indptr not ending at N": lambda: nb.lora_forward_sgmv(x, *stacks, np.array([0, 2]), np.array([1])),
        "dense x missing for dW": lambda: nb.dense_backward(d["dy"], None, W),
    }[case]
    patches = _kernels_must_not_run()
    for p in patches:
        p.start()
    try:
        with pytest.raises(error, match=match):
            call()
    finally:
        for p in patches:
            p.stop()


def test_scipy_own_blas_is_pinned_to_one_thread():
    """SciPy's BLAS (gemm_acc, the pool's GEMM tasks) must not run a spinning thread pool of its own (numba_cpu/pool.py)."""
    from threadpoolctl import threadpool_info

    threads = {info["filepath"]: info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}
    if len(threads) < 2:
        pytest.skip(f"one BLAS shared by NumPy and SciPy ({list(threads)}): nothing of SciPy's own to pin")
    assert pool.PINNED_BLAS, f"two BLAS libraries are loaded ({list(threads)}) but none was pinned"
    assert set(pool.PINNED_BLAS) < set(threads)                 # SciPy's copy, never NumPy's too
    for path in pool.PINNED_BLAS:
        assert threads[path] == 1


@pytest.mark.parametrize("N", [1, validate.SMALL_INDEX, validate.SMALL_INDEX + 1, 1000])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8])
def test_index_range_is_checked_on_both_paths(N, dtype):
    """validate.index reads small indexes through a list, large ones by NumPy reductions: each
    refuses a value at K or below −1 wherever it sits, and names the range it found."""
    K = 3
    good = (np.arange(N) % K).astype(dtype)
    validate.index(good, N, K)
    for pos in (0, N // 2, N - 1):
        bad = good.copy()
        bad[pos] = K
        with pytest.raises(ValueError, match=rf"\[-1, {K}\) for {K} adapters; got min -?\d+, max {K}$"):
            validate.index(bad, N, K)
        if np.dtype(dtype).kind == "i":
            bad[pos] = -2
            with pytest.raises(ValueError, match=r"got min -2"):
                validate.index(bad, N, K)
