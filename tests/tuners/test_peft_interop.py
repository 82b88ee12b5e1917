"""lowrank reads Hugging Face PEFT's adapter files and PEFT reads lowrank's, with the same outputs.

A torch ``Sequential(Linear(6, 16), ReLU, Linear(16, 16), ReLU, Linear(16, 2))`` and lowrank's
``MLP([6, 16, 16, 2])`` hold the same base weights (PyTorch names "0", "2", "4" in both).
PEFT → lowrank: ``peft.get_peft_model``, random adapter weights (B = 0 at init would hide a wrong
A or scaling), ``save_pretrained``, then ``LoraModel.from_pretrained`` / ``load_adapter``.
lowrank → PEFT: the same in reverse, read by ``peft.PeftModel.from_pretrained``. Outputs are
compared in float32 at rtol 1e-5 (atol 1e-5 of the output's scale). Half-precision files are
compared against the other side computing with the same rounded weights in float32.
"""
import ml_dtypes
import numpy as np
import peft
import pytest
import torch
from safetensors.torch import load_file

import lowrank as lr
from peft_random import randomize_lowrank as _randomize_lowrank, randomize_peft as _randomize_peft

SIZES = [6, 16, 16, 2]
RTOL = 1e-5
HALF = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, ml_dtypes.bfloat16)}

# Configs in PEFT's own field names, given to peft.LoraConfig and lr.LoraConfig alike.
CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["0", "2", "4"]),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["0", "2", "4"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["0", "2", "4"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["0", "2", "4"], rank_pattern={"2": 2, "4": 1},
                     alpha_pattern={"0": 3, "4": 5}),
    "modules_to_save": dict(r=3, lora_alpha=5, target_modules=["0", "2"], modules_to_save=["4"]),
    # r = 8 > 6 inputs of "0" and > 2 outputs of the head "4": legal in PEFT, so in lowrank too
    "rank_above_min": dict(r=8, lora_alpha=16, target_modules=["0", "2", "4"]),
    "dora_rank_above_min": dict(r=8, lora_alpha=4, use_dora=True, use_rslora=True, target_modules=["0", "4"]),
}

pytestmark = pytest.mark.filterwarnings(r"ignore:.*exceeds min\(D_in, D_out\):UserWarning")


