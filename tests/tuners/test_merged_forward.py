"""A merged LoraLinear costs what its base costs: one dense product, no x·Aᵀ, no input kept,
when nothing needs the adapter's gradients (eval mode, or frozen factors). In training mode
with trainable factors it still computes h = x Aᵀ, so dA and dB equal the unmerged layer's
(tests/tuners/test_lora_layer.py), and its backward is the base's dx either way."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.nn import dispatch

CALLS = ("dense_forward", "dense_backward", "lora_forward", "lora_backward")


@pytest.fixture
def calls(monkeypatch):
    """Count every kernel call the numpy backend gets."""
    k, counts = dispatch._load("numpy"), {name: 0 for name in CALLS}
    for name in CALLS:
        def counted(*args, _f=getattr(k, name), _n=name, **kw):
            counts[_n] += 1
            return _f(*args, **kw)
        monkeypatch.setattr(k, name, counted)
    return counts


def merged_layer(trainable_factors=True):
    base = lr.Dense(6, 4, dtype="float64", seed=0, backend="numpy")
    layer = lr.LoraLinear(base, r=2, lora_alpha=3, init_lora_weights=False, seed=1, backend="numpy")
    layer.merge()
    for p in (layer.lora_A["default"], layer.lora_B["default"]):
        p.trainable = trainable_factors
    return layer


def randn(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("mode", ["eval", "frozen"])
def test_a_merged_layer_runs_the_base_product_alone(calls, mode):
    layer = merged_layer(trainable_factors=mode != "frozen")
    layer.train(mode != "eval")
    x, dy = randn(0, 3, 6), randn(1, 3, 4)
    y = layer(x)
    assert calls == {"dense_forward": 1, "dense_backward": 0, "lora_forward": 0, "lora_backward": 0}
    assert layer._cache.x is None and layer._cache.h is None           # no input kept for nothing
    assert layer.base_layer._cache.x is None                            # the frozen base keeps none either
    np.testing.assert_allclose(y, x @ layer.weight.data.T + layer.bias.data, rtol=1e-12)
    dx = layer.backward(dy)
    assert calls["lora_backward"] == 0 and calls["dense_backward"] == 1
    np.testing.assert_allclose(dx, dy @ layer.weight.data, rtol=1e-12)
    assert layer.lora_A["default"].grad is None and layer.lora_B["default"].grad is None


def test_training_a_merged_layer_with_trainable_factors_still_gets_dA_and_dB(calls):
    layer = merged_layer()
    layer.train()
    x, dy = randn(0, 3, 6), randn(1, 3, 4)
    layer(x)
    assert layer._cache.h is not None and layer._cache.x is x
    dx = layer.backward(dy)
    s, A, B = layer.scaling["default"], layer.lora_A["default"].data, layer.lora_B["default"].data
    np.testing.assert_allclose(layer.lora_B["default"].grad, s * dy.T @ (x @ A.T), rtol=1e-12)
    np.testing.assert_allclose(layer.lora_A["default"].grad, s * (dy @ B).T @ x, rtol=1e-12)
    np.testing.assert_allclose(dx, dy @ layer.weight.data, rtol=1e-12)   # W holds s·B·A already


def test_backward_checks_dy_against_the_forward_rows_without_x(calls):
    layer = merged_layer().eval()
    layer(randn(0, 3, 6))
    with pytest.raises(ValueError, match=r"expects dy of shape \(3, 4\)"):
        layer.backward(randn(1, 2, 4))
