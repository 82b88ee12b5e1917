"""DoRA: gradients (both norm modes) against finite differences, the documented difference
between them, the cheap norm, init, merge, and injection through LoraConfig (mixed batches: test_mixed_batches.py)."""
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank.tuners.lora.dora import DoraLinear, DoraNorm, dora_norm, dora_norm_materialised, set_exact_norm_grad
from lowrank.nn.gradcheck import check_module
from lowrank.nn.layers import MLP, Dense, ReLU
from lowrank.tuners.lora.mixed import BASE
from lowrank.tuners.lora.layer import LoraLinear
from lowrank.tuners.lora.config import LoraConfig
from lowrank.tuners.lora.model import get_lora_model
from lowrank.tuners.lora.qlora import NF4Dense

# (N, D_in, D_out, r, seed); r is drawn independently of D_in, D_out, so r > min(D_in, D_out) (legal, as
# in PEFT, and warned about) is covered too.
shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.integers(1, 8), st.integers(0, 99))
pytestmark = pytest.mark.filterwarnings(r"ignore:.*exceeds min\(D_in, D_out\):UserWarning")


def make(shape, exact=False, bias=True, dtype="float64"):
    """A DoraLinear with random B (B ≠ 0) and a magnitude moved off its initial value."""
    N, D_in, D_out, r, seed = shape
    rng = np.random.default_rng(seed)
    layer = DoraLinear(Dense(D_in, D_out, bias, dtype=dtype, seed=seed), r=r, lora_alpha=1.5 * r,
                       init_lora_weights=False, seed=seed + 1, exact_norm_grad=exact)
    layer.lora_magnitude_vector["default"].data *= rng.uniform(0.5, 1.5, D_out).astype(dtype)
    return layer, rng.standard_normal((N, D_in)).astype(dtype)


def parts(layer, name="default"):
    W, A, B = layer.weight.data, layer.lora_A[name].data, layer.lora_B[name].data
    return W, A, B, layer.scaling[name], layer.lora_magnitude_vector[name].data


def grads(layer, x, g):
    layer.zero_grad()
    layer.forward(x)
    dx = layer.backward(g)
    return dx, {n: p.grad for n, p in layer.named_parameters() if p.trainable}


@given(shapes)
def test_cheap_norm_equals_materialised(shape):
    layer, _ = make(shape)
    W, A, B, s, _ = parts(layer)
    n = dora_norm(W, A, B, s).n
    np.testing.assert_allclose(n, np.sqrt(((W + s * B @ A) ** 2).sum(axis=1)), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dora_norm_materialised(W, A, B, s), n, rtol=1e-12, atol=1e-14)


@given(shapes, st.booleans(), st.booleans())
def test_exact_gradients_match_finite_differences(shape, trainable_base, bias):
    layer, x = make(shape, exact=True, bias=bias)
    layer.base_layer.requires_grad_(trainable_base)         # dW (κ ⊙ V term) and db, when trainable
    check_module(layer, x)


@given(shapes, st.booleans())
def test_detached_gradients_match_finite_differences_with_the_norm_held_fixed(shape, trainable_base):
    layer, x = make(shape, exact=False)
    layer.base_layer.requires_grad_(trainable_base)
    frozen = DoraNorm(layer.get_weight_norm("default").copy(), None, None)
    with mock.patch.object(layer, "_norm", lambda name: frozen):      # n a constant: what "detached" means
        check_module(layer, x)


@given(shapes)
def test_detached_and_exact_gradients_differ_by_the_projection_onto_each_row(shape):
    """Without dropout, ∂L/∂V_o = c_o G_o (detached) and c_o (I − V̂_o V̂_oᵀ) G_o (exact), G = dyᵀ x;
    then dA = s Bᵀ ∂L/∂V, dB = s ∂L/∂V Aᵀ, and dx, dm agree."""
    layer, x = make(shape)
    W, A, B, s, m = parts(layer)
    g = np.random.default_rng(shape[-1]).standard_normal((x.shape[0], W.shape[0]))
    V = W + s * B @ A
    n = np.linalg.norm(V, axis=1)
    G = g.T @ x                                                        # (D_out, D_in)
    dV_detached = (m / n)[:, None] * G
    dV_exact = dV_detached - (m / n**3 * (G * V).sum(axis=1))[:, None] * V
    dx0, detached = grads(layer, x, g)
    layer.exact_norm_grad = True
    dx1, exact = grads(layer, x, g)
    for name, dV, got in (("detached", dV_detached, detached), ("exact", dV_exact, exact)):
        np.testing.assert_allclose(got["lora_A.default"], s * B.T @ dV, rtol=1e-9, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got["lora_B.default"], s * dV @ A.T, rtol=1e-9, atol=1e-12, err_msg=name)
    kappa = -m * (g * (x @ V.T)).sum(axis=0) / n**3                       # the docstring's κ
    np.testing.assert_allclose(exact["lora_A.default"] - detached["lora_A.default"], s * (kappa[:, None] * B).T @ V,
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-12)
    np.testing.assert_allclose(exact["lora_magnitude_vector.default"], detached["lora_magnitude_vector.default"],
                               rtol=1e-12)


