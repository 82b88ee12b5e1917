"""The fused LM head and cross-entropy (``linear_cross_entropy``) against the unchunked loss written
out in float64, across chunk borders, and its gradients against central finite differences."""
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank.kernels import config, numba_cpu, reference

BACKENDS = {"numpy": reference, "numba": numba_cpu}


def unchunked(x, W, labels, scale, ignore_index=-100):
    """The whole (N, V) logits at once: loss_sum, dx, dW."""
    z = x @ W.T
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    counted = labels != ignore_index
    target = np.where(counted, labels, 0)
    loss = (lse - z[np.arange(len(z)), target])[counted].sum()
    g = np.exp(z - lse[:, None])
    g[np.arange(len(z)), target] -= 1
    g *= scale * counted[:, None]
    return loss, g @ W, g.T @ x


def _inputs(seed, N, d, V, ignored=0.3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, N)
    labels[rng.random(N) < ignored] = -100
    return rng.standard_normal((N, d)), rng.standard_normal((V, d)), labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 3, 256])
@given(seed=st.integers(0, 2**16), N=st.integers(0, 12), d=st.integers(1, 6), V=st.integers(1, 30))
def test_equals_the_unchunked_loss_in_float64(backend, chunk, seed, N, d, V):
    x, W, labels = _inputs(seed, N, d, V)
    with mock.patch.object(config, "LOSS_CHUNK_ROWS", chunk):   # rows cross chunk borders
        loss, dx, dW = BACKENDS[backend].linear_cross_entropy(x, W, labels, 0.25)
    want = unchunked(x, W, labels, 0.25)
    np.testing.assert_allclose(float(loss), want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, want[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dW, want[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_loss_derivatives(monkeypatch, backend):
    """Central differences of scale · loss_sum in every element of x and W."""
    monkeypatch.setattr(config, "LOSS_CHUNK_ROWS", 2)
    x, W, labels = _inputs(1, 5, 3, 7)
    fn = BACKENDS[backend].linear_cross_entropy
    _, dx, dW = fn(x, W, labels, 0.5)
    eps = 1e-6
    for a, grad in ((x, dx), (W, dW)):
        for i in np.ndindex(a.shape):
            a[i] += eps
            up = float(fn(x, W, labels, 0.5, need_dx=False, need_dW=False)[0])
            a[i] -= 2 * eps
            down = float(fn(x, W, labels, 0.5, need_dx=False, need_dW=False)[0])
            a[i] += eps
            assert grad[i] == pytest.approx(0.5 * (up - down) / (2 * eps), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for_are_computed(backend):
    x, W, labels = _inputs(2, 4, 3, 5)
    loss, dx, dW = BACKENDS[backend].linear_cross_entropy(x, W, labels, 1.0, need_dx=True, need_dW=False)
    assert dW is None and dx.shape == x.shape
    assert BACKENDS[backend].linear_cross_entropy(x, W, labels, need_dx=False, need_dW=False)[1:] == (None, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_labels_are_named(backend):
    x, W, labels = _inputs(3, 4, 3, 5, ignored=0.0)
    labels[2] = 5
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\) or be ignore_index=-100, got 5"):
        BACKENDS[backend].linear_cross_entropy(x, W, labels)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        BACKENDS[backend].linear_cross_entropy(x, W, labels.astype(float))
