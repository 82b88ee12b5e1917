"""A real behavioural test: a few optimizer steps on a LoRA MLP lower the loss, and only
the adapters move."""
import numpy as np
import pytest

import lowrank as lr


def lora_mlp(sizes, r, seed=0):
    model = lr.MLP(sizes, "tanh", seed=seed)
    for i in range(0, len(model), 2):
        model.set_submodule(str(i), lr.LoraLinear(model[i], r=r, lora_alpha=2 * r, seed=seed + i))
    return model


def teacher_data(N=64, seed=0):
    """x, and the targets of the base model with one rank-1 change per layer: LoRA can fit it."""
    rng = np.random.default_rng(seed)
    teacher = lr.MLP([8, 16, 4], "tanh", seed=0)
    for i in (0, 2):
        W = teacher[i].weight
        u, v = rng.standard_normal(W.shape[0]), rng.standard_normal(W.shape[1]) / np.sqrt(W.shape[1])
        W.data = W.data + (0.5 * np.outer(u, v)).astype(np.float32)
    x = rng.standard_normal((N, 8)).astype(np.float32)
    return x, teacher(x)


def train(model, opt, loss, x, target, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(loss(model(x), target))
        model.backward(loss.backward())
        opt.step()
    return losses


@pytest.mark.parametrize("opt_cls,settings", [(lr.Adam, {"lr": 0.02}), (lr.AdamW, {"lr": 0.02}),
                                              (lr.SGD, {"lr": 0.2, "momentum": 0.9})])
def test_lora_mlp_regression_loss_goes_down(opt_cls, settings):
    model = lora_mlp([8, 16, 4], r=2)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.trainable}
    x, target = teacher_data()
    losses = train(model, opt_cls(model.parameters(), **settings), lr.MSELoss(), x, target, steps=60)
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    for name, p in model.named_parameters():
        if not p.trainable:
            np.testing.assert_array_equal(p.data, frozen[name], err_msg=name)


def test_lora_mlp_classification_with_lora_plus_groups():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 2)).astype(np.float32)
    labels = (x[:, 0] * x[:, 1] > 0).astype(np.int64)           # XOR-like quadrants
    model = lora_mlp([2, 16, 16, 2], r=2, seed=3)
    named = dict(model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if "lora_A" in n]},
              {"params": [p for n, p in named.items() if "lora_B" in n], "lr": 16 * 0.01}]   # LoRA+
    losses = train(model, lr.Adam(groups, lr=0.01), lr.CrossEntropyLoss(), x, labels, steps=80)
    assert losses[-1] < 0.6 * losses[0], losses[::10]
    accuracy = (model.eval()(x).argmax(axis=1) == labels).mean()
    assert accuracy > 0.8
