"""The gradient checker itself: right on known derivatives, and it catches wrong backwards."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.nn.gradcheck import check_module, gradcheck, numerical_gradient


def test_numerical_gradient_of_a_known_function_and_restores_the_input():
    x = np.random.default_rng(0).standard_normal((3, 4))
    before = x.copy()
    g = np.random.default_rng(1).standard_normal((3, 4))
    grad = numerical_gradient(lambda: x**3, x, g)             # ∂Σ g x³ / ∂x = 3 g x²
    np.testing.assert_allclose(grad, 3 * g * x**2, rtol=1e-7)
    np.testing.assert_array_equal(x, before)


def test_numerical_gradient_perturbs_non_contiguous_views():
    x = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    view = x[:, ::2]                                           # strided: reshape(-1) would copy
    grad = numerical_gradient(lambda: 2 * view, view, np.ones((2, 2)))
    np.testing.assert_allclose(grad, np.full((2, 2), 2.0), rtol=1e-8)


def test_gradcheck_passes_a_right_backward_and_reports_errors():
    x = np.random.default_rng(0).standard_normal((4, 3))
    errors = gradcheck(lambda: np.sin(x), lambda g: {"x": g * np.cos(x)}, {"x": x})
    assert set(errors) == {"x"} and errors["x"] < 1e-8


def test_gradcheck_catches_a_wrong_backward():
    x = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(AssertionError, match=r"gradcheck: dx\[\d+, \d+\] analytic .* != numerical"):
        gradcheck(lambda: np.sin(x), lambda g: {"x": g * np.cos(x) * 1.001}, {"x": x})


def test_gradcheck_uses_a_random_upstream_gradient():
    x = np.random.default_rng(0).standard_normal(5)
    seen = []
    gradcheck(lambda: 2 * x, lambda g: seen.append(g) or {"x": 2 * g}, {"x": x}, seed=7)
    assert not np.allclose(seen[0], seen[0][0])               # not ones, not constant


def test_gradcheck_needs_float64():
    x = np.ones(3, np.float32)
    with pytest.raises(TypeError, match="x must be float64 for finite differences, got float32"):
        gradcheck(lambda: x, lambda g: {"x": g}, {"x": x})


class _WrongDense(lr.Dense):
    """Dense whose backward forgets the bias gradient's sum over rows."""

    def backward(self, dy):
        dx = super().backward(dy)
        self.bias.grad = dy[0].copy()
        return dx


def test_check_module_catches_a_wrong_parameter_gradient():
    layer = _WrongDense(3, 2, dtype="float64", seed=0)
    with pytest.raises(AssertionError, match=r"gradcheck: dbias"):
        check_module(layer, np.random.default_rng(0).standard_normal((4, 3)))


def test_check_module_treats_a_missing_grad_as_zero():
    layer = lr.LoraLinear(lr.Dense(4, 3, dtype="float64", seed=0), r=2, init_lora_weights=False, seed=1)
    layer.update_layer("idle", 2, 4, init_lora_weights=False)  # trainable, but not active: grad stays None
    errors = check_module(layer, np.random.default_rng(0).standard_normal((5, 4)))
    assert errors["lora_A.idle"] == 0.0 and errors["lora_B.idle"] == 0.0
