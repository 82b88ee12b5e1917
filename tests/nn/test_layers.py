"""Dense, the activations and the MLP: forward against float64 formulas, backward against
central finite differences (lowrank.nn.gradcheck, rtol 1e-6, random upstream gradients)."""
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import lowrank as lr
from lowrank.nn.gradcheck import check_module
from lowrank.kernels import reference

N_ROWS = st.integers(1, 16)
WIDTH = st.integers(1, 32)
SEED = st.integers(0, 2**16)


@given(N=N_ROWS, D_in=WIDTH, D_out=WIDTH, bias=st.booleans(), frozen=st.booleans(), seed=SEED)
def test_dense_gradients_match_finite_differences(N, D_in, D_out, bias, frozen, seed):
    layer = lr.Dense(D_in, D_out, bias, dtype="float64", seed=seed)
    layer.weight.trainable = not frozen
    x = np.random.default_rng(seed + 1).standard_normal((N, D_in))
    errors = check_module(layer, x, seed=seed, rtol=1e-6)
    assert ("weight" in errors) == (not frozen)
    assert ("bias" in errors) == bias
    if frozen:
        assert layer.weight.grad is None                        # no dW computed, none allocated


def test_dense_forward_is_x_Wt_plus_b():
    layer = lr.Dense(5, 3, dtype="float64", seed=0)
    x = np.random.default_rng(1).standard_normal((4, 5))
    W, b = layer.weight.data, layer.bias.data
    expected = [[sum(x[n, i] * W[o, i] for i in range(5)) + b[o] for o in range(3)] for n in range(4)]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-12)


def test_frozen_dense_keeps_no_input_and_computes_no_dW(monkeypatch):
    asked = []

    def spy(dy, x, W, need_dx=True, need_dW=True, need_db=True):
        out = dense_backward(dy, x, W, need_dx, need_dW, need_db)
        asked.append((need_dW, out[1]))
        return out

    dense_backward = reference.dense_backward
    monkeypatch.setattr(reference, "dense_backward", spy)
    layer = lr.Dense(6, 4, seed=0, backend="numpy")
    layer.weight.trainable = False
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    layer(x)
    assert layer._cache.x is None                               # nothing kept for a dW nobody needs
    dx = layer.backward(np.ones((3, 4), np.float32))
    assert asked == [(False, None)]                             # the kernel was asked for no dW
    np.testing.assert_allclose(dx, np.ones((3, 4)) @ layer.weight.data, rtol=1e-6)
    assert layer.weight.grad is None
    np.testing.assert_allclose(layer.bias.grad, np.full(4, 3.0))


def test_dense_backward_accumulates_over_calls():
    layer = lr.Dense(3, 2, dtype="float64", seed=0)
    x, dy = np.ones((4, 3)), np.ones((4, 2))
    for _ in range(2):
        layer(x)
        layer.backward(dy)
    np.testing.assert_allclose(layer.weight.grad, 2 * dy.T @ x)
    np.testing.assert_allclose(layer.bias.grad, 2 * dy.sum(0))


def test_dense_init_is_pytorch_kaiming_uniform():
    D_in = 50
    layer = lr.Dense(D_in, 400, seed=3)
    bound = 1 / math.sqrt(D_in)                                 # kaiming_uniform_(a=√5) on (out, in)
    W = layer.weight.data.astype(np.float64)
    assert np.abs(W).max() <= bound and np.abs(layer.bias.data).max() <= bound
    assert abs(W.std() - bound / math.sqrt(3)) < 0.02 * bound   # U(−c, c) has std c/√3
    np.testing.assert_array_equal(W, lr.Dense(D_in, 400, seed=3).weight.data)   # seeded: reproducible


ACTIVATIONS = {"relu": lr.ReLU, "tanh": lr.Tanh, "sigmoid": lr.Sigmoid, "gelu": lr.GELU,
               "gelu_tanh": lambda: lr.GELU("tanh")}


def phi(v):
    return 0.5 * (1 + math.erf(v / math.sqrt(2)))


