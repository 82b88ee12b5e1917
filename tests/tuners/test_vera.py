"""VeRA: gradients against finite differences, the forward against its formula, the shared
projections, the closed-form parameter count, and training on the demo task."""
import copy

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank.app.experiment import DemoConfig, dense_names, downstream, finetune, pretrain, test_accuracy
from lowrank.nn.gradcheck import check_module
from lowrank.nn.layers import MLP, Dense
from lowrank.nn.module import Parameter
from lowrank.tuners.vera import VeraConfig, VeraLinear, get_vera_model, vera_parameter_count

sizes = st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(1, 6))


@given(sizes, st.integers(0, 99), st.booleans(), st.booleans())
def test_gradients_match_finite_differences(size, seed, trainable_base, bias):
    N, d0, d1, d2, r = size
    vm = get_vera_model(MLP([d0, d1, d2], "tanh", bias=bias, dtype="float64", seed=seed),      # tanh: no kinks
                        VeraConfig(r=r, target_modules=["0", "2"], init_weights=False, projection_prng_key=seed))
    vm.model.get_submodule("2.base_layer").requires_grad_(trainable_base)     # dW, db when trainable
    check_module(vm, np.random.default_rng(seed).standard_normal((N, d0)))


@given(sizes, st.integers(0, 99))
def test_forward_is_the_formula_on_slices_of_one_shared_pair(size, seed):
    N, d0, d1, d2, r = size
    vm = get_vera_model(MLP([d0, d1, d2], dtype="float64", seed=seed),
                        VeraConfig(r=r, target_modules=["0", "2"], init_weights=False, projection_prng_key=seed))
    A, B = vm.vera_A.data, vm.vera_B.data
    assert A.shape == (r, max(d0, d1)) and B.shape == (max(d1, d2), r) and not vm.vera_A.trainable
    x = np.random.default_rng(seed).standard_normal((N, d0))
    layer = vm.model.get_submodule("0")
    W, b = layer.weight.data, layer.bias.data
    lam_d, lam_b = layer.vera_lambda_d.data, layer.vera_lambda_b.data
    expected = x @ W.T + b + lam_b * ((lam_d * (x @ A[:, :d0].T)) @ B[:d1].T)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-12, atol=1e-12)


def test_dropout_path_matches_finite_differences_for_a_fixed_seed():
    rng = np.random.default_rng(0)
    A, B = (Parameter(rng.standard_normal(s), trainable=False) for s in ((3, 6), (5, 3)))
    layer = VeraLinear(Dense(6, 5, dtype="float64", seed=0), A, B, vera_dropout=0.5, init_weights=False, seed=1)
    x = rng.standard_normal((4, 6))
    draw = layer._rng.bit_generator.state
    forward = layer.forward

    def same_mask_forward(x_):
        layer._rng.bit_generator.state = draw          # the same dropout mask on every forward
        return forward(x_)

    layer.forward = same_mask_forward
    check_module(layer, x)
    assert not np.allclose(layer.forward(x), VeraLinear.forward(layer.eval(), x))     # the mask did act


def test_init_starts_at_the_base_model():
    model = MLP([3, 4, 2], dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 3))
    y0 = model.forward(x)
    vm = get_vera_model(model, VeraConfig(r=8, target_modules=["0", "2"]))
    np.testing.assert_allclose(vm.forward(x), y0, rtol=1e-12)
    assert np.all(vm.model.get_submodule("0").vera_lambda_d.data == 0.1)


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match=r"match no Dense layer; this model's Dense layers: \['0', '2'\]"):
        get_vera_model(MLP([3, 4, 2], seed=0), VeraConfig(r=2, target_modules=["9"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no layer"):
        get_vera_model(MLP([3, 4, 2], seed=0), VeraConfig(r=2, target_modules=["0"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"must be at least \(2, 3\) and \(4, 2\)"):
        VeraLinear(Dense(3, 4), Parameter(np.zeros((2, 2))), Parameter(np.zeros((4, 2))))
    with pytest.raises(TypeError, match="base must be a Dense layer"):
        VeraLinear(MLP([3, 4]), Parameter(np.zeros((2, 3))), Parameter(np.zeros((4, 2))))
    with pytest.raises(ValueError, match="r must be a positive integer, got 0"):
        VeraConfig(r=0)
    with pytest.raises(ValueError, match=r"vera_dropout must lie in \[0, 1\), got 1"):
        VeraConfig(vera_dropout=1)


def test_trains_on_the_demo_task_with_its_closed_form_parameter_count():
    """DemoConfig.quick(): VeRA r = 256 on the hidden layers plus the head reaches ≥ 0.85 test
    accuracy (the pretrained model and head-only tuning score ≈ 0.55 on the rotated task)."""
    cfg = DemoConfig.quick()
    pretrained, ds, _ = pretrain(cfg)
    ds_down = downstream(cfg, ds)
    model = copy.deepcopy(pretrained)
    names = dense_names(model)
    vm = get_vera_model(model, VeraConfig(r=256, target_modules=names[:-1], modules_to_save=[names[-1]]))
    shapes = [tuple(pretrained.get_submodule(n).weight.shape) for n in names]
    head = shapes[-1][0] * shapes[-1][1] + shapes[-1][0]
    assert vm.num_parameters(trainable_only=True) == vera_parameter_count(shapes[:-1], 256) + head
    assert vera_parameter_count(shapes[:-1], 256) == 3 * 256 + sum(cfg.hidden)
    finetune(vm, ds_down, cfg, lr=10 * cfg.peft_lr)
    assert test_accuracy(pretrained, ds_down) < 0.7
    assert test_accuracy(vm, ds_down) >= 0.85


def test_variant_rows_for_the_demo_table():
    """DoRA, LoRA+ and VeRA rows on DemoConfig.quick(), with closed-form trainable counts."""
    from lowrank.training.accounting import lora_parameter_count
    from lowrank.app.variants import VERA_R, variant_rows

    cfg = DemoConfig.quick()
    pretrained, ds, _ = pretrain(cfg)
    rows = list(variant_rows(cfg, pretrained, downstream(cfg, ds)))
    shapes = [tuple(m.weight.shape) for _, m in pretrained.named_modules() if isinstance(m, Dense)]
    head = shapes[-1][0] * shapes[-1][1] + shapes[-1][0]
    lora = lora_parameter_count(shapes[:-1], cfg.r) + head
    expected = {f"dora r={cfg.r}": lora + sum(cfg.hidden), f"lora+ r={cfg.r}": lora,
                f"vera r={VERA_R}": vera_parameter_count(shapes[:-1], VERA_R) + head}
    assert {r["method"]: r["trainable_params"] for r in rows} == expected
    for r in rows:
        assert r["stored_bytes"] == 4 * r["trainable_params"] and r["seconds_per_epoch"] > 0
        assert r["test_acc"] >= 0.8, r