@given(shapes, st.booleans())
def test_at_init_dora_equals_the_layer_without_it(shape, zero_B):
    N, D_in, D_out, r, seed = shape
    base = Dense(D_in, D_out, dtype="float64", seed=seed)
    layer = DoraLinear(base, r=r, lora_alpha=2 * r, init_lora_weights=zero_B, seed=seed)
    x = np.random.default_rng(seed).standard_normal((N, D_in))
    W, A, B, s, _ = parts(layer)
    expected = x @ (W + s * B @ A).T + base.bias.data                  # = base output when B = 0
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)
    if zero_B:
        np.testing.assert_allclose(layer.forward(x), base.forward(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_merge_equals_unmerged_forward_and_unmerge_restores_W(dtype, tol):
    layer, x = make((5, 9, 7, 3, 4), dtype=dtype)
    layer.update_layer("plain", 2, 4.0, init_lora_weights=False)
    layer.eval()
    W0 = layer.weight.data.copy()
    y = layer.forward(x)
    layer.set_adapter("plain")
    y_plain = layer.forward(x)
    layer.merge(["plain", "default"])                # DoRA's norm is then that of W + ΔW_plain + s·B·A
    W, A, B, s, m = parts(layer)
    layer.set_adapter("default")
    np.testing.assert_allclose(layer.forward(x), x @ W.T + layer.bias.data, rtol=tol, atol=tol)   # the base alone
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W0, rtol=tol, atol=tol)
    layer.merge()                                    # the active DoRA adapter alone
    np.testing.assert_allclose(layer.forward(x), y, rtol=tol, atol=tol)
    layer.unmerge()
    layer.set_adapter("plain")
    layer.merge()
    np.testing.assert_allclose(layer.forward(x), y_plain, rtol=tol, atol=tol)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W0, rtol=tol, atol=tol)


def test_a_merged_dora_adapter_gives_dx_through_the_merged_base_only():
    layer, x = make((3, 5, 4, 2, 1))
    layer.merge()
    g = np.ones((3, 4))
    dx, got = grads(layer, x, g)
    np.testing.assert_allclose(dx, g @ layer.weight.data)
    assert all(v is None for v in got.values())


def test_dropout_path_matches_finite_differences_for_a_fixed_mask():
    layer, x = make((4, 6, 5, 3, 2), exact=True)
    layer.lora_dropout["default"] = 0.5
    mask = (np.random.default_rng(3).random(x.shape) > 0.5) * 2.0
    layer._dropout_mask = lambda x_, name: mask             # the same mask on every forward
    check_module(layer, x)
    layer.eval()                                             # eval: z uses x itself
    del layer._dropout_mask
    W, A, B, s, m = parts(layer)
    V = W + s * B @ A
    np.testing.assert_allclose(layer.forward(x), x @ (m[:, None] * V / np.linalg.norm(V, axis=1)[:, None]).T
                               + layer.bias.data, rtol=1e-12)


