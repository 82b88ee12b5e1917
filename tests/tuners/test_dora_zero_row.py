"""DoRA on an output unit whose weight row is all zero: its norm n is 0 and the scale m / n is
0 / 0. PEFT 0.21 divides anyway (``magnitude / weight_norm``, no epsilon) and returns NaN;
lowrank refuses with an error naming the layer, the adapter and the rows, and changes nothing."""
import numpy as np
import pytest

from lowrank.tuners.lora.dora import DoraLinear
from lowrank.nn.layers import MLP, Dense
from lowrank.tuners.lora.config import LoraConfig
from lowrank.tuners.lora.model import get_lora_model


def dense_with_zero_rows(rows, D_in=5, D_out=4):
    base = Dense(D_in, D_out, dtype="float64", seed=0)
    base.weight.data[rows] = 0.0
    return base


def test_a_zero_weight_row_is_a_clear_error_not_nan():
    base = dense_with_zero_rows([1, 3])
    W = base.weight.data.copy()
    with pytest.raises(ValueError, match=r"adapter 'default'.*rows \[1, 3\] of W \+ s·B·A have norm 0"):
        DoraLinear(base, r=2)
    np.testing.assert_array_equal(base.weight.data, W)


def test_through_lora_config_the_error_names_the_layer():
    model = MLP([5, 4, 1], dtype="float64", seed=0)
    model.get_submodule("0").weight.data[2] = 0.0
    with pytest.raises(ValueError, match=r"DoraLinear 'model.0' adapter 'default': rows \[2\] "):
        get_lora_model(model, LoraConfig(r=2, target_modules=["0"], use_dora=True))


def test_a_row_that_becomes_zero_later_is_refused_in_the_forward():
    layer = DoraLinear(Dense(3, 2, dtype="float64", seed=0), r=1)          # B = 0: V = W
    layer.weight.data[0] = 0.0
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        layer(np.ones((2, 3)))


def test_nonzero_rows_still_work():
    layer = DoraLinear(Dense(5, 4, dtype="float64", seed=0), r=2)
    assert np.isfinite(layer(np.ones((3, 5)))).all()
