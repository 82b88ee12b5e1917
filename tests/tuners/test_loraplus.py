"""LoRA+: which parameter lands in which group, with which learning rate and weight decay,
and that one SGD step moves lora_B λ times as far as the same gradient moves lora_A."""
import numpy as np
import pytest

from lowrank.nn.layers import MLP
from lowrank.tuners.lora.config import LoraConfig
from lowrank.tuners.lora.loraplus import create_loraplus_optimizer
from lowrank.nn.module import Module, Parameter
from lowrank.nn.optim import SGD, AdamW
from lowrank.tuners.lora.model import get_lora_model

LR = 1e-3


def model_with(use_dora=False):
    """LoRA (or DoRA) on layers 0 and 2 of a 3-layer MLP, the head as a module to save."""
    return get_lora_model(MLP([4, 6, 6, 1], dtype="float64", seed=0),
                          LoraConfig(r=2, target_modules=["0", "2"], modules_to_save=["4"], use_dora=use_dora))


def group_of(opt):
    """parameter id -> (lr, weight_decay) of its group."""
    return {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("ratio", [16, 2.5])
def test_groups_follow_peft(ratio):
    model = model_with(use_dora=True)
    opt = create_loraplus_optimizer(model, AdamW, lr=LR, loraplus_lr_ratio=ratio, loraplus_weight_decay=0.1)
    groups = group_of(opt)
    named = dict(model.named_parameters())
    expected = {}
    for name, p in named.items():
        if not p.trainable:
            continue
        if ".lora_B." in name or name.endswith("lora_magnitude_vector.default"):    # lora_B, 1-D non-bias
            expected[name] = (LR * ratio, 0.1)
        elif name.endswith("bias"):                                                  # 1-D bias: no decay
            expected[name] = (LR * ratio, 0.0)
        else:                                                                        # lora_A, head weight
            expected[name] = (LR, 0.1)
    assert {n: groups[id(named[n])] for n in expected} == expected
    assert len(groups) == len(expected) == 3 * 2 + 2         # A, B, m per layer, head weight and bias
    assert not any(id(p) in groups for p in model.parameters() if not p.trainable)


def test_embedding_factors_get_their_own_lr():
    class Embedding(Module):
        def __init__(self):
            super().__init__()
            self.lora_embedding_A = Parameter(np.zeros((2, 5)))
            self.lora_embedding_B = Parameter(np.zeros((3, 2)))

    emb = Embedding()
    opt = create_loraplus_optimizer(emb, SGD, lr=LR, loraplus_lr_embedding=1e-6)
    assert [(g["name"], g["lr"], len(g["params"])) for g in opt.param_groups] == [("embedding", 1e-6, 2)]


def test_one_sgd_step_moves_B_ratio_times_as_far_as_A():
    model = model_with()
    layer = model.model.get_submodule("0")
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    A0, B0 = A.data.copy(), B.data.copy()
    A.grad, B.grad = np.ones_like(A.data), np.ones_like(B.data)
    opt = create_loraplus_optimizer(model, SGD, lr=LR, loraplus_lr_ratio=16)
    opt.step()
    np.testing.assert_allclose(A0 - A.data, LR)
    np.testing.assert_allclose(B0 - B.data, 16 * LR)


def test_a_bad_ratio_is_refused():
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be > 0, got 0"):
        create_loraplus_optimizer(model_with(), SGD, lr=LR, loraplus_lr_ratio=0)
