"""Central finite differences in float64, contracted with a random upstream gradient.

For f: arrays -> y and an upstream gradient g (same shape as y), the directional
derivative of L = Σ g ⊙ f(inputs) with respect to one element θ is
    (L(θ + ε) − L(θ − ε)) / 2ε,
which must equal that element of the analytic gradient. Used by the tests; usable by
anyone writing a new layer.
"""
from __future__ import annotations

import numpy as np


def numerical_gradient(f, array, g, eps: float = 1e-6):
    """∂(Σ g ⊙ f())/∂array by central differences; perturbs ``array`` in place and restores it.

    Indexes ``array`` itself (not a reshaped copy), so non-contiguous views work too.
    """
    grad = np.zeros(array.shape, dtype=np.float64)
    for i in np.ndindex(*array.shape):
        old = array[i]
        array[i] = old + eps
        plus = float(np.sum(g * f()))
        array[i] = old - eps
        minus = float(np.sum(g * f()))
        array[i] = old
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(forward, backward, inputs: dict, *, seed=0, eps=1e-6, rtol=1e-6, atol=1e-9):
    """Compare analytic and numerical gradients; raises AssertionError naming the worst entry.

    forward()      -> output y, reading the (float64) arrays in ``inputs`` in place
    backward(g)    -> {name: analytic gradient} for the names in ``inputs``
    Returns the largest |analytic − numerical| per name. Besides ``atol + rtol·|numerical|``
    an entry may differ by the rounding floor of a central difference, 8·eps_mach·Σ|g ⊙ y| / eps
    (the sum L = Σ g ⊙ y is only known to rounding), so gradients near 0 are not held to noise.
    """
    y = forward()
    g = np.random.default_rng(seed).standard_normal(np.shape(y))
    floor = 8 * np.finfo(np.float64).eps * float(np.sum(np.abs(g * y))) / eps
    analytic = backward(g)
    errors = {}
    for name, array in inputs.items():
        if np.dtype(array.dtype) != np.float64:
            raise TypeError(f"gradcheck: {name} must be float64 for finite differences, got {array.dtype}")
        numeric = numerical_gradient(forward, array, g, eps)
        diff = np.abs(np.asarray(analytic[name]) - numeric)
        errors[name] = float(diff.max(initial=0.0))
        bad = diff > atol + floor + rtol * np.abs(numeric)
        if bad.any():
            i = np.unravel_index(np.argmax(diff - rtol * np.abs(numeric)), diff.shape)
            raise AssertionError(f"gradcheck: d{name}{[int(k) for k in i]} analytic {np.asarray(analytic[name])[i]:.10g} "
                                 f"!= numerical {numeric[i]:.10g} (max |diff| {errors[name]:.3g})")
    return errors


def check_module(module, x, *, seed=0, **tolerances):
    """gradcheck a module's backward: dx and every trainable parameter's gradient."""
    params = {name: p for name, p in module.named_parameters() if p.trainable}

    def backward(g):
        module.zero_grad()
        module.forward(x)
        dx = module.backward(g)
        return {"x": dx, **{name: np.zeros_like(p.data) if p.grad is None else p.grad   # None = no gradient
                            for name, p in params.items()}}

    inputs = {"x": x, **{name: p.data for name, p in params.items()}}
    return gradcheck(lambda: module.forward(x), backward, inputs, seed=seed, **tolerances)
