"""LoraLinear: y = x Wᵀ + b + s·(x⊙mask) Aᵀ Bᵀ, its backward, init, merge, dropout (mixed batches: test_mixed_batches.py).

Gradients are checked against central finite differences in float64 (rtol 1e-6); the
merged state, which no longer reads A and B in its forward, is checked against the
unmerged one instead."""
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import numba  # noqa: F401  (required: a broken install fails here instead of skipping the Numba cases)

import lowrank as lr
from lowrank.nn.gradcheck import check_module

CPU_BACKENDS = ["numpy", "numba"]          # the layer's math is the kernels'; Numba is a required dependency

# r > min(D_in, D_out) is legal (PEFT allows it) and warns; the property tests draw such ranks on purpose.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*exceeds min\(D_in, D_out\):UserWarning")


@st.composite
def lora_shapes(draw):
    """(N, D_in, D_out, r) with 1 <= r <= min(D_in, D_out) + 4: ranks above min(D_in, D_out) included."""
    N, D_in, D_out = draw(st.integers(1, 16)), draw(st.integers(1, 32)), draw(st.integers(1, 32))
    return N, D_in, D_out, draw(st.integers(1, min(D_in, D_out) + 4))


def make_lora(D_in, D_out, r, dtype="float64", seed=0, **kw):
    kw.setdefault("init_lora_weights", False)                  # B != 0, so the LoRA branch matters
    base = lr.Dense(D_in, D_out, dtype=dtype, seed=seed, backend=kw.get("backend"))
    return lr.LoraLinear(base, r=r, lora_alpha=2 * r + 1, seed=seed + 1, **kw)


def reference_forward(layer, x, name="default", mask=None):
    """x Wᵀ + b + s·(x⊙mask) Aᵀ Bᵀ in float64, written out."""
    W, b = layer.weight.data.astype(np.float64), layer.bias.data.astype(np.float64)
    A, B = layer.lora_A[name].data.astype(np.float64), layer.lora_B[name].data.astype(np.float64)
    xd = x if mask is None else x * mask
    return x @ W.T + b + layer.scaling[name] * (xd @ A.T) @ B.T


