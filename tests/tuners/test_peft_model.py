"""Adapter injection, switching, deletion, disabling and merging (mixed batches: test_mixed_batches.py)."""
import copy

import numpy as np
import pytest

import lowrank as lr
from lowrank.tuners.lora.layer import LoraLinear
from lowrank.tuners.lora.model import ModulesToSave


def mlp(dtype="float64", seed=0):
    return lr.MLP([6, 10, 12, 3], dtype=dtype, seed=seed)      # Dense layers "0", "2", "4"


def randomize_adapter(model, name, seed=1):
    """Give adapter ``name`` non-zero B so that it changes the output."""
    rng = np.random.default_rng(seed)
    for _, layer in model.lora_layers():
        if name in layer.lora_B:
            layer.lora_B[name].data = rng.standard_normal(layer.lora_B[name].shape).astype(layer.lora_B[name].dtype)


@pytest.fixture
def x():
    return np.random.default_rng(5).standard_normal((7, 6))


def test_only_named_layers_are_replaced_and_flags_are_exact():
    model = lr.get_lora_model(mlp(), lr.LoraConfig(r=2, target_modules=["0", "4"]))
    kinds = {n: type(m).__name__ for n, m in model.model.named_children()}
    assert kinds == {"0": "LoraLinear", "1": "ReLU", "2": "Dense", "3": "ReLU", "4": "LoraLinear"}
    trainable = sorted(n for n, p in model.named_parameters() if p.trainable)
    assert trainable == ["model.0.lora_A.default", "model.0.lora_B.default",
                         "model.4.lora_A.default", "model.4.lora_B.default"]


def test_suffix_regex_and_all_linear_matching():
    nested = lr.Sequential(lr.MLP([4, 5, 4]), lr.ReLU(), lr.Dense(4, 2))     # names 0.0, 0.2, 2
    by_suffix = lr.get_lora_model(copy.deepcopy(nested), lr.LoraConfig(r=1, target_modules=["2"]))
    # PEFT's rule: "2" matches "2" and the suffix of "0.2"
    assert sorted(n for n, _ in by_suffix.lora_layers()) == ["0.2", "2"]
    by_regex = lr.get_lora_model(copy.deepcopy(nested), lr.LoraConfig(r=1, target_modules=r"0\.[02]"))
    assert sorted(n for n, _ in by_regex.lora_layers()) == ["0.0", "0.2"]
    everything = lr.get_lora_model(copy.deepcopy(nested), lr.LoraConfig(r=1, target_modules="all-linear"))
    assert sorted(n for n, _ in everything.lora_layers()) == ["0.0", "0.2", "2"]


def test_unknown_target_lists_the_layers():
    with pytest.raises(ValueError, match=r"\['7'\] match no layer.*'0 \(Dense\)'.*'1 \(ReLU\)'"):
        lr.get_lora_model(mlp(), lr.LoraConfig(target_modules=["7"]))
    with pytest.raises(TypeError, match="not Dense"):
        lr.get_lora_model(mlp(), lr.LoraConfig(target_modules=["1"]))
    with pytest.raises(ValueError, match="target_modules is None"):
        lr.get_lora_model(mlp(), lr.LoraConfig())


@pytest.mark.parametrize("bias, expected", [
    ("none", []),
    ("all", ["model.0.base_layer.bias", "model.2.bias", "model.4.bias"]),
    ("lora_only", ["model.0.base_layer.bias"]),
])
def test_bias_modes(bias, expected):
    model = lr.get_lora_model(mlp(), lr.LoraConfig(r=2, target_modules=["0"], bias=bias))
    biases = sorted(n for n, p in model.named_parameters() if p.trainable and n.endswith("bias"))
    assert biases == expected


def test_modules_to_save_trains_a_copy_and_keeps_the_original(x):
    model = lr.get_lora_model(mlp(), lr.LoraConfig(r=2, target_modules=["0"], modules_to_save=["4"]))
    wrapper = model.model.get_submodule("4")
    assert isinstance(wrapper, ModulesToSave)
    trainable = sorted(n for n, p in model.named_parameters() if p.trainable and n.startswith("model.4"))
    assert trainable == ["model.4.modules_to_save.default.bias", "model.4.modules_to_save.default.weight"]
    before = wrapper.original_module.weight.data.copy()
    opt = lr.SGD(model.parameters(), lr=0.1)
    loss = lr.MSELoss()
    model.forward(x)
    loss.forward(model.forward(x), np.zeros((7, 3)))
    model.backward(loss.backward())
    opt.step()
    assert np.array_equal(wrapper.original_module.weight.data, before)
    assert not np.array_equal(wrapper.modules_to_save["default"].weight.data, before)


def test_rank_and_alpha_patterns():
    config = lr.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", rank_pattern={"2": 5},
                           alpha_pattern={"4": 3})
    model = lr.get_lora_model(mlp(), config)
    layers = dict(model.lora_layers())
    assert [layers[n].r["default"] for n in ("0", "2", "4")] == [2, 5, 2]
    assert [layers[n].scaling["default"] for n in ("0", "2", "4")] == [4 / 2, 4 / 5, 3 / 2]


