"""The NumPy reference kernels' gradients against finite differences.

Their values against the slow loop formulas of tests/naive.py (every shape, mask, W=None, −1 index,
SGMV segment): the conformance suite, in tests/kernels/test_conformance.py.
"""
import numpy as np
import pytest

import naive
from lowrank.nn.gradcheck import gradcheck
from lowrank.kernels import reference as ref


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