ACTIVATION_FORMULAS = {
    "relu": lambda v: max(v, 0.0),
    "tanh": math.tanh,
    "sigmoid": lambda v: 1 / (1 + math.exp(-v)),
    "gelu": lambda v: v * phi(v),
    "gelu_tanh": lambda v: 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_forward_matches_scalar_formula(name):
    x = np.linspace(-6, 6, 41).reshape(1, -1)
    expected = [[ACTIVATION_FORMULAS[name](float(v)) for v in x[0]]]
    np.testing.assert_allclose(ACTIVATIONS[name]()(x), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@given(N=N_ROWS, D=WIDTH, seed=SEED)
@settings(max_examples=10)
def test_activation_gradients_match_finite_differences(name, N, D, seed):
    x = 3 * np.random.default_rng(seed).standard_normal((N, D))
    if name == "relu":
        assume(np.abs(x).min() > 1e-3)                          # no kink within ε of an input
    check_module(ACTIVATIONS[name](), x, seed=seed, rtol=1e-6)


def test_sigmoid_is_stable_for_large_inputs():
    with np.errstate(over="raise"):
        y = lr.Sigmoid()(np.array([[-1e4, -50.0, 0.0, 50.0, 1e4]]))
    np.testing.assert_allclose(y, [[0.0, 1 / (1 + math.exp(50)), 0.5, 1 / (1 + math.exp(-50)), 1.0]], rtol=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_mlp_gradients_match_finite_differences(activation):
    model = lr.MLP([5, 7, 3, 2], activation, dtype="float64", seed=1)
    x = np.random.default_rng(2).standard_normal((6, 5))
    errors = check_module(model, x, seed=3, rtol=1e-6)
    assert set(errors) == {"x", "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}


def test_mlp_is_sequential_of_dense_and_activation():
    model = lr.MLP([4, 8, 8, 2], "gelu", bias=False, seed=0)
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds == ["Dense", "GELU", "Dense", "GELU", "Dense"]
    assert all(model[i].bias is None for i in (0, 2, 4))
    assert model[1].approximate == "none" and lr.MLP([2, 2, 1], "gelu_tanh")[1].approximate == "tanh"


def test_sequential_backward_runs_children_in_reverse():
    model = lr.Sequential(lr.Dense(3, 4, dtype="float64", seed=0), lr.Tanh(), lr.Dense(4, 2, dtype="float64", seed=1))
    x, dy = np.random.default_rng(0).standard_normal((5, 3)), np.random.default_rng(1).standard_normal((5, 2))
    model(x)
    dx = model.backward(dy)
    W0, W2 = model[0].weight.data, model[2].weight.data
    t = np.tanh(x @ W0.T + model[0].bias.data)
    np.testing.assert_allclose(dx, ((dy @ W2) * (1 - t * t)) @ W0, rtol=1e-12)


@given(N=N_ROWS, sizes=st.lists(WIDTH, min_size=2, max_size=3), activation=st.sampled_from(sorted(ACTIVATIONS)),
       dropout=st.sampled_from([0.0, 0.3]), data=st.data(), seed=SEED)
@settings(max_examples=12)
@pytest.mark.filterwarnings(r"ignore:.*exceeds min\(D_in, D_out\):UserWarning")   # r > min drawn on purpose
def test_mlp_with_lora_layers_matches_finite_differences(N, sizes, activation, dropout, data, seed):
    model = lr.MLP(sizes, activation, dtype="float64", seed=seed)
    for i in range(0, len(model), 2):
        r = data.draw(st.integers(1, min(sizes[i // 2], sizes[i // 2 + 1]) + 4), label=f"r of layer {i}")
        model.set_submodule(str(i), lr.LoraLinear(model[i], r=r, lora_alpha=3.0, lora_dropout=dropout,
                                                  use_rslora=data.draw(st.booleans()), init_lora_weights=False,
                                                  seed=seed + i))
    model.eval()                                               # dropout off: eval mode is the identity
    x = np.random.default_rng(seed).standard_normal((N, sizes[0]))
    h = x
    for m in model.children():                                 # no ReLU input within ε of its kink
        if isinstance(m, lr.ReLU):
            assume(np.abs(h).min() > 1e-3)
        h = m(h)
    errors = check_module(model, x, seed=seed, rtol=1e-6)
    assert set(errors) == {"x"} | {f"{i}.lora_{ab}.default" for i in range(0, len(model), 2) for ab in "AB"}
