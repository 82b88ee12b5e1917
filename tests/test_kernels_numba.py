"""Numba CPU kernels == the NumPy reference, on every layout, dtype and adapter pattern.

Buffers the wrappers allocate with np.empty are poisoned with NaN during each call, so an
element a kernel forgets to write fails the comparison.
"""
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import naive
from lowrank.kernels import config
from lowrank.kernels import reference as ref

import numba  # noqa: F401  (a required dependency: a broken install fails here, it is never skipped)
from lowrank.kernels import numba_cpu as nb  # noqa: E402
from lowrank.kernels.numba_cpu import blas, loops  # noqa: E402

dims = st.integers(1, 17)
ranks = st.integers(1, 8)        # drawn apart from D_in, D_out: r > min(D_in, D_out) is legal (PEFT allows it)
dtypes = st.sampled_from([np.float32, np.float64])
layouts = st.sampled_from(["C", "F", "strided"])


def relayout(a, how):
    """The same values as a C-ordered, F-ordered, or step-2 strided (non-contiguous) array."""
    if a is None or how == "C":
        return a
    if how == "F":
        return np.asfortranarray(a)
    big = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    big[tuple(slice(None, None, 2) for _ in a.shape)] = a
    return big[tuple(slice(None, None, 2) for _ in a.shape)]


@pytest.fixture(scope="module", autouse=True)
def compiled():
    """Compile every loop for both dtypes first: Numba's own np.zeros must not meet the poisoned np.empty."""
    for dtype in (np.float32, np.float64):
        d = naive.lora_inputs(np.random.default_rng(0), 2, 3, 2, 1, dtype, masked=True, K=2)
        nb.lora_backward(d["dy"], d["x"], d["x"][:, :1], d["W"], d["A"], d["B"], 1.0, True, d["mask"])
        nb.lora_forward_multi(d["x"], d["W"], d["A_stack"], d["B_stack"], d["scalings"], np.array([0, 1]))


@contextmanager
def poisoned_empty():
    real = np.empty

    def empty(shape, dtype=float, *args, **kwargs):
        a = real(shape, dtype, *args, **kwargs)
        if np.dtype(dtype).kind == "f":
            a.fill(np.nan)
        return a

    with mock.patch.object(np, "empty", empty):
        yield


def close(got, want, dtype):
    if want is None:
        assert got is None
        return
    name = np.dtype(dtype).name
    assert got.dtype == want.dtype and got.shape == want.shape
    assert not np.isnan(got).any(), "an output element was never written"
    np.testing.assert_allclose(got, want, rtol=config.RTOL[name], atol=config.ATOL[name])


@given(N=dims, D_in=dims, D_out=dims, r=ranks, dtype=dtypes, layout=layouts, masked=st.booleans(),
       base=st.booleans(), bias=st.booleans(), need_dx=st.booleans(), seed=st.integers(0, 2**16))
@example(N=1, D_in=1, D_out=1, r=1, dtype=np.float32, layout="strided", masked=True, base=True, bias=True,
         need_dx=True, seed=0)
@example(N=13, D_in=17, D_out=11, r=5, dtype=np.float64, layout="F", masked=True, base=False, bias=True,
         need_dx=True, seed=1)
@example(N=5, D_in=6, D_out=2, r=8, dtype=np.float32, layout="strided", masked=True, base=True, bias=True,
         need_dx=True, seed=2)                                  # r > D_in > D_out
def test_lora_matches_reference(N, D_in, D_out, r, dtype, layout, masked, base, bias, need_dx, seed):
    d = naive.lora_inputs(np.random.default_rng(seed), N, D_in, D_out, r, dtype, masked)
    x, W, A, B, dy, mask = (relayout(d[k] if k in d else None, layout) for k in ("x", "W", "A", "B", "dy", "mask"))
    W, b = (W if base else None), (d["bias"] if bias else None)
    with poisoned_empty():
        y, h = nb.lora_forward(x, W, A, B, d["s"], b, mask)
    y0, h0 = ref.lora_forward(x, W, A, B, d["s"], b, mask)
    close(y, y0, dtype)
    close(h, h0, dtype)
    with poisoned_empty():
        got = nb.lora_backward(dy, x, h0, W, A, B, d["s"], need_dx, mask)
    for g, w in zip(got, ref.lora_backward(dy, x, h0, W, A, B, d["s"], need_dx, mask)):
        close(g, w, dtype)


