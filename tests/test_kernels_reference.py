"""The NumPy reference kernels against slow loop formulas (tests/naive.py) and finite differences."""
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import naive
from lowrank.nn.gradcheck import gradcheck
from lowrank.kernels import reference as ref

dims = st.integers(1, 6)
ranks = st.integers(1, 8)        # drawn apart from D_in, D_out: r > min(D_in, D_out) is legal (PEFT allows it)
RTOL = ATOL = 1e-12


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@given(N=dims, D_in=dims, D_out=dims, r=ranks, masked=st.booleans(), base=st.booleans(),
       seed=st.integers(0, 2**16))
@example(N=3, D_in=6, D_out=2, r=8, masked=True, base=True, seed=0)     # r > D_in > D_out
def test_lora_forward_backward_match_loops(N, D_in, D_out, r, masked, base, seed):
    d = naive.lora_inputs(np.random.default_rng(seed), N, D_in, D_out, r, masked=masked)
    W, mask = (d["W"] if base else None), d.get("mask")
    y, h = ref.lora_forward(d["x"], W, d["A"], d["B"], d["s"], d["bias"], mask)
    y0, h0 = naive.lora_forward(d["x"], W, d["A"], d["B"], d["s"], d["bias"], mask)
    close(y, y0)
    close(h, h0)
    dx, dA, dB = ref.lora_backward(d["dy"], d["x"], h, W, d["A"], d["B"], d["s"], True, mask)
    for got, want in zip((dx, dA, dB), naive.lora_backward(d["dy"], d["x"], W, d["A"], d["B"], d["s"], mask)):
        close(got, want)
    assert ref.lora_backward(d["dy"], d["x"], h, W, d["A"], d["B"], d["s"], False, mask)[0] is None


@given(N=dims, D_in=dims, D_out=dims, seed=st.integers(0, 2**16))
def test_dense_matches_loops(N, D_in, D_out, seed):
    d = naive.lora_inputs(np.random.default_rng(seed), N, D_in, D_out, 1)
    close(ref.dense_forward(d["x"], d["W"], d["bias"]), naive.dense_forward(d["x"], d["W"], d["bias"]))
    for got, want in zip(ref.dense_backward(d["dy"], d["x"], d["W"]), naive.dense_backward(d["dy"], d["x"], d["W"])):
        close(got, want)
    assert ref.dense_backward(d["dy"], None, d["W"], need_dW=False, need_db=False)[1:] == (None, None)


@given(N=dims, D_in=dims, D_out=dims, r=ranks, K=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(N=5, D_in=2, D_out=3, r=7, K=3, seed=0)                        # r > D_in, D_out
def test_multi_and_sgmv_match_loops(N, D_in, D_out, r, K, seed):
    rng = np.random.default_rng(seed)
    d = naive.lora_inputs(rng, N, D_in, D_out, r, K=K)
    index = rng.integers(-1, K, N)                   # repeats, gaps and −1 rows
    args = (d["W"], d["A_stack"], d["B_stack"], d["scalings"])
    y, h = ref.lora_forward_multi(d["x"], *args, index, d["bias"])
    y0, h0 = naive.lora_forward_multi(d["x"], *args, index, d["bias"])
    close(y, y0)
    close(h, h0)
    for got, want in zip(ref.lora_backward_multi(d["dy"], d["x"], h, *args, index),
                         naive.lora_backward_multi(d["dy"], d["x"], *args, index)):
        close(got, want)
    cuts = np.sort(rng.integers(0, N + 1, 2))        # three segments, some possibly empty
    indptr, seg = np.array([0, cuts[0], cuts[1], N]), rng.integers(-1, K, 3)
    rows = naive.segments_to_index(indptr, seg)
    y, h = ref.lora_forward_sgmv(d["x"], *args, indptr, seg, d["bias"])
    close(y, naive.lora_forward_multi(d["x"], *args, rows, d["bias"])[0])
    for got, want in zip(ref.lora_backward_sgmv(d["dy"], d["x"], h, *args, indptr, seg),
                         naive.lora_backward_multi(d["dy"], d["x"], *args, rows)):
        close(got, want)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("base", [False, True])
@pytest.mark.parametrize("r", [2, 7])                 # 7 > min(D_in, D_out) = 4
def test_lora_gradients_match_finite_differences(masked, base, r):
    d = naive.lora_inputs(np.random.default_rng(3), 3, 5, 4, r, masked=masked)
    W, mask = (d["W"] if base else None), d.get("mask")
    inputs = {"x": d["x"], "A": d["A"], "B": d["B"]}

    def backward(g):
        h = ref.lora_forward(d["x"], W, d["A"], d["B"], d["s"], d["bias"], mask)[1]
        dx, dA, dB = ref.lora_backward(g, d["x"], h, W, d["A"], d["B"], d["s"], True, mask)
        return {"x": dx, "A": dA, "B": dB}

    gradcheck(lambda: ref.lora_forward(d["x"], W, d["A"], d["B"], d["s"], d["bias"], mask)[0], backward, inputs)


@pytest.mark.parametrize("r", [2, 6])                 # 6 > min(D_in, D_out) = 3
def test_multi_gradients_match_finite_differences(r):
    rng = np.random.default_rng(4)
    d = naive.lora_inputs(rng, 5, 4, 3, r, K=3)
    index = np.array([2, -1, 0, 2, 0])               # adapter 1 unused: zero gradient
    inputs = {"x": d["x"], "A_stack": d["A_stack"], "B_stack": d["B_stack"]}
    args = lambda: (d["W"], d["A_stack"], d["B_stack"], d["scalings"], index)  # noqa: E731

    def backward(g):
        h = ref.lora_forward_multi(d["x"], *args())[1]
        dx, dA, dB = ref.lora_backward_multi(g, d["x"], h, *args())
        return {"x": dx, "A_stack": dA, "B_stack": dB}

    gradcheck(lambda: ref.lora_forward_multi(d["x"], *args())[0], backward, inputs)