def test_switching_deleting_and_disabling(x):
    base = mlp()
    y_base = base.forward(x)
    model = lr.get_lora_model(base, lr.LoraConfig(r=2, target_modules="all-linear"), adapter_name="a")
    model.add_adapter("b", lr.LoraConfig(r=3, target_modules=["2"]))
    randomize_adapter(model, "a", 1)
    randomize_adapter(model, "b", 2)
    y_a = model.forward(x)
    model.set_adapter("b")
    y_b = model.forward(x)
    assert not np.allclose(y_a, y_b) and not np.allclose(y_b, y_base)
    # only the active adapter is trainable, as in PEFT
    assert sorted(n for n, p in model.named_parameters() if p.trainable) == [
        "model.2.lora_A.b", "model.2.lora_B.b"]
    with model.disable_adapter():
        assert np.array_equal(model.forward(x), y_base)
    assert np.array_equal(model.forward(x), y_b)
    model.delete_adapter("b")
    assert model.active_adapter == "a" and "b" not in model.peft_config
    assert all("b" not in layer.lora_A for _, layer in model.lora_layers())
    assert np.allclose(model.forward(x), y_a, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="no adapter 'b'"):
        model.set_adapter("b")


def test_merge_and_unload_keeps_outputs_and_removes_lora(x):
    model = lr.get_lora_model(mlp("float32"), lr.LoraConfig(r=2, target_modules="all-linear"))
    randomize_adapter(model, "default")
    x32 = x.astype(np.float32)
    y = model.forward(x32)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for _, m in merged.named_modules())
    assert [n for n, _ in merged.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias",
                                                          "4.weight", "4.bias"]
    np.testing.assert_allclose(merged.forward(x32), y, rtol=1e-5, atol=1e-5)


def test_print_trainable_parameters_uses_peft_format(capsys):
    model = lr.get_lora_model(mlp(), lr.LoraConfig(r=2, target_modules=["0", "2"]))
    model.print_trainable_parameters()
    trainable = 2 * (6 + 10) + 2 * (10 + 12)                       # r·(D_in + D_out) per layer
    total = (6 * 10 + 10) + (10 * 12 + 12) + (12 * 3 + 3) + trainable
    assert capsys.readouterr().out == (f"trainable params: {trainable:,} || all params: {total:,} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")


def test_pissa_init_keeps_the_output_and_splits_the_weight(x):
    base = mlp()
    y = base.forward(x)
    W = base.get_submodule("2").weight.data.copy()
    model = lr.get_lora_model(base, lr.LoraConfig(r=3, lora_alpha=6, target_modules=["2"],
                                                  init_lora_weights="pissa"))
    layer = dict(model.lora_layers())["2"]
    np.testing.assert_allclose(model.forward(x), y, rtol=1e-10, atol=1e-12)
    s = np.linalg.svd(W, compute_uv=False)
    # the adapter holds the top-3 singular directions: s·B·A has W's top singular values
    np.testing.assert_allclose(np.linalg.svd(layer.delta_weight("default"), compute_uv=False)[:3], s[:3],
                               rtol=1e-10)
    np.testing.assert_allclose(np.linalg.svd(layer.weight.data, compute_uv=False)[:len(s) - 3], s[3:],
                               rtol=1e-8, atol=1e-12)


def test_a_rejected_adapter_changes_nothing(x):
    model = lr.get_lora_model(mlp(), lr.LoraConfig(r=2, target_modules=["0", "4"]))
    randomize_adapter(model, "default")
    model.model[4].update_layer("big", 1, 1.0)                 # layer "4" already holds a "big"
    names_before = [n for n, _ in model.named_parameters()]
    y = model.forward(x)
    # layers "0" and "2" take adapter "big", "4" does not: rejected at the last layer
    with pytest.raises(ValueError, match=r"LoraLinear 'model.4' adapter 'big': an adapter of that name already exists"):
        model.add_adapter("big", lr.LoraConfig(r=5, target_modules="all-linear"))
    assert [n for n, _ in model.named_parameters()] == names_before and "big" not in model.peft_config
    assert np.array_equal(model.forward(x), y)


def test_a_layer_cannot_be_both_adapted_and_saved():
    with pytest.raises(ValueError, match=r"\['4'\] are both in target_modules and modules_to_save"):
        lr.get_lora_model(mlp(), lr.LoraConfig(target_modules=["0", "4"], modules_to_save=["4"]))
    # "all-linear" leaves the saved head out, as PEFT leaves out the output layer
    model = lr.get_lora_model(mlp(), lr.LoraConfig(r=1, target_modules="all-linear", modules_to_save=["4"]))
    assert sorted(n for n, _ in model.lora_layers()) == ["0", "2"]
