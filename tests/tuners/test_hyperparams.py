"""Hyper-parameters are finite and in range, checked where they are set: LoraConfig, every
optimizer (its defaults, its settings and each param group's overrides), LoRA+ and fit.
An Inf or NaN used to train NaN weights silently (and re-saving wrote invalid JSON)."""
import json

import numpy as np
import pytest

import lowrank as lr
from lowrank.tuners.lora.config import AdapterFileError, read_config
from lowrank.tuners.lora.loraplus import create_loraplus_optimizer

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", INF, "lora_alpha must be a finite number, got inf"),
    ("lora_alpha", NAN, "lora_alpha must be a finite number, got nan"),
    ("lora_alpha", -INF, "lora_alpha must be a finite number, got -inf"),
    ("lora_alpha", 0, "lora_alpha must be > 0, got 0"),
    ("lora_dropout", NAN, "lora_dropout must lie in [0, 1), got nan"),
    ("alpha_pattern", {"0": INF}, "alpha_pattern['0'] must be a finite number, got inf"),
    ("r", 0, "r must be an integer >= 1, got 0"),                  # the rule LoraLinear applies too
    ("rank_pattern", {"0": 2.5}, "rank_pattern['0'] must be an integer >= 1, got 2.5"),
    ("init_lora_weights", "olora", "init_lora_weights must be True, False, 'gaussian' or 'pissa', got 'olora'"),
])
def test_lora_config_refuses_nonfinite_or_out_of_range_values(field, value, message):
    with pytest.raises(ValueError, match=f"LoraConfig: {message}".replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        lr.LoraConfig(**{field: value})


def test_a_numpy_integer_rank_is_stored_as_an_int_json_can_write():
    cfg = lr.LoraConfig(r=np.int64(4), rank_pattern={"0": np.int32(2)})
    assert type(cfg.r) is int and type(cfg.rank_pattern["0"]) is int
    assert json.loads(json.dumps(cfg.to_dict()))["rank_pattern"] == {"0": 2}


def test_a_config_file_with_infinity_is_refused(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"r": 2, "lora_alpha": Infinity, "peft_type": "LORA", "target_modules": ["0"]}')
    with pytest.raises((AdapterFileError, ValueError), match="lora_alpha must be a finite number, got inf"):
        read_config(path)


def params():
    return [lr.Parameter(np.zeros((2, 3))), lr.Parameter(np.zeros(3))]


BAD = [
    ({"lr": INF}, "lr must be a finite number, got inf"),
    ({"lr": NAN}, "lr must be a finite number, got nan"),
    ({"lr": 0.0}, "lr must be > 0, got 0.0"),
    ({"weight_decay": INF}, "weight_decay must be a finite number, got inf"),
    ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
]
ADAM_BAD = [
    ({"eps": NAN}, "eps must be a finite number, got nan"),
    ({"eps": -1e-8}, "eps must be >= 0, got -1e-08"),
    ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
    ({"betas": (NAN, 0.999)}, r"betas must be two numbers in \[0, 1\), got \(nan, 0.999\)"),
    ({"betas": (0.9,)}, r"betas must be two numbers in \[0, 1\), got \(0.9,\)"),
]
SGD_BAD = [({"momentum": INF}, "momentum must be a finite number, got inf")]


@pytest.mark.parametrize("opt_cls, settings, message",
                         [(c, s, m) for c in (lr.SGD, lr.Adam, lr.AdamW) for s, m in BAD]
                         + [(c, s, m) for c in (lr.Adam, lr.AdamW) for s, m in ADAM_BAD]
                         + [(lr.SGD, s, m) for s, m in SGD_BAD])
def test_optimizers_refuse_bad_settings_and_group_overrides(opt_cls, settings, message):
    with pytest.raises(ValueError, match=f"{opt_cls.__name__}: {message} in param group 0"):
        opt_cls(params(), **settings)
    good, bad = params(), params()
    with pytest.raises(ValueError, match=f"{opt_cls.__name__}: {message} in param group 1"):
        opt_cls([{"params": good}, {"params": bad, **settings}])


def test_an_inf_lr_no_longer_trains_nan_weights():
    p = lr.Parameter(np.ones(3))
    with pytest.raises(ValueError):
        lr.Adam([p], lr=INF)
    assert np.array_equal(p.data, np.ones(3))


@pytest.mark.parametrize("kw, message", [
    ({"loraplus_lr_ratio": INF}, "loraplus_lr_ratio must be a finite number, got inf"),
    ({"loraplus_lr_ratio": NAN}, "loraplus_lr_ratio must be a finite number, got nan"),
    ({"loraplus_lr_embedding": INF}, "loraplus_lr_embedding must be a finite number, got inf"),
    ({"loraplus_weight_decay": INF}, "weight_decay must be a finite number, got inf"),
])
def test_loraplus_refuses_nonfinite_ratios_and_rates(kw, message):
    model = lr.get_lora_model(lr.MLP([4, 6, 1], seed=0), lr.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=message):
        create_loraplus_optimizer(model, lr.AdamW, lr=1e-3, **kw)


def test_loraplus_ratio_times_a_huge_lr_that_overflows_is_refused():
    model = lr.get_lora_model(lr.MLP([4, 6, 1], seed=0), lr.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match="lr must be a finite number, got inf in param group 1"):
        create_loraplus_optimizer(model, lr.AdamW, lr=1e308, loraplus_lr_ratio=16)


@pytest.mark.parametrize("n_X, n_y, message", [
    (0, 0, "fit: no training data: X has 0 rows"),
    (10, 9, r"fit: X has 10 rows but y has 9"),
])
def test_fit_refuses_empty_or_mismatched_data(n_X, n_y, message):
    model = lr.MLP([3, 4, 1], seed=0)
    X, y = np.zeros((n_X, 3), np.float32), np.zeros(n_y, np.int64)
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        lr.fit(model, lr.Adam(model.parameters()), lr.BCEWithLogitsLoss(), X, y, epochs=1, progress=False)
    assert all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))


def test_fit_refuses_mismatched_validation_data():
    model = lr.MLP([3, 4, 1], seed=0)
    X, y = np.zeros((10, 3), np.float32), np.zeros(10, np.int64)
    with pytest.raises(ValueError, match="fit: X_val has 4 rows but y_val has 3"):
        lr.fit(model, lr.Adam(model.parameters()), lr.BCEWithLogitsLoss(), X, y, X_val=X[:4], y_val=y[:3],
               epochs=1, progress=False)


def test_a_valid_config_still_round_trips_as_strict_json():
    cfg = lr.LoraConfig(r=2, lora_alpha=3.5, alpha_pattern={"0": 7})
    json.loads(json.dumps(cfg.to_dict(), allow_nan=False))
