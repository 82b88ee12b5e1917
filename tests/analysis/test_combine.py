"""add_weighted_adapter: "cat" reproduces Σ w_i·(adapter i's output change) exactly; "svd" is
the best rank-k approximation of the exact sum, its error the truncated tail; "linear" is refused."""
import copy

import numpy as np
import pytest

import lowrank as lr
from lowrank.analysis.combine import add_weighted_adapter


def two_adapters(seed=0, save_head=(False, False), sizes=(6, 7, 5, 3)):
    """A float64 MLP with adapter "a" (r=2, s=2) on layers 0, 2 and "b" (r=3, rsLoRA) on layer 0,
    both with random B so that each one changes the output."""
    base = lr.MLP(list(sizes), "tanh", dtype="float64", seed=seed)
    head = [str(2 * (len(sizes) - 2))]
    model = lr.get_lora_model(copy.deepcopy(base), lr.LoraConfig(
        r=2, lora_alpha=4, target_modules=["0", "2"], modules_to_save=head if save_head[0] else None), "a")
    model.add_adapter("b", lr.LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["0"],
                                         modules_to_save=head if save_head[1] else None))
    rng = np.random.default_rng(seed + 1)
    for _, layer in model.lora_layers():
        for name in layer.lora_B:
            layer.lora_B[name].data = rng.standard_normal(layer.lora_B[name].shape)
    return base, model


def exact_sum(layer, pairs):
    """Σ w s B A from the definition."""
    return sum(w * layer.scaling[a] * layer.lora_B[a].data @ layer.lora_A[a].data for a, w in pairs)


def layer_output(layer, adapter, x):
    layer.set_adapter(adapter)
    return layer.forward(x)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, -1.3), (0.0, 2.5)])
def test_cat_is_the_exact_weighted_sum_of_outputs(weights, rng):
    base, model = two_adapters()
    errors = add_weighted_adapter(model, ["a", "b"], weights, "ab", combination_type="cat")
    x = rng.standard_normal((4, 6))
    layer0, layer2 = dict(model.lora_layers())["0"], dict(model.lora_layers())["2"]
    y0 = layer_output(layer0, None, x)
    want = y0 + sum(w * (layer_output(layer0, a, x) - y0) for a, w in zip("ab", weights))
    np.testing.assert_allclose(layer_output(layer0, "ab", x), want, rtol=1e-12, atol=1e-12)
    assert layer0.r["ab"] == 5 and layer2.r["ab"] == 2 and layer0.scaling["ab"] == 1.0
    assert all(e["frobenius_error"] < 1e-12 for e in errors.values())
    model.set_adapter("ab")                              # the whole model: the base with W + Σ w s B A
    dense = copy.deepcopy(base)
    for name, layer in model.lora_layers():
        pairs = [(a, w) for a, w in zip("ab", weights) if a in layer.lora_A and a != "ab"]
        dense.get_submodule(name).weight.data = dense.get_submodule(name).weight.data + exact_sum(layer, pairs)
    z = rng.standard_normal((5, 6))
    np.testing.assert_allclose(model(z), dense(z), rtol=1e-12, atol=1e-12)
    assert model.peft_config["ab"].rank_for("0") == 5 and model.peft_config["ab"].rank_for("2") == 2


@pytest.mark.parametrize("k", [1, 2, 4])
def test_svd_error_is_the_truncated_tail(k):
    _, model = two_adapters(seed=k)
    weights = (0.5, -2.0)
    layer0 = dict(model.lora_layers())["0"]
    target = exact_sum(layer0, list(zip("ab", weights)))
    errors = add_weighted_adapter(model, ["a", "b"], weights, "svd", svd_rank=k)
    s = np.linalg.svd(target, compute_uv=False)
    got = layer0.delta_weight("svd")
    assert layer0.r["svd"] == k
    np.testing.assert_allclose(np.linalg.norm(target - got, 2), s[k], atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(target - got), np.sqrt((s[k:] ** 2).sum()), atol=1e-10)
    assert errors["0"]["spectral_error"] == pytest.approx(s[k], abs=1e-10)
    assert errors["0"]["frobenius_error"] == pytest.approx(np.sqrt((s[k:] ** 2).sum()), abs=1e-10)
    assert errors["0"]["relative_error"] == pytest.approx(np.sqrt((s[k:] ** 2).sum()) / np.linalg.norm(target))


def test_svd_default_rank_is_the_largest_and_exact_when_it_suffices():
    _, model = two_adapters()
    errors = add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "svd")
    layers = dict(model.lora_layers())
    assert layers["0"].r["svd"] == 3 and layers["2"].r["svd"] == 2
    assert errors["2"]["frobenius_error"] < 1e-12                       # only "a" (rank 2) lives there
    np.testing.assert_allclose(layers["2"].delta_weight("svd"), layers["2"].delta_weight("a"), atol=1e-12)


def test_one_trained_head_is_copied_two_are_refused():
    _, model = two_adapters(save_head=(True, False))
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", "cat")
    wrapper = model._wrappers()[0]
    copy_ab, copy_a = wrapper.modules_to_save["ab"], wrapper.modules_to_save["a"]
    assert copy_ab is not copy_a
    np.testing.assert_array_equal(copy_ab.weight.data, copy_a.weight.data)
    _, model = two_adapters(save_head=(True, True))
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] each train their own copy"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", "cat")


@pytest.mark.parametrize("args,match", [
    ((["a", "b"], [1.0, 1.0], "ab", "linear"), "cross terms"),
    ((["a", "b"], [1.0], "ab", "cat"), "one weight per adapter"),
    (([], [], "ab", "cat"), "one weight per adapter"),
    ((["a", "c"], [1.0, 1.0], "ab", "cat"), r"no adapter \['c'\]"),
    ((["a"], [1.0], "b", "svd"), "'b' already exists"),
])
def test_bad_requests_are_refused_and_change_nothing(args, match):
    _, model = two_adapters()
    with pytest.raises(ValueError, match=match):
        add_weighted_adapter(model, *args)
    assert list(model.peft_config) == ["a", "b"]


def test_cat_beyond_the_layer_rank_is_refused_before_any_change():
    _, model = two_adapters(sizes=(6, 4, 3))                  # layer 0 allows r <= 4, "cat" needs 5
    with pytest.raises(ValueError, match="'cat' on LoraLinear 'model.0' needs rank 5"):
        add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", "cat")
    assert all("ab" not in layer.lora_A for _, layer in model.lora_layers())
