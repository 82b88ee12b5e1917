"""Base-model files: PyTorch's names and layouts, the architecture in the metadata, exact
round trips, and FileFormatError for every bad file."""
import json

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, strategies as st

import lowrank as lr
from lowrank.io import model_files
from lowrank.io.model_files import ARCH_KEY, FileFormatError, load_model, save_model, tensor_file_bytes
from lowrank.tuners.lora.qlora import quantize_model

ACTS = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "sigmoid": lambda z: 1 / (1 + np.exp(-z))}


@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4), act=st.sampled_from(sorted(ACTS)),
       bias=st.booleans(), dtype=st.sampled_from(["float32", "float64"]), n=st.integers(1, 3))
def test_round_trip_is_exact_and_the_file_is_a_pytorch_state_dict(tmp_path_factory, sizes, act, bias, dtype, n):
    path = tmp_path_factory.mktemp("m") / "model.safetensors"
    model = lr.MLP(sizes, act, bias=bias, dtype=dtype, seed=len(sizes))
    save_model(model, path)
    loaded = load_model(path)
    assert repr(loaded) == repr(model)
    for (k, a), (j, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == j and a.dtype == b.dtype and np.array_equal(a, b)
    x = np.random.default_rng(n).normal(size=(n, sizes[0])).astype(dtype)
    assert np.array_equal(loaded(x), model(x))
    t = safetensors.numpy.load_file(path)           # y = act(x Wᵀ + b) ... with W (out, in), PyTorch's layout
    h = x.astype(np.float64)
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        assert t[f"{2 * i}.weight"].shape == (d_out, d_in) and (f"{2 * i}.bias" in t) == bias
        h = h @ t[f"{2 * i}.weight"].T + (t[f"{2 * i}.bias"] if bias else 0)
        h = ACTS[act](h) if i < len(sizes) - 2 else h
    np.testing.assert_allclose(loaded(x), h, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-6)


def test_gelu_and_quantized_layers_round_trip(tmp_path):
    model = lr.Sequential(lr.Dense(70, 9, seed=1), lr.GELU("tanh"), lr.Dense(9, 2, seed=2))
    quantize_model(model, skip=["2"])                    # an NF4Dense: uint8 codes + float32 scales
    save_model(model, tmp_path / "q.safetensors")
    loaded = load_model(tmp_path / "q.safetensors")
    assert repr(loaded) == repr(model)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype
               for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    x = np.random.default_rng(0).normal(size=(3, 70)).astype(np.float32)
    assert np.array_equal(loaded(x), model(x))


def test_pytorch_loads_the_file_with_load_state_dict(tmp_path):
    import torch                               # a required test dependency (tests/tuners/test_peft_interop.py too)
    from safetensors.torch import load_file
    model = lr.MLP([5, 8, 8, 3], "gelu", dtype="float64", seed=3)
    save_model(model, tmp_path / "m.safetensors")
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.GELU(), torch.nn.Linear(8, 8), torch.nn.GELU(),
                              torch.nn.Linear(8, 3)).double()
    net.load_state_dict(load_file(tmp_path / "m.safetensors"))          # strict: same names, shapes
    x = np.random.default_rng(1).normal(size=(4, 5))
    with torch.no_grad():
        np.testing.assert_allclose(net(torch.from_numpy(x)).numpy(), model(x), rtol=1e-12, atol=1e-12)


def test_save_refuses_what_it_cannot_describe_and_existing_files(tmp_path):
    lm = lr.get_lora_model(lr.MLP([4, 3, 2]), lr.LoraConfig(r=1, target_modules=["0"]))
    with pytest.raises(TypeError, match="LoraLinear at '0'.*merge_and_unload"):
        save_model(lm.model, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="LoraModel at '<root>'.*register_layer"):
        save_model(lm, tmp_path / "x.safetensors")
    save_model(lr.MLP([4, 3, 2], seed=1), tmp_path / "m.safetensors")
    with pytest.raises(FileExistsError):
        save_model(lr.MLP([4, 3, 2], seed=2), tmp_path / "m.safetensors")
    save_model(lr.MLP([4, 3, 2], seed=2), tmp_path / "m.safetensors", overwrite=True)
    assert np.array_equal(load_model(tmp_path / "m.safetensors")[0].weight.data, lr.MLP([4, 3, 2], seed=2)[0].weight.data)
    assert not (tmp_path / "x.safetensors").exists()


class Scale(lr.Module):
    """y = x ⊙ g: a layer type from outside lowrank.nn.layers, to exercise register_layer."""

    def __init__(self, width):
        super().__init__()
        self.gain = lr.Parameter(np.ones(width, np.float32))

    def forward(self, x):
        return x * self.gain.data


def test_new_layer_types_plug_in(tmp_path, monkeypatch):
    monkeypatch.setitem(model_files.LAYER_TYPES, "Scale", model_files.LayerType(
        Scale, lambda m: {"width": m.gain.shape[0]}, lambda s: Scale(s["width"]), {"width": int}))
    model = lr.Sequential(lr.Dense(3, 2, seed=0), Scale(2))
    model[1].gain.data = np.array([2.0, -1.0], np.float32)
    save_model(model, tmp_path / "s.safetensors")
    x = np.ones((1, 3), np.float32)
    assert np.array_equal(load_model(tmp_path / "s.safetensors")(x), model(x))


def arch_file(path, module, tensors=None, arch=None):
    """A model file with a hand-written architecture (and lowrank's checksums)."""
    tensors = tensors if tensors is not None else {"0.weight": np.ones((2, 3), np.float32)}
    text = arch if arch is not None else json.dumps({"format": "lowrank.architecture/1", "module": module})
    path.write_bytes(tensor_file_bytes(tensors, {ARCH_KEY: text}))
    return path


