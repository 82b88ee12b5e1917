"""The module protocol: parameters and their dotted names, modes, gradients, state dicts."""
import numpy as np
import pytest

import lowrank as lr

# torch.nn.Sequential(Linear(3, 5), ReLU(), Linear(5, 4), ReLU(), Linear(4, 2)).named_parameters(),
# written out from the PyTorch convention: children "0", "1", ...; Linear.weight is (out, in).
TORCH_MLP_PARAMETERS = [("0.weight", (5, 3)), ("0.bias", (5,)), ("2.weight", (4, 5)), ("2.bias", (4,)),
                        ("4.weight", (2, 4)), ("4.bias", (2,))]
TORCH_MLP_MODULES = [("", "Sequential"), ("0", "Linear"), ("1", "ReLU"), ("2", "Linear"), ("3", "ReLU"),
                     ("4", "Linear")]


def test_mlp_names_and_shapes_are_torch_sequentials():
    model = lr.MLP([3, 5, 4, 2], seed=0)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == TORCH_MLP_PARAMETERS
    ours = [(n, type(m).__name__.replace("Dense", "Linear")) for n, m in model.named_modules()]
    assert ours == TORCH_MLP_MODULES
    assert list(model.state_dict()) == [n for n, _ in TORCH_MLP_PARAMETERS]


def test_parameter_starts_without_grad_and_accumulates():
    p = lr.Parameter(np.zeros((2, 3), np.float32))
    assert p.grad is None and p.trainable and p.shape == (2, 3) and p.dtype == np.float32 and p.size == 6
    p.accumulate(np.ones((2, 3)))
    p.accumulate(np.ones((2, 3)))
    np.testing.assert_array_equal(p.grad, np.full((2, 3), 2.0))
    frozen = lr.Parameter(np.zeros(2), trainable=False)
    frozen.accumulate(np.ones(2))
    assert frozen.grad is None
    assert "frozen" in repr(frozen) and "trainable" in repr(p)


def test_lora_inside_a_model_has_dotted_names_and_labels():
    model = lr.MLP([4, 6, 2], seed=0)
    model.set_submodule("0", lr.LoraLinear(model[0], r=2))
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.base_layer.weight", "0.base_layer.bias", "0.lora_A.default", "0.lora_B.default",
                     "2.weight", "2.bias"]
    assert [n for n, _ in model.named_modules()] == ["", "0", "0.base_layer", "0.lora_A", "0.lora_B", "1", "2"]
    assert model.get_submodule("0.base_layer").label == "Dense '0.base_layer'"
    assert model.num_parameters() == 6 * 4 + 6 + 2 * 4 + 6 * 2 + 2 * 6 + 2
    assert model.num_parameters(trainable_only=True) == 2 * 4 + 6 * 2 + 2 * 6 + 2
    with pytest.raises(KeyError, match="has no submodule '0.nope'"):
        model.get_submodule("0.nope")


def test_train_and_eval_reach_every_module():
    model = lr.MLP([4, 6, 6, 2], seed=0)
    model.set_submodule("2", lr.LoraLinear(model[2], r=2, lora_dropout=0.1))
    assert model.eval() is model
    assert not any(m.training for _, m in model.named_modules())
    model.train()
    assert all(m.training for _, m in model.named_modules())


def test_zero_grad_clears_every_gradient():
    model = lr.MLP([3, 4, 2], dtype="float64", seed=0)
    model(np.ones((2, 3)))
    model.backward(np.ones((2, 2)))
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_round_trip_copies_the_arrays():
    source, target = lr.MLP([3, 4, 2], seed=0), lr.MLP([3, 4, 2], seed=1)
    state = {k: v.copy() for k, v in source.state_dict().items()}
    assert target.load_state_dict(state) is target
    for (name, a), b in zip(target.state_dict().items(), source.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    state["0.weight"][:] = 7                                   # loading copied, not aliased
    assert not (target[0].weight.data == 7).any()


def _snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("edit,error,message", [
    (lambda s: s.pop("2.bias"), KeyError, r"missing keys \['2.bias'\], unexpected keys \[\]"),
    (lambda s: s.update(extra=np.zeros(1, np.float32)), KeyError, r"missing keys \[\], unexpected keys \['extra'\]"),
    (lambda s: s.update({"2.bias": np.zeros(3, np.float32)}), ValueError,
     r"'2.bias' has shape \(3,\), expected \(2,\)"),
    (lambda s: s.update({"2.bias": np.zeros(2)}), TypeError, r"'2.bias' has dtype float64, expected float32"),
])
def test_a_failing_load_raises_and_changes_nothing(edit, error, message):
    model = lr.MLP([3, 4, 2], seed=0)
    before = _snapshot(model)
    state = {k: v + 1 for k, v in lr.MLP([3, 4, 2], seed=1).state_dict().items()}   # every other key is valid
    edit(state)
    with pytest.raises(error, match=message):
        model.load_state_dict(state)
    for name, array in model.state_dict().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)


def test_non_strict_load_ignores_missing_and_unexpected_keys():
    model = lr.MLP([3, 4, 2], seed=0)
    new_bias = np.arange(2, dtype=np.float32)
    model.load_state_dict({"2.bias": new_bias, "extra": np.zeros(1)}, strict=False)
    np.testing.assert_array_equal(model[2].bias.data, new_bias)


def test_requires_grad_and_to_cpu():
    model = lr.MLP([3, 4, 2], seed=0)
    model(np.ones((1, 3), np.float32))
    model.backward(np.ones((1, 2), np.float32))
    weight = model[0].weight.data
    assert model.to("cpu") is model and model[0].weight.data is weight
    assert model[0].weight.grad is None and model[0]._cache is None          # .to drops grads and caches
    model.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) == 0


def test_parameter_dict_and_attribute_registration():
    pd = lr.ParameterDict()
    pd["a"] = lr.Parameter(np.zeros((2, 3)))
    assert "a" in pd and len(pd) == 1 and list(pd) == ["a"] and list(pd.keys()) == ["a"]
    assert "a: (2, 3)" in repr(pd)
    del pd["a"]
    assert len(pd) == 0
    layer = lr.Dense(2, 2)
    del layer.bias                                             # deleting unregisters
    assert [n for n, _ in layer.named_parameters()] == ["weight"]


def test_a_module_must_call_super_init():
    class Broken(lr.Module):
        def __init__(self):
            self.w = lr.Parameter(np.zeros(1))

    with pytest.raises(RuntimeError, match=r"Broken.__init__ must call super\(\).__init__\(\) first"):
        Broken()


def test_repr_lists_children():
    text = repr(lr.MLP([3, 4, 2], seed=0))
    assert "(0): Dense(in_features=3, out_features=4, bias=True)" in text and "(1): ReLU()" in text
