"""Bad input fails loudly: the error names the layer, what it expected and what it got."""
import numpy as np
import pytest

import lowrank as lr

X32 = np.zeros((3, 4), np.float32)


def lora(r=2, **kw):
    return lr.LoraLinear(lr.Dense(4, 3, seed=0), r=r, **kw)


@pytest.mark.parametrize("make", [lambda: lr.Dense(4, 3), lambda: lora()])
def test_wrong_input_width_or_rank(make):
    layer = make()
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name} '<root>' expects input of shape \(N, 4\), got \(3, 5\)"):
        layer(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match=rf"{name} '<root>' expects input of shape \(N, 4\), got \(4,\)"):
        layer(np.zeros(4, np.float32))


def test_errors_name_the_layer_inside_a_model():
    model = lr.MLP([4, 6, 2], seed=0)
    with pytest.raises(ValueError, match=r"Dense '2' expects input of shape \(N, 6\), got \(3, 5\)"):
        model[2](np.zeros((3, 5), np.float32))


@pytest.mark.parametrize("make", [lambda: lr.Dense(4, 3), lambda: lora()])
def test_wrong_input_dtype(make):
    layer = make()
    with pytest.raises(TypeError, match=r"'<root>' expects float32 or float64 input, got int64"):
        layer(np.zeros((3, 4), np.int64))
    with pytest.raises(TypeError, match=r"'<root>' expects float32 input \(its weights' dtype\), got float64"):
        layer(np.zeros((3, 4)))
    with pytest.raises(TypeError, match=r"'<root>' expects an array, got list"):
        layer([[0.0] * 4])


def test_wrong_layer_dtype():
    with pytest.raises(TypeError, match="Dense: dtype must be float32 or float64, got int8"):
        lr.Dense(4, 3, dtype="int8")
    with pytest.raises(TypeError, match="Dense: dtype must be float32 or float64, got float16"):
        lr.MLP([4, 3], dtype="float16")


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_rank_out_of_range(r):
    # r > min(D_in, D_out) = 3 is legal, as in PEFT (it warns): tests/tuners/test_lora_layer.py
    with pytest.raises(ValueError, match=rf"adapter 'default': r must be an integer >= 1, got {r!r}"):
        lora(r=r)


@pytest.mark.parametrize("alpha, rule", [(0, "be > 0"), (-1.0, "be > 0"), (float("nan"), "be a finite number"),
                                         (float("inf"), "be a finite number")])
def test_alpha_must_be_positive_and_finite(alpha, rule):
    with pytest.raises(ValueError, match=rf"lora_alpha must {rule}, got {alpha!r}"):
        lora(lora_alpha=alpha)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_outside_zero_one(p):
    with pytest.raises(ValueError, match=rf"lora_dropout must lie in \[0, 1\), got {p!r}"):
        lora(lora_dropout=p)


def test_a_rejected_lora_config_leaves_the_base_untouched():
    base = lr.Dense(4, 3)
    with pytest.raises(ValueError):
        lr.LoraLinear(base, r=0)
    assert base.weight.trainable and base.bias.trainable


def test_lora_construction_errors():
    with pytest.raises(TypeError, match="LoraLinear: base must be a Dense-like layer .* got ReLU"):
        lr.LoraLinear(lr.ReLU(), r=1)
    with pytest.raises(ValueError, match="init_lora_weights must be True, False, 'gaussian' or 'pissa', got 'olora'"):
        lora(init_lora_weights="olora")
    layer = lora()
    with pytest.raises(ValueError, match="adapter 'default': an adapter of that name already exists"):
        layer.update_layer("default", 1, 1)
    with pytest.raises(ValueError, match="'__base__' is reserved"):
        layer.update_layer("__base__", 1, 1)
    layer.merge()
    with pytest.raises(ValueError, match="PiSSA init needs an unmerged dense base layer"):
        layer.update_layer("p", 1, 1, init_lora_weights="pissa")


def test_adapter_management_errors():
    layer = lora()
    with pytest.raises(ValueError, match=r"no adapter 'x'; it has \['default'\]"):
        layer.set_adapter("x")
    with pytest.raises(ValueError, match=r"no adapter 'x'; it has \['default'\]"):
        layer.delete_adapter("x")
    layer.merge()
    with pytest.raises(ValueError, match="adapter 'default' is merged; unmerge it before deleting"):
        layer.delete_adapter("default")
    layer.unmerge()
    layer.update_layer("b", 1, 1)
    layer.delete_adapter("default")
    assert layer.active_adapter == "b" and list(layer.lora_A) == ["b"] and "default" not in layer.scaling


def test_mixed_batch_errors():
    layer = lora(lora_dropout=0.1)
    with pytest.raises(ValueError, match="adapter_names has 2 entries for 3 rows"):
        layer(X32, adapter_names=["default"] * 2)
    with pytest.raises(ValueError, match=r"unknown adapters \['x'\]; it has \['default'\] \(use '__base__'"):
        layer.eval()(X32, adapter_names=["x", "default", "__base__"])
    with pytest.raises(ValueError, match="mixed-adapter batches do not apply lora_dropout; call eval()"):
        layer.train()(X32, adapter_names=["default"] * 3)
    layer.merge()
    with pytest.raises(ValueError, match=r"mixed-adapter batches need unmerged adapters; merged: \['default'\]"):
        layer.eval()(X32, adapter_names=["default"] * 3)


