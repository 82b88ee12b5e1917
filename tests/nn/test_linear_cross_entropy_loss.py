"""LinearCrossEntropyLoss (the LM head and the loss fused) equals the head's logits through
CausalLMLoss, in float64: the loss, the hidden states' gradient and the head weight's."""
import numpy as np
import pytest

from lowrank.kernels import config
from lowrank.nn.gradcheck import numerical_gradient
from lowrank.nn.losses_lm import CausalLMLoss, LinearCrossEntropyLoss
from lowrank.nn.module import Parameter


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("trainable", [True, False])
def test_equals_the_logits_path(backend, trainable, rng, monkeypatch):
    monkeypatch.setattr(config, "LOSS_CHUNK_ROWS", 5)                    # 3·(7−1) rows cross chunk borders
    B, T, d, V = 3, 7, 4, 11
    hidden = rng.standard_normal((B, T, d))
    W = Parameter(rng.standard_normal((V, d)), trainable=trainable)
    labels = rng.integers(0, V, (B, T))
    labels[0, 3:] = -100                                                  # padding and masked labels
    labels[2, :2] = -100
    want = CausalLMLoss()
    want_loss = want.forward(hidden @ W.data.T, labels)
    dlogits = want.backward()                                             # (B, T, V)
    fused = LinearCrossEntropyLoss()
    fused.backend = backend
    assert fused.forward(hidden, W, labels) == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(fused.backward(), dlogits @ W.data, rtol=1e-10, atol=1e-14)
    if trainable:
        np.testing.assert_allclose(W.grad, np.einsum("btv,btd->vd", dlogits, hidden), rtol=1e-10, atol=1e-14)
    else:
        assert W.grad is None


def test_without_gradients_it_keeps_nothing_for_backward(rng):
    W = Parameter(rng.standard_normal((5, 3)))
    loss = LinearCrossEntropyLoss()
    loss.forward(rng.standard_normal((2, 4, 3)), W, rng.integers(0, 5, (2, 4)), need_grad=False)
    with pytest.raises(Exception, match="backward called before forward"):
        loss.backward()


def test_errors_name_the_problem(rng):
    W = Parameter(rng.standard_normal((5, 3)))
    loss = LinearCrossEntropyLoss()
    with pytest.raises(ValueError, match=r"hidden must be \(B, T, 3\), got \(2, 4\)"):
        loss.forward(rng.standard_normal((2, 4)), W, np.zeros((2, 4), np.int64))
    with pytest.raises(TypeError, match=r"labels must be an integer array of shape \(2, 4\)"):
        loss.forward(rng.standard_normal((2, 4, 3)), W, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="no label to predict"):
        loss.forward(rng.standard_normal((2, 4, 3)), W, np.full((2, 4), -100))


def test_gradients_match_finite_differences(rng):
    """d hidden and dW of the fused loss against central differences of its value (float64)."""
    B, T, d, V = 2, 4, 3, 6
    hidden, labels = rng.standard_normal((B, T, d)), rng.integers(0, V, (B, T))
    labels[1, 2] = -100
    W = Parameter(rng.standard_normal((V, d)))
    loss = LinearCrossEntropyLoss()
    loss.forward(hidden, W, labels)
    dhidden = loss.backward()

    def value():
        return np.asarray(loss.forward(hidden, W, labels, need_grad=False))
    np.testing.assert_allclose(dhidden, numerical_gradient(value, hidden, 1.0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(W.grad, numerical_gradient(value, W.data, 1.0), rtol=1e-6, atol=1e-9)