def randn(seed, *shape, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(shape=lora_shapes(), rslora=st.booleans(), train_bias=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=(1, 7, 5, 5), rslora=False, train_bias=False, seed=0)      # r = min(D_in, D_out), N = 1
@example(shape=(3, 32, 32, 1), rslora=True, train_bias=True, seed=1)      # r = 1
@example(shape=(4, 6, 2, 8), rslora=False, train_bias=True, seed=2)       # r = 8 > D_in, D_out (PEFT allows it)
def test_lora_gradients_match_finite_differences(backend, shape, rslora, train_bias, seed):
    N, D_in, D_out, r = shape
    layer = make_lora(D_in, D_out, r, seed=seed, use_rslora=rslora, backend=backend)
    layer.bias.trainable = train_bias                          # PEFT bias="all": the fused path's db
    x = randn(seed, N, D_in)
    np.testing.assert_allclose(layer(x), reference_forward(layer, x), rtol=1e-12, atol=1e-12)
    errors = check_module(layer, x, seed=seed, rtol=1e-6)
    assert set(errors) == {"x", "lora_A.default", "lora_B.default"} | ({"base_layer.bias"} if train_bias else set())
    assert layer.weight.grad is None


@pytest.mark.parametrize("rslora", [False, True])
def test_scaling_is_alpha_over_r_or_sqrt_r(rslora):
    layer = lr.LoraLinear(lr.Dense(8, 8), r=4, lora_alpha=6, use_rslora=rslora)
    assert layer.scaling["default"] == (6 / 2 if rslora else 6 / 4)


def test_rank_above_min_dims_is_legal_and_warns_naming_the_layer():
    """PEFT accepts r > min(D_in, D_out) (r = 8 on a 6-input first layer, on a 2-output head)."""
    with pytest.warns(UserWarning) as record:
        lm = lr.get_lora_model(lr.MLP([6, 16, 16, 2], seed=0), lr.LoraConfig(r=8, target_modules=["0", "2", "4"]))
    messages = sorted(str(w.message) for w in record if "exceeds" in str(w.message))
    assert len(messages) == 2                                  # '2' (16 -> 16) has min 16 >= 8: no warning
    assert "LoraLinear 'model.0' adapter 'default': r=8 exceeds min(D_in, D_out) = 6" in messages[0]
    assert "LoraLinear 'model.4' adapter 'default': r=8 exceeds min(D_in, D_out) = 2" in messages[1]
    assert lm.model[0].lora_A["default"].shape == (8, 6) and lm.model[4].lora_B["default"].shape == (2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # r = min(D_in, D_out) is silent
        lr.LoraLinear(lr.Dense(6, 3), r=3)


@pytest.mark.parametrize("r", [0, -1, 2.5, True, "8", None])
def test_rank_must_be_a_positive_integer(r):
    base = lr.Dense(4, 3)
    with pytest.raises(ValueError, match=rf"LoraLinear '<root>' adapter 'default': r must be an integer >= 1, "
                                         rf"got {re.escape(repr(r))}"):
        lr.LoraLinear(base, r=r)


def test_pissa_refuses_a_rank_above_min_dims_and_leaves_the_base_as_it_was():
    """PiSSA needs r singular triplets of W and W has only min(D_in, D_out): a clear error, no padding."""
    model = lr.MLP([9, 6, 2], dtype="float64", seed=4)
    W = model[0].weight.data.copy()
    with pytest.raises(ValueError, match=r"LoraLinear 'model.0' adapter 'default': PiSSA init needs r <= "
                                         r"min\(D_in, D_out\) = 6 .*got r=7"):
        lr.get_lora_model(model, lr.LoraConfig(r=7, init_lora_weights="pissa", target_modules=["0"]))
    assert isinstance(model[0], lr.Dense) and np.array_equal(model[0].weight.data, W)


def test_a_pissa_adapter_rejected_at_a_later_layer_leaves_the_earlier_base_weights_as_they_were():
    lm = lr.get_lora_model(lr.MLP([6, 10, 12, 3], dtype="float64", seed=0), lr.LoraConfig(r=2, target_modules=["0"]))
    weights = {n: p.data.copy() for n, p in lm.named_parameters()}
    with pytest.raises(ValueError, match="'model.4' adapter 'big': PiSSA init needs r <= min"):
        lm.add_adapter("big", lr.LoraConfig(r=5, target_modules="all-linear", init_lora_weights="pissa"))
    assert all(np.array_equal(p.data, weights[n]) for n, p in lm.named_parameters())


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_B_gives_exactly_the_base_output(init, dtype):
    base = lr.Dense(12, 7, dtype=dtype, seed=0)
    x = randn(1, 5, 12, dtype=dtype)
    expected = base(x)
    layer = lr.LoraLinear(base, r=3, lora_alpha=16, init_lora_weights=init, seed=2)
    assert not layer.lora_B["default"].data.any()
    np.testing.assert_array_equal(layer(x), expected)


def test_default_and_gaussian_init_of_A():
    D_in, r = 64, 16
    kaiming = lr.LoraLinear(lr.Dense(D_in, 64), r=r, seed=0).lora_A["default"].data
    assert kaiming.shape == (r, D_in) and np.abs(kaiming).max() <= 1 / math.sqrt(D_in)
    gauss = lr.LoraLinear(lr.Dense(D_in, 64), r=r, init_lora_weights="gaussian", seed=0).lora_A["default"].data
    assert abs(gauss.std() - 1 / r) < 0.1 / r                 # PEFT: normal_(std=1/r)


@given(shape=lora_shapes(), dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
@settings(max_examples=15)
def test_merged_forward_and_backward_equal_unmerged(shape, dtype, seed):
    N, D_in, D_out, r = shape
    layer = make_lora(D_in, D_out, r, dtype, seed)
    x, dy = randn(seed, N, D_in, dtype=dtype), randn(seed + 1, N, D_out, dtype=dtype)
    y, dx = layer(x), layer.backward(dy)
    dA, dB = layer.lora_A["default"].grad, layer.lora_B["default"].grad
    layer.zero_grad()
    layer.merge()
    assert layer.merged and layer.merged_adapters == ["default"]
    y_merged, dx_merged = layer(x), layer.backward(dy)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    for merged, unmerged in ((y_merged, y), (dx_merged, dx), (layer.lora_A["default"].grad, dA),
                             (layer.lora_B["default"].grad, dB)):
        np.testing.assert_allclose(merged, unmerged, rtol=rtol, atol=rtol * np.abs(unmerged).max())


@given(shape=lora_shapes(), dtype=st.sampled_from(["float32", "float64"]), B_scale=st.sampled_from([1e-3, 1.0, 1e3]),
       seed=st.integers(0, 2**16))
def test_merge_then_unmerge_recovers_W_within_the_documented_bound(shape, dtype, B_scale, seed):
    _, D_in, D_out, r = shape
    layer = make_lora(D_in, D_out, r, dtype, seed)
    layer.lora_B["default"].data *= layer.lora_B["default"].data.dtype.type(B_scale)
    W = layer.weight.data.copy()
    D = layer.delta_weight("default").astype(np.float64)                   # s·B·A as merge adds it
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    eps = np.finfo(dtype).eps
    bound = np.minimum(eps * np.abs(W.astype(np.float64) + D), 2 * np.abs(D)) * (1 + 1e-9)
    assert (np.abs(layer.weight.data.astype(np.float64) - W) <= bound).all()


def test_merge_of_an_unknown_adapter_changes_nothing():
    layer = make_lora(6, 5, 2, "float32")
    W = layer.weight.data.copy()
    with pytest.raises(ValueError, match=r"no adapter 'nope'; it has \['default'\]"):
        layer.merge(["default", "nope"])
    np.testing.assert_array_equal(layer.weight.data, W)
    assert not layer.merged


@pytest.mark.parametrize("dtype,rtol", [("float32", 1e-5), ("float64", 1e-12)])
@pytest.mark.parametrize("r", [1, 3, 6])
def test_pissa_starts_at_the_base_output(dtype, rtol, r):
    base = lr.Dense(9, 6, dtype=dtype, seed=4)
    x = randn(0, 5, 9, dtype=dtype)
    y0, W0 = base(x), base.weight.data.astype(np.float64)
    layer = lr.LoraLinear(base, r=r, lora_alpha=4, init_lora_weights="pissa")
    np.testing.assert_allclose(layer(x), y0, rtol=rtol, atol=rtol * np.abs(y0).max())
    U, S, Vt = np.linalg.svd(W0)                                # s·B·A is the best rank-r part of W
    top_r = (U[:, :r] * S[:r]) @ Vt[:r]
    np.testing.assert_allclose(layer.delta_weight("default"), top_r, rtol=rtol, atol=10 * rtol * S[0])


def test_dropout_is_the_identity_in_eval_mode():
    layer = make_lora(10, 4, 3, lora_dropout=0.5).eval()
    x = randn(0, 6, 10)
    np.testing.assert_allclose(layer(x), reference_forward(layer, x), rtol=1e-12)
    assert layer._cache.mask is None


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_backward_uses_the_forward_mask(backend):
    p = 0.5
    layer = make_lora(10, 4, 3, lora_dropout=p, backend=backend).train()
    x, dy = randn(0, 200, 10), randn(1, 200, 4)
    y = layer(x)
    mask = layer._cache.mask                                   # what the forward drew
    assert set(np.unique(mask)) == {0.0, 1 / (1 - p)} and abs((mask == 0).mean() - p) < 0.05
    np.testing.assert_allclose(y, reference_forward(layer, x, mask=mask), rtol=1e-12)
    dx = layer.backward(dy)
    W, A, B, s = layer.weight.data, layer.lora_A["default"].data, layer.lora_B["default"].data, layer.scaling["default"]
    dh = s * dy @ B                                            # (N, D_out) @ (D_out, r)
    np.testing.assert_allclose(layer.lora_A["default"].grad, dh.T @ (x * mask), rtol=1e-12)
    np.testing.assert_allclose(layer.lora_B["default"].grad, s * dy.T @ ((x * mask) @ A.T), rtol=1e-12)
    np.testing.assert_allclose(dx, dy @ W + (dh @ A) * mask, rtol=1e-12)
    layer(x)
    assert not np.array_equal(layer._cache.mask, mask)        # a fresh mask every forward


def test_no_active_adapter_is_the_base_alone():
    layer = make_lora(5, 3, 2)
    x, dy = randn(0, 4, 5), randn(1, 4, 3)
    layer.set_adapter(None)
    np.testing.assert_allclose(layer(x), x @ layer.weight.data.T + layer.bias.data, rtol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), dy @ layer.weight.data, rtol=1e-12)
    assert layer.lora_A["default"].grad is None


class WrappedDense(lr.Module):
    """A Dense-like base that is not a Dense (as a quantized base will be): the unfused path."""

    def __init__(self, dense):
        super().__init__()
        self.inner = dense

    in_features = property(lambda self: self.inner.in_features)
    out_features = property(lambda self: self.inner.out_features)
    weight = property(lambda self: self.inner.weight)
    bias = property(lambda self: self.inner.bias)

    def forward(self, x):
        return self.inner.forward(x)

    def backward(self, dy):
        return self.inner.backward(dy)


@given(shape=lora_shapes(), seed=st.integers(0, 2**16))
@settings(max_examples=10)
def test_lora_over_a_non_dense_base_matches_finite_differences(shape, seed):
    N, D_in, D_out, r = shape
    base = WrappedDense(lr.Dense(D_in, D_out, dtype="float64", seed=seed))
    layer = lr.LoraLinear(base, r=r, lora_alpha=3, init_lora_weights=False, seed=seed)
    x = randn(seed, N, D_in)
    np.testing.assert_allclose(layer(x), reference_forward(layer, x), rtol=1e-12, atol=1e-12)
    check_module(layer, x, seed=seed, rtol=1e-6)
    with pytest.raises(TypeError, match="merge needs a dense base"):
        layer.merge()
    with pytest.raises(TypeError, match="mixed-adapter batches need a dense base"):
        layer(x, adapter_names=["default"] * N)