@given(N=dims, D_in=dims, D_out=dims, dtype=dtypes, layout=layouts, need=st.tuples(*[st.booleans()] * 3),
       keep_x=st.booleans(), seed=st.integers(0, 2**16))
def test_dense_matches_reference(N, D_in, D_out, dtype, layout, need, keep_x, seed):
    d = naive.lora_inputs(np.random.default_rng(seed), N, D_in, D_out, 1, dtype)
    x, W, dy = (relayout(d[k], layout) for k in ("x", "W", "dy"))
    close(nb.dense_forward(x, W, d["bias"]), ref.dense_forward(x, W, d["bias"]), dtype)
    close(nb.dense_forward(x, W), ref.dense_forward(x, W), dtype)
    x_kept = x if (keep_x or need[1]) else None          # a frozen layer may drop its input
    for g, w in zip(nb.dense_backward(dy, x_kept, W, *need), ref.dense_backward(dy, x_kept, W, *need)):
        close(g, w, dtype)


@given(N=dims, D_in=dims, D_out=dims, r=ranks, K=st.integers(1, 5), dtype=dtypes, layout=layouts,
       bias=st.booleans(), need_dx=st.booleans(), seed=st.integers(0, 2**16))
@example(N=1, D_in=1, D_out=1, r=1, K=1, dtype=np.float32, layout="C", bias=False, need_dx=True, seed=0)
@example(N=9, D_in=2, D_out=6, r=8, K=3, dtype=np.float64, layout="F", bias=True, need_dx=True, seed=1)  # r > D_out
def test_multi_matches_reference(N, D_in, D_out, r, K, dtype, layout, bias, need_dx, seed):
    rng = np.random.default_rng(seed)
    d = naive.lora_inputs(rng, N, D_in, D_out, r, dtype, K=K)
    index = rng.integers(-1, K, N)                        # repeated, missing and −1 adapters
    x, W, A_stack, B_stack, dy = (relayout(d[k], layout) for k in ("x", "W", "A_stack", "B_stack", "dy"))
    args, b = (W, A_stack, B_stack, d["scalings"]), (d["bias"] if bias else None)
    with poisoned_empty():
        y, h = nb.lora_forward_multi(x, *args, index, b)
    y0, h0 = ref.lora_forward_multi(x, *args, index, b)
    close(y, y0, dtype)
    close(h, h0, dtype)
    with poisoned_empty():
        got = nb.lora_backward_multi(dy, x, h0, *args, index, need_dx)
    for g, w in zip(got, ref.lora_backward_multi(dy, x, h0, *args, index, need_dx)):
        close(g, w, dtype)


@given(N=dims, D_in=dims, D_out=dims, r=ranks, K=st.integers(1, 5), dtype=dtypes, layout=layouts,
       cuts=st.lists(st.integers(0, 17), min_size=0, max_size=4), need_dx=st.booleans(), seed=st.integers(0, 2**16))
@example(N=9, D_in=6, D_out=2, r=8, K=2, dtype=np.float32, layout="strided", cuts=[3, 3, 7], need_dx=True,
         seed=0)                                                  # r > D_in > D_out
def test_sgmv_matches_reference(N, D_in, D_out, r, K, dtype, layout, cuts, need_dx, seed):
    rng = np.random.default_rng(seed)
    d = naive.lora_inputs(rng, N, D_in, D_out, r, dtype, K=K)
    indptr = np.array([0] + sorted(min(c, N) for c in cuts) + [N])   # empty segments included
    seg = rng.integers(-1, K, len(indptr) - 1)                         # an adapter may recur
    x, W, A_stack, B_stack, dy = (relayout(d[k], layout) for k in ("x", "W", "A_stack", "B_stack", "dy"))
    args = (W, A_stack, B_stack, d["scalings"], indptr, seg)
    with poisoned_empty():
        y, h = nb.lora_forward_sgmv(x, *args, d["bias"])
    y0, h0 = ref.lora_forward_sgmv(x, *args, d["bias"])
    close(y, y0, dtype)
    close(h, h0, dtype)
    with poisoned_empty():
        got = nb.lora_backward_sgmv(dy, x, h0, *args, need_dx)
    for g, w in zip(got, ref.lora_backward_sgmv(dy, x, h0, *args, need_dx)):
        close(g, w, dtype)


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
    """gemm_acc's BLAS must not run a second spinning thread pool beside NumPy's (numba_cpu/blas.py)."""
    from threadpoolctl import threadpool_info

    threads = {info["filepath"]: info["num_threads"] for info in threadpool_info()}
    for path in blas.PINNED_BLAS:
        assert threads[path] == 1
