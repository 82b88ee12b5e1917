"""Optimizers: updates against hand-written float64 formulas, per-group settings, and no
state (counted in bytes) for frozen parameters."""
import numpy as np
import pytest

import lowrank as lr

LR, B1, B2, EPS = 0.05, 0.9, 0.999, 1e-8


def grads(seed, steps=3, shape=(4, 3)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) for _ in range(steps)]


def run(opt_cls, theta0, gs, **settings):
    """θ after len(gs) steps of ``opt_cls`` on a float64 Parameter fed the gradients ``gs``."""
    p = lr.Parameter(theta0.copy())
    opt = opt_cls([p], **settings)
    for g in gs:
        p.grad = g.copy()
        opt.step()
    return p.data


def adam_reference(theta, gs, lr_, wd=0.0, decoupled=False):
    m, v = np.zeros_like(theta), np.zeros_like(theta)
    for t, g in enumerate(gs, start=1):
        if wd and not decoupled:
            g = g + wd * theta                                 # Adam: L2 term in the gradient
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
        decay = lr_ * wd * theta if decoupled else 0.0          # AdamW: decoupled decay
        theta = theta - decay - lr_ * m_hat / (np.sqrt(v_hat) + EPS)
    return theta


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_the_formula(wd):
    theta0, gs = np.random.default_rng(0).standard_normal((4, 3)), grads(1)
    np.testing.assert_allclose(run(lr.Adam, theta0, gs, lr=LR, weight_decay=wd),
                               adam_reference(theta0, gs, LR, wd), rtol=1e-12)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_matches_the_formula_with_decoupled_decay(wd):
    theta0, gs = np.random.default_rng(0).standard_normal((4, 3)), grads(1)
    np.testing.assert_allclose(run(lr.AdamW, theta0, gs, lr=LR, weight_decay=wd),
                               adam_reference(theta0, gs, LR, wd, decoupled=True), rtol=1e-12)


def test_l2_and_decoupled_weight_decay_differ():
    theta0, gs = np.random.default_rng(0).standard_normal((4, 3)), grads(1)
    assert not np.allclose(run(lr.Adam, theta0, gs, lr=LR, weight_decay=0.1),
                           run(lr.AdamW, theta0, gs, lr=LR, weight_decay=0.1))
    assert lr.AdamW.defaults["weight_decay"] == 1e-2 and lr.Adam.defaults["weight_decay"] == 0.0


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.01)])
def test_sgd_matches_the_formula(momentum, wd):
    theta0, gs = np.random.default_rng(0).standard_normal((4, 3)), grads(2)
    theta, v = theta0.copy(), None
    for g in gs:
        d = g + wd * theta
        v = d if v is None else momentum * v + d
        theta = theta - LR * v
    np.testing.assert_allclose(run(lr.SGD, theta0, gs, lr=LR, momentum=momentum, weight_decay=wd), theta, rtol=1e-12)


def test_param_groups_take_their_own_lr():
    A, B = lr.Parameter(np.ones(3)), lr.Parameter(np.ones(2))
    opt = lr.SGD([{"params": [A]}, {"params": [B], "lr": 1.6}], lr=0.1)    # LoRA+: B learns faster
    A.grad, B.grad = np.full(3, 2.0), np.full(2, 2.0)
    opt.step()
    np.testing.assert_allclose(A.data, 1 - 0.1 * 2)
    np.testing.assert_allclose(B.data, 1 - 1.6 * 2)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 1.6]


def lora_mlp_step(opt_cls, **settings):
    """One training step of a LoRA MLP (all Dense layers adapted); returns (model, optimizer)."""
    model = lr.MLP([6, 8, 8, 3], seed=0)
    for i in (0, 2, 4):
        model.set_submodule(str(i), lr.LoraLinear(model[i], r=2, lora_alpha=4, seed=i))
    opt = opt_cls(model.parameters(), **settings)
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    loss = lr.MSELoss()
    loss(model(x), np.zeros((5, 3), np.float32))
    model.backward(loss.backward())
    opt.step()
    return model, opt


@pytest.mark.parametrize("opt_cls,settings,buffers", [
    (lr.Adam, {}, 2), (lr.AdamW, {}, 2), (lr.SGD, {"momentum": 0.9}, 1), (lr.SGD, {}, 0)])
def test_optimizer_state_is_exactly_the_trainable_parameters(opt_cls, settings, buffers):
    model, opt = lora_mlp_step(opt_cls, **settings)
    trainable = [p for p in model.parameters() if p.trainable]
    frozen = [p for p in model.parameters() if not p.trainable]
    assert len(trainable) == 6 and len(frozen) == 6            # lora_A, lora_B per layer; base weight, bias
    assert all(p.grad is None for p in frozen)
    assert opt.state_nbytes() == buffers * sum(p.data.nbytes for p in trainable)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in trainable}


def test_frozen_parameters_do_not_move():
    model, _ = lora_mlp_step(lr.Adam, lr=0.1)
    reference = lr.MLP([6, 8, 8, 3], seed=0)
    for i in (0, 2, 4):
        np.testing.assert_array_equal(model[i].weight.data, reference[i].weight.data)


def test_step_skips_parameters_without_grad_and_zero_grad_clears():
    a, b = lr.Parameter(np.ones(2)), lr.Parameter(np.ones(2))
    opt = lr.Adam([a, b], lr=0.1)
    a.grad = np.ones(2)
    opt.step()
    np.testing.assert_array_equal(b.data, np.ones(2))
    assert opt.state_nbytes() == 2 * a.data.nbytes
    opt.zero_grad()
    assert a.grad is None


def test_float32_parameters_stay_float32():
    model, _ = lora_mlp_step(lr.Adam)
    assert all(p.data.dtype == np.float32 for p in model.parameters())