@pytest.mark.parametrize("loss,target", [(lr.BCEWithLogitsLoss, np.zeros((2, 3))), (lr.MSELoss, np.zeros((2, 3))),
                                         (lr.CrossEntropyLoss, np.zeros(2, np.int64))])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_losses_reject_nan_and_inf(loss, target, bad):
    logits = np.zeros((2, 3))
    logits[1, 2] = bad
    with pytest.raises(ValueError, match=rf"{loss.__name__}: logits must be finite, got 1 NaN/Inf of 6 values"):
        loss()(logits, target)
    if target.dtype.kind == "f":
        target = target.copy()
        target[0, 0] = bad
        with pytest.raises(ValueError, match=rf"{loss.__name__}: target must be finite, got 1 NaN/Inf of 6 values"):
            loss()(np.zeros((2, 3)), target)


def test_loss_input_errors():
    z = np.zeros((2, 3))
    with pytest.raises(TypeError, match="MSELoss: logits must be a float32/float64 array, got int64"):
        lr.MSELoss()(np.zeros((2, 3), np.int64), z)
    with pytest.raises(TypeError, match="MSELoss: target must be an array, got list"):
        lr.MSELoss()(z, [[0.0] * 3] * 2)
    with pytest.raises(ValueError, match="MSELoss: logits are empty"):
        lr.MSELoss()(np.zeros((0, 3)), np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"MSELoss: target shape \(3, 2\) != prediction shape \(2, 3\)"):
        lr.MSELoss()(z, np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"BCEWithLogitsLoss: target shape \(2,\) != logits shape \(2, 3\)"):
        lr.BCEWithLogitsLoss()(z, np.zeros(2))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: logits must be \(N, C\), got shape \(3,\)"):
        lr.CrossEntropyLoss()(np.zeros(3), np.zeros(3, np.int64))
    with pytest.raises(TypeError, match=r"CrossEntropyLoss: target must be an integer array of shape \(2,\), "
                                        r"got float64 \(2,\)"):
        lr.CrossEntropyLoss()(z, np.zeros(2))
    with pytest.raises(ValueError, match=r"CrossEntropyLoss: class targets must lie in \[0, 3\), got \[0, 3\]"):
        lr.CrossEntropyLoss()(z, np.array([0, 3]))


@pytest.mark.parametrize("make", [lambda: lr.Dense(4, 3), lambda: lora(), lr.ReLU, lr.Tanh, lr.Sigmoid, lr.GELU,
                                  lambda: lr.MLP([4, 3, 3])])
def test_backward_before_forward(make):
    module = make()
    dy = np.zeros_like(make()(X32))
    label = "Dense '2'" if isinstance(module, lr.Sequential) else f"{type(module).__name__} '<root>'"
    with pytest.raises(ValueError, match=rf"{label}: backward called before forward"):
        module.backward(dy)
    module(X32)
    module.backward(dy)
    with pytest.raises(ValueError, match=rf"{label}: backward called before forward"):   # a cache is used once
        module.backward(dy)


@pytest.mark.parametrize("loss", [lr.BCEWithLogitsLoss, lr.CrossEntropyLoss, lr.MSELoss])
def test_loss_backward_before_forward(loss):
    with pytest.raises(ValueError, match=rf"{loss.__name__}: backward called before forward"):
        loss().backward()


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="Dense: in_features and out_features must be >= 1, got 0, 3"):
        lr.Dense(0, 3)
    with pytest.raises(ValueError, match=r"MLP: sizes needs at least \[in, out\], got \[4\]"):
        lr.MLP([4])
    with pytest.raises(ValueError, match="MLP: activation must be one of .* got 'swish'"):
        lr.MLP([4, 2], "swish")
    with pytest.raises(ValueError, match="GELU: approximate must be 'none' or 'tanh', got 'erf'"):
        lr.GELU("erf")


def test_optimizer_argument_errors():
    p = lr.Parameter(np.zeros(2))
    with pytest.raises(TypeError, match=r"Adam: unknown settings \['momentum'\]; expected some of"):
        lr.Adam([p], momentum=0.9)
    with pytest.raises(ValueError, match="SGD: lr must be > 0, got 0 in param group 0"):
        lr.SGD([p], lr=0)
    with pytest.raises(ValueError, match="AdamW: lr must be > 0, got -1 in param group 1"):
        lr.AdamW([{"params": [p]}, {"params": [lr.Parameter(np.zeros(1))], "lr": -1}])


def test_backward_checks_dy_against_the_forward_output():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    model = lr.MLP([3, 5, 2], dtype="float64", seed=0)
    model.set_submodule("0", lr.LoraLinear(model[0], r=2))
    for layer, bad in ((model[2], (4, 1)), (model[1], (4, 1)), (model[0], (3, 5))):
        model.forward(x)
        with pytest.raises(ValueError, match=rf"{layer.label}: backward expects dy of shape"):
            layer.backward(np.ones(bad))


def test_a_parameter_in_two_groups_and_bce_targets_out_of_range():
    p = lr.Parameter(np.zeros(3))
    with pytest.raises(ValueError, match="more than one param group"):
        lr.SGD([{"params": [p]}, {"params": [p], "lr": 0.1}], lr=0.01)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\], got values in \[0.0, 2.0\]"):
        lr.BCEWithLogitsLoss().forward(np.zeros((2, 1)), np.array([[0.0], [2.0]]))