def twins(seed=0):
    """(torch Sequential, lowrank MLP) with the same base weights: torch's init, copied over."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 2))
    model = lr.MLP(SIZES, seed=seed)
    model.load_state_dict({k: v.detach().numpy().copy() for k, v in net.state_dict().items()})
    return net, model


def inputs(seed=0, N=9):
    return np.random.default_rng(seed).standard_normal((N, SIZES[0])).astype(np.float32)


def peft_out(pm, x):
    with torch.no_grad():
        return pm(torch.from_numpy(x)).numpy()


def assert_same(got, want):
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())


def is_adapter_weight(name):
    return any(part in name for part in ("lora_A", "lora_B", "lora_magnitude_vector", "modules_to_save"))


def randomize_peft(pm, seed=1):
    _randomize_peft(pm, is_adapter_weight, seed, scale=0.5)


def randomize_lowrank(lm, seed=1):
    _randomize_lowrank(lm, is_adapter_weight, seed, scale=0.5)


def peft_model(net, adapters: dict):
    """get_peft_model with the first adapter as "default", add_adapter for the others; random weights."""
    (first, config), *rest = adapters.items()
    pm = peft.get_peft_model(net, peft.LoraConfig(**config), adapter_name=first)
    for name, config in rest:
        pm.add_adapter(name, peft.LoraConfig(**config))
    randomize_peft(pm)
    return pm.eval()


def lowrank_model(model, adapters: dict):
    (first, config), *rest = adapters.items()
    lm = lr.get_lora_model(model, lr.LoraConfig(**config), adapter_name=first)
    for name, config in rest:
        lm.add_adapter(name, lr.LoraConfig(**config))
    randomize_lowrank(lm)
    return lm.eval()


def load_in_lowrank(model, directory, names):
    lm = lr.LoraModel.from_pretrained(model, directory)
    for name in names[1:]:
        lm.load_adapter(directory / name, name)
    return lm


def load_in_peft(net, directory, names):
    pm = peft.PeftModel.from_pretrained(net, str(directory))
    for name in names[1:]:
        pm.load_adapter(str(directory / name), adapter_name=name)
    return pm.eval()


def file_dtypes(directory):
    return {t.dtype for t in load_file(directory / "adapter_model.safetensors").values()}


def assert_every_adapter_same(pm, lm, names, x):
    for name in names:
        pm.set_adapter(name)
        lm.set_adapter(name)
        assert_same(lm(x), peft_out(pm, x))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_peft_adapter_loads_into_lowrank_with_the_same_outputs(tmp_path, case):
    net, model = twins()
    x = inputs()
    pm = peft_model(net, {"default": CASES[case]})
    y_base = model(x)
    pm.save_pretrained(tmp_path)
    lm = lr.LoraModel.from_pretrained(model, tmp_path)
    y = lm(x)
    assert_same(y, peft_out(pm, x))
    assert not np.allclose(y, y_base, rtol=1e-3)                 # the adapter changes the output
    assert {n: l.r["default"] for n, l in lm.lora_layers()} == \
        {n: pm.base_model.model[int(n)].r["default"] for n in CASES[case]["target_modules"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_lowrank_adapter_loads_into_peft_with_the_same_outputs(tmp_path, case):
    net, model = twins()
    x = inputs(1)
    lm = lowrank_model(model, {"default": CASES[case]})
    y = lm(x)
    lm.save_pretrained(tmp_path)
    pm = load_in_peft(net, tmp_path, ["default"])
    assert_same(y, peft_out(pm, x))
    with pm.disable_adapter():                                    # the base alone differs: the adapter loaded
        assert not np.allclose(peft_out(pm, x), y, rtol=1e-3)


# three adapters on the same layers: "default" in the root directory, the others in sub-directories
SEVERAL = {"default": dict(r=4, lora_alpha=8, target_modules=["0", "2"], modules_to_save=["4"]),
           "wide": dict(r=8, lora_alpha=3, use_rslora=True, target_modules=["0", "2"], modules_to_save=["4"]),
           "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=["0", "2"], modules_to_save=["4"],
                        rank_pattern={"0": 7})}


def test_several_named_adapters_peft_to_lowrank(tmp_path):
    net, model = twins(2)
    pm = peft_model(net, SEVERAL)
    pm.save_pretrained(tmp_path)
    assert sorted(p.parent.name for p in tmp_path.glob("*/adapter_config.json")) == ["dora", "wide"]
    lm = load_in_lowrank(model, tmp_path, list(SEVERAL))
    assert_every_adapter_same(pm, lm, list(SEVERAL), inputs(2))


def test_several_named_adapters_lowrank_to_peft(tmp_path):
    net, model = twins(3)
    lm = lowrank_model(model, SEVERAL)
    lm.save_pretrained(tmp_path)
    pm = load_in_peft(net, tmp_path, list(SEVERAL))
    assert_every_adapter_same(pm, lm, list(SEVERAL), inputs(3))


def test_loading_a_rank_above_min_dims_warns_naming_the_layers(tmp_path):
    net, model = twins()
    peft_model(net, {"default": CASES["rank_above_min"]}).save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as record:
        lr.LoraModel.from_pretrained(model, tmp_path)
    messages = {str(w.message).split(":")[0] for w in record if "exceeds min(D_in, D_out)" in str(w.message)}
    assert messages == {"LoraLinear 'model.0' adapter 'default'", "LoraLinear 'model.4' adapter 'default'"}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["lora", "dora", "modules_to_save"])
def test_half_precision_peft_files_load_into_lowrank(tmp_path, dtype, case):
    net, model = twins(4)
    pm = peft_model(net, {"default": CASES[case]})
    adapter = [p for n, p in pm.named_parameters() if is_adapter_weight(n)]
    with torch.no_grad():
        for p in adapter:                                      # the adapter alone, as PEFT users cast it
            p.data = p.data.to(HALF[dtype][0])
    pm.save_pretrained(tmp_path)
    assert file_dtypes(tmp_path) == {HALF[dtype][0]}
    with torch.no_grad():
        for p in adapter:                                      # back to float32, holding the rounded values
            p.data = p.data.float()
    x = inputs(4)
    lm = lr.LoraModel.from_pretrained(model, tmp_path)
    assert all(p.dtype == np.float32 for _, p in lm.named_parameters())     # upcast exactly on loading
    assert_same(lm(x), peft_out(pm, x))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", ["lora", "dora", "modules_to_save"])
def test_half_precision_lowrank_files_load_into_peft(tmp_path, dtype, case):
    net, model = twins(5)
    lm = lowrank_model(model, {"default": CASES[case]})
    lm.save_pretrained(tmp_path, dtype=dtype)
    assert file_dtypes(tmp_path) == {HALF[dtype][0]}
    for name, p in lm.named_parameters():                      # what the file holds: round to nearest even
        if is_adapter_weight(name):
            p.data = p.data.astype(HALF[dtype][1]).astype(np.float32)
    pm = load_in_peft(net, tmp_path, ["default"])
    x = inputs(5)
    assert_same(lm(x), peft_out(pm, x))
