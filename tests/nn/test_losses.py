"""The three losses: values against naive float64 formulas, gradients against finite
differences, stability for large logits."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lowrank as lr
from lowrank.nn.gradcheck import gradcheck


def naive_bce(z, t):
    return np.mean([-ti * math.log(1 / (1 + math.exp(-zi))) - (1 - ti) * math.log(1 - 1 / (1 + math.exp(-zi)))
                    for zi, ti in zip(z.ravel(), t.ravel())])


def naive_ce(z, t):
    return np.mean([-math.log(math.exp(row[c]) / sum(math.exp(v) for v in row)) for row, c in zip(z, t)])


def naive_mse(y, t):
    return np.mean([(a - b) ** 2 for a, b in zip(y.ravel(), t.ravel())])


def data(kind, seed, N, C):
    """(logits, target) for one loss kind, float64, moderate logits."""
    rng = np.random.default_rng(seed)
    z = 2 * rng.standard_normal((N, C))
    if kind == "bce":
        return z, rng.uniform(0, 1, (N, C))
    if kind == "ce":
        return z, rng.integers(0, C, N)
    return z, rng.standard_normal((N, C))


LOSSES = {"bce": (lr.BCEWithLogitsLoss, naive_bce), "ce": (lr.CrossEntropyLoss, naive_ce),
          "mse": (lr.MSELoss, naive_mse)}


@pytest.mark.parametrize("kind", sorted(LOSSES))
@given(N=st.integers(1, 16), C=st.integers(1, 32), seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_loss_value_and_gradient(kind, N, C, seed):
    cls, naive = LOSSES[kind]
    z, t = data(kind, seed, N, C)
    loss = cls()
    np.testing.assert_allclose(loss(z, t), naive(z, t), rtol=1e-10)

    def backward(g):                                           # g: the upstream scalar
        loss.forward(z, t)
        return {"z": g * loss.backward()}

    gradcheck(lambda: loss.forward(z, t), backward, {"z": z}, seed=seed, rtol=1e-6)


def test_bce_is_stable_for_large_logits():
    z = np.array([[-1e4, 1e4, 800.0, -800.0]])
    t = np.array([[0.0, 1.0, 0.0, 1.0]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss = lr.BCEWithLogitsLoss()
        value = loss(z, t)
        dz = loss.backward()
    assert value == pytest.approx((800 + 800) / 4)             # log(1 + e^800) = 800 to rounding
    np.testing.assert_allclose(dz, [[0.0, 0.0, 0.25, -0.25]], atol=1e-300)


def test_cross_entropy_is_stable_for_large_logits_and_shift_invariant():
    z = np.array([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]])
    t = np.array([1, 2])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss = lr.CrossEntropyLoss()
        value = loss(z, t)
        dz = loss.backward()
    assert value == pytest.approx((1000 + math.log(3)) / 2)
    np.testing.assert_allclose(dz, [[0.5, -0.5, 0.0], [1 / 6, 1 / 6, -1 / 3]], atol=1e-15)
    assert loss(z + 1e4, t) == pytest.approx(value)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_losses_keep_the_dtype_of_the_logits(dtype):
    z = np.zeros((3, 2), dtype)
    for loss, t in ((lr.BCEWithLogitsLoss(), np.ones((3, 2))), (lr.CrossEntropyLoss(), np.array([0, 1, 1])),
                    (lr.MSELoss(), np.ones((3, 2)))):
        loss(z, t)
        assert loss.backward().dtype == dtype


def test_bce_accepts_integer_targets():
    z = np.array([0.3, -1.2, 2.0])
    assert lr.BCEWithLogitsLoss()(z, np.array([1, 0, 1])) == pytest.approx(naive_bce(z, np.array([1.0, 0.0, 1.0])))