DENSE = {"type": "Dense", "in_features": 3, "out_features": 2, "bias": False, "dtype": "float32"}
SEQ = {"type": "Sequential", "children": [DENSE]}
BAD_ARCH = [
    (dict(module={"type": "Conv2d"}), "unknown layer type 'Conv2d'"),
    (dict(module=[1]), "must be an object with a 'type'"),
    (dict(module={"type": "Sequential", "children": "x"}), "needs exactly a 'children' list"),
    (dict(module=dict(DENSE, in_features="3")), "Dense node <root> needs settings"),
    (dict(module=dict(DENSE, in_features=True)), "Dense node <root> needs settings"),
    (dict(module=dict(DENSE, extra=1)), "Dense node <root> needs settings"),
    (dict(module={"type": "Sequential", "children": [dict(DENSE, dtype="float16")]}),
     "dtype must be float32 or float64"),
    (dict(module={"type": "Sequential", "children": [dict(DENSE, in_features=0)]},
          tensors={"0.weight": np.ones((2, 0), np.float32)}), "must be >= 1"),
    (dict(module=dict(DENSE)), r"missing tensors \['weight'\] \(Dense node <root> needs it\)"),
    (dict(module={"type": "Sequential", "children": [{"type": "GELU", "approximate": "erf"}]}), r"GELU node <root>\.0"),
    (dict(module=None, arch="{broken"), "architecture in the metadata is not valid JSON"),
    (dict(module=None, arch='{"format": "other"}'), "the architecture must be"),
    (dict(module=SEQ, tensors={"0.weight": np.ones((3, 2), np.float32)}), r"Dense node <root>\.0 claims '0.weight' of shape \(2, 3\) \(6 values\), but the file holds \(3, 2\)"),
    (dict(module=SEQ, tensors={"0.weight": np.ones((2, 3), np.float64)}), "dtype float64; the model takes float32"),
    (dict(module=SEQ, tensors={"0.weight": np.ones((2, 3), np.int8)}), "dtype int8"),
    (dict(module=SEQ, tensors={}), r"missing tensors \['0.weight'\]"),
    (dict(module=SEQ, tensors={"0.weight": np.ones((2, 3), np.float32), "0.bias": np.ones(2, np.float32)}),
     r"unexpected tensors \['0.bias'\]"),
    (dict(module=SEQ, tensors={"0.weight": np.full((2, 3), np.nan, np.float32)}), "NaN or Inf"),
]


@pytest.mark.parametrize("kwargs,message", BAD_ARCH)
def test_bad_model_files_raise_file_format_error(tmp_path, kwargs, message):
    path = arch_file(tmp_path / "m.safetensors", **kwargs)
    with pytest.raises(FileFormatError, match=message) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_other_bad_files(tmp_path):
    with pytest.raises(FileFormatError, match="file not found"):
        load_model(tmp_path / "none.safetensors")
    safetensors.numpy.save_file({"0.weight": np.ones((2, 3), np.float32)}, tmp_path / "bare.safetensors")
    with pytest.raises(FileFormatError, match="not a file written by save_model"):
        load_model(tmp_path / "bare.safetensors")
    (tmp_path / "sum.safetensors").write_bytes(safetensors.numpy.save({}, metadata={"lowrank.sha256": "{bad"}))
    with pytest.raises(FileFormatError, match="checksum table in the metadata is not valid JSON"):
        load_model(tmp_path / "sum.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(FileFormatError, match="not a valid safetensors file"):
        load_model(tmp_path / "junk.safetensors")


def test_lossless_upcast_and_opt_in_nonfinite(tmp_path):
    w = np.array([[1.5, np.inf, -2.0], [0.25, 3.0, 1.0]], np.float32)
    path = arch_file(tmp_path / "m.safetensors", {"type": "Sequential", "children": [dict(DENSE, dtype="float64")]},
                     {"0.weight": w})
    loaded = load_model(path, allow_nonfinite=True)
    assert loaded[0].weight.dtype == np.float64 and np.array_equal(loaded[0].weight.data, w.astype(np.float64))


@pytest.mark.parametrize("width", [3000, 100_000])
def test_a_tiny_file_claiming_a_huge_layer_fails_before_allocating(tmp_path, width):
    import tracemalloc
    path = arch_file(tmp_path / "m.safetensors", dict(SEQ, children=[dict(DENSE, in_features=width, out_features=width,
                                                                          dtype="float64")]))
    assert path.stat().st_size < 1000
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError, match=rf"claims '0.weight' of shape \({width}, {width}\)"):
            load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000                         # a 3000² float64 Dense alone is 72 MB


def test_load_state_dict_is_all_or_nothing_and_refuses_nonfinite(monkeypatch):
    model = lr.MLP([3, 2, 2], seed=0)
    before = [(p, p.data) for p in model.parameters()]
    state = {k: np.full(a.shape, 7, a.dtype) for k, a in model.state_dict().items()}
    state["2.bias"] = np.array([1.0, np.nan], np.float32)
    with pytest.raises(ValueError, match=r"Sequential '<root>'.load_state_dict: '2.bias' holds NaN or Inf"):
        model.load_state_dict(state)
    assert all(p.data is data for p, data in before)
    assert np.isnan(model.load_state_dict(state, allow_nonfinite=True)[2].bias.data[1])
    state["2.bias"] = np.zeros(2, np.float32)
    real, calls = lr.nn.module.to_device, []

    def fails_on_third(a, device):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated failure while copying in")
        return real(a, device)
    monkeypatch.setattr(lr.nn.module, "to_device", fails_on_third)
    before = [(p, p.data) for p in model.parameters()]
    with pytest.raises(MemoryError):
        model.load_state_dict(state)
    assert all(p.data is data for p, data in before)