def test_injection_through_lora_config_and_coexisting_plain_adapters():
    model = MLP([6, 8, 8, 1], dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 6))
    y0 = model.forward(x)
    lm = get_lora_model(model, LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    layer = lm.model.get_submodule("0")
    assert isinstance(layer, DoraLinear) and layer.lora_magnitude_vector["default"].shape == (8,)
    assert layer.lora_magnitude_vector["default"].trainable
    np.testing.assert_allclose(lm.forward(x), y0, rtol=1e-12)                # at init: the base model
    lm.add_adapter("plain", LoraConfig(r=2, target_modules=r"[02](\.lora_magnitude_vector)?"))  # not a target
    lm.set_adapter("plain")
    assert not layer.lora_magnitude_vector["default"].trainable
    assert "plain" not in layer.lora_magnitude_vector and "plain" in layer.lora_A
    lm.delete_adapter("default")
    assert list(layer.lora_magnitude_vector) == [] and lm.active_adapter == "plain"


def test_a_dora_adapter_added_to_a_plain_lora_layer_converts_it():
    model = MLP([4, 6, 1], dtype="float64", seed=1)
    lm = get_lora_model(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    plain = lm.model.get_submodule("0")
    lm.model.train(False)
    x = np.random.default_rng(1).standard_normal((3, 4))
    y_plain = lm.forward(x)
    lm.add_adapter("d", LoraConfig(r=3, target_modules=["0"], use_dora=True))
    layer = lm.model.get_submodule("0")
    assert type(plain) is LoraLinear and isinstance(layer, DoraLinear) and layer.label == "DoraLinear 'model.0'"
    assert layer.lora_A["default"] is plain.lora_A["default"] and not layer.training
    np.testing.assert_allclose(lm.forward(x), y_plain, rtol=1e-12)           # "default" still active, still plain
    lm.set_adapter("d")
    assert layer.lora_magnitude_vector["d"].trainable and not layer.lora_A["default"].trainable
    set_exact_norm_grad(lm)
    assert layer.exact_norm_grad and "dora=['d']" in repr(layer)
    lm.delete_adapter("default")                                          # a plain one: m of "d" stays
    assert list(layer.lora_magnitude_vector) == ["d"] and list(layer.lora_A) == ["d"]
    assert list(plain.lora_A) == ["default"] and plain.r == {"default": 2}   # the replaced layer: untouched


def test_a_failed_dora_injection_puts_the_plain_layer_back_unchanged():
    lm = get_lora_model(MLP([4, 6, 3], dtype="float64", seed=1), LoraConfig(r=2, target_modules=["0", "2"]))
    plain = lm.model.get_submodule("0")
    lm.model.get_submodule("2").update_layer("d", 1, 1.0)                  # layer "2" can't take a second "d"
    with pytest.raises(ValueError, match="adapter 'd': an adapter of that name already exists"):
        lm.add_adapter("d", LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    assert lm.model.get_submodule("0") is plain and list(plain.lora_A) == ["default"] and plain.r == {"default": 2}


def test_errors_name_the_layer():
    relu_base = ReLU()
    with pytest.raises(TypeError, match="DoRA needs a Dense base layer"):
        DoraLinear(relu_base)
    quantized = LoraLinear(NF4Dense.from_dense(Dense(64, 4, seed=0)), r=2)
    with pytest.raises(TypeError, match="LoraLinear '<root>': DoRA needs a Dense base layer .* got NF4Dense"):
        DoraLinear.from_lora(quantized)
    layer, _ = make((2, 4, 4, 2, 0))
    layer.merge()
    with pytest.raises(ValueError, match="add DoRA adapters to an unmerged layer"):
        layer.update_layer("more", 2, 2.0, use_dora=True)


def test_dora_adapter_files_round_trip(tmp_path):
    """PEFT's key <path>.lora_magnitude_vector is written, read back into a fresh model (and as a
    second adapter next to a plain one, which converts the layers), and gives the same outputs."""
    from safetensors.numpy import load_file

    from lowrank.tuners.lora.model import LoraModel

    def base():
        return MLP([5, 7, 3], dtype="float64", seed=3)

    x = np.random.default_rng(3).standard_normal((6, 5))
    lm = get_lora_model(base(), LoraConfig(r=2, target_modules=["0", "2"], use_dora=True, init_lora_weights=False))
    for _, layer in lm.lora_layers():
        layer.lora_magnitude_vector["default"].data *= 1.3           # as if trained
    lm.eval()
    y = lm.forward(x)
    lm.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert keys["base_model.model.2.lora_magnitude_vector"].shape == (3,)
    loaded = LoraModel.from_pretrained(base(), tmp_path).eval()
    assert isinstance(loaded.model.get_submodule("0"), DoraLinear)
    np.testing.assert_allclose(loaded.forward(x), y, rtol=1e-12)
    plain = get_lora_model(base(), LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)).eval()
    y_plain = plain.forward(x)
    plain.load_adapter(tmp_path, "d")
    names = ["d", "default", BASE, "d", "default", "d"]
    mixed = plain.forward(x, adapter_names=names)
    for name, expected in (("d", y), ("default", y_plain)):
        rows = [i for i, n in enumerate(names) if n == name]
        np.testing.assert_allclose(mixed[rows], expected[rows], rtol=1e-12)


def test_benchmark_runs_and_its_two_norms_agree(tmp_path, monkeypatch):
    from benchmarks import dora as bench

    monkeypatch.setattr(bench, "QUICK_SHAPES", [(40, 24, 3)])
    (row,) = bench.main(["--quick", "--json", str(tmp_path / "dora.json")])
    assert row["shape"] == [40, 24, 3] and row["cheap_max_rel_err_vs_float64"] < 1e-5
    assert row["materialised_peak_bytes"] >= 40 * 24 * 4 > row["cheap_peak_bytes"]     # the (D_out, D_in) temporary
    assert (tmp_path / "dora.json").exists()
