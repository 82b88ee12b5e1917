"""LoraLinear and Dense give the same outputs and gradients with backend "numpy" and "numba"."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import numba  # noqa: F401  (a required dependency: a broken install fails here, it is never skipped)

import lowrank as lr
from lowrank.kernels import config

# r > min(D_in, D_out) is legal (PEFT allows it) and warns; the tests draw such ranks on purpose.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*exceeds min\(D_in, D_out\):UserWarning")


def twins(D_in, D_out, dtype, r=None, dropout=0.0, bias=True, adapters=1):
    """The same layer built twice, one per backend (same seeds: same weights and dropout masks)."""
    made = []
    for backend in ("numpy", "numba"):
        base = lr.Dense(D_in, D_out, bias, dtype=dtype, seed=0, backend=backend)
        if r is None:
            made.append(base)
            continue
        layer = lr.LoraLinear(base, r=r, lora_alpha=2 * r, lora_dropout=dropout, init_lora_weights=False,
                              seed=1, backend=backend)
        for k in range(1, adapters):
            layer.update_layer(f"a{k}", r + k % 2, 3.0, init_lora_weights=False)
        made.append(layer)
    return made


def run(layer, x, dy, **kw):
    layer.zero_grad()
    y = layer.forward(x, **kw)
    dx = layer.backward(dy)
    return [y, dx] + [p.grad for _, p in layer.named_parameters() if p.trainable]


def assert_same(a, b, dtype):
    name = np.dtype(dtype).name
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, rtol=config.RTOL[name], atol=config.ATOL[name])


@given(N=st.integers(1, 9), D_in=st.integers(1, 12), D_out=st.integers(1, 12), r=st.integers(1, 8),
       dtype=st.sampled_from(["float32", "float64"]), dropout=st.sampled_from([0.0, 0.3]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_linear_same_on_both_backends(N, D_in, D_out, r, dtype, dropout, bias, seed):
    rng = np.random.default_rng(seed)
    x, dy = rng.standard_normal((N, D_in)).astype(dtype), rng.standard_normal((N, D_out)).astype(dtype)
    a, b = twins(D_in, D_out, dtype, r, dropout, bias)
    assert_same(run(a, x, dy), run(b, x, dy), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dense_same_on_both_backends_trainable_and_frozen(dtype, rng):
    x, dy = rng.standard_normal((5, 7)).astype(dtype), rng.standard_normal((5, 3)).astype(dtype)
    a, b = twins(7, 3, dtype)
    assert_same(run(a, x, dy), run(b, x, dy), dtype)
    a.requires_grad_(False)
    b.requires_grad_(False)
    assert_same(run(a, x, dy), run(b, x, dy), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("r", [2, 6])                  # 6, 7 > min(D_in, D_out) = 5: zero-padded stacks of rank 7
def test_mixed_batch_same_on_both_backends(dtype, r, rng):
    a, b = twins(6, 5, dtype, r=r, adapters=3)
    names = ["a1", "__base__", "default", "a1", "a2", "__base__", "a1"]
    x, dy = rng.standard_normal((7, 6)).astype(dtype), rng.standard_normal((7, 5)).astype(dtype)
    assert_same(run(a, x, dy, adapter_names=names), run(b, x, dy, adapter_names=names), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_merged_adapter_same_on_both_backends(dtype, rng):
    a, b = twins(6, 5, dtype, r=2)
    for layer in (a, b):
        layer.merge()
    x, dy = rng.standard_normal((4, 6)).astype(dtype), rng.standard_normal((4, 5)).astype(dtype)
    assert_same(run(a, x, dy), run(b, x, dy), dtype)
