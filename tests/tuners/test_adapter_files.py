"""Adapters as PEFT files: exact round trips, PEFT's names and fields, and loads that either
succeed completely or raise FileFormatError and leave the model exactly as it was."""
import json
import math

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, strategies as st

import lowrank as lr
from lowrank.tuners.lora import save_and_load
from lowrank.tuners.lora.save_and_load import (ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, AdapterFileError,
                                              adapter_parameters, save_pretrained)
from lowrank.io.model_files import FileFormatError

X = np.random.default_rng(7).normal(size=(4, 5))


def trained(lm, name, seed=0):
    """Give every parameter of adapter ``name`` random values, as training would (B != 0)."""
    rng = np.random.default_rng(seed)
    for p in adapter_parameters(lm, name).values():
        p.data = rng.normal(size=p.shape).astype(p.dtype)
    return lm


def fingerprint(module):
    """Everything a failed load must leave alone: parameter names, objects, values, flags, structure."""
    return ([(n, id(p), p.data.copy(), p.trainable) for n, p in module.named_parameters()], repr(module))


def assert_same(before, after):
    assert [n for n, *_ in before[0]] == [n for n, *_ in after[0]]
    for (_, i, a, t), (_, j, b, u) in zip(before[0], after[0]):
        assert i == j and t == u and a.dtype == b.dtype and np.array_equal(a, b)
    assert before[1] == after[1]


@given(dtype=st.sampled_from(["float32", "float64"]), hidden=st.integers(2, 6), r=st.integers(1, 2),
       r2=st.integers(1, 2), rslora=st.booleans(), pattern=st.booleans(), head=st.booleans())
def test_round_trip_is_bit_identical(tmp_path_factory, dtype, hidden, r, r2, rslora, pattern, head):
    d = tmp_path_factory.mktemp("ad")
    config = lr.LoraConfig(r=r, lora_alpha=3, target_modules=["0", "2"] if not head else ["0"],
                           use_rslora=rslora, rank_pattern={"2": r2} if pattern else {},
                           alpha_pattern={"0": 5} if pattern else {}, modules_to_save=["2"] if head else None)
    lm = trained(lr.get_lora_model(lr.MLP([5, hidden, 3], dtype=dtype, seed=1), config), "default")
    lm.add_adapter("second", lr.LoraConfig(r=1, lora_alpha=2, target_modules=config.target_modules))
    trained(lm, "second", seed=1)
    lm.save_pretrained(d)
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, hidden, 3], dtype=dtype, seed=1), d)
    loaded.load_adapter(d / "second", "second")
    x = X.astype(dtype)
    for name in ("default", "second"):
        want, got = adapter_parameters(lm, name), adapter_parameters(loaded, name)
        assert list(want) == list(got)
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k].data, want[k].data), k
        lm.set_adapter(name), loaded.set_adapter(name)
        assert np.array_equal(loaded(x), lm(x))
        saved = dict(vars(lm.peft_config[name]), inference_mode=True)
        assert vars(loaded.peft_config[name]) == saved
    rows = ["default", "second", "__base__", "default"]
    assert np.array_equal(loaded(x, adapter_names=rows), lm(x, adapter_names=rows))


def test_files_have_peft_names_layouts_and_fields(tmp_path):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=2), lr.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear",
                                                                     modules_to_save=None))
    trained(lm, "default")
    lm.add_adapter("other", lr.LoraConfig(r=1, target_modules=["0"], modules_to_save=["2"]))
    lm.save_pretrained(tmp_path, selected_adapters=["default"])     # layer 2's factors sit in original_module
    tensors = safetensors.numpy.load_file(tmp_path / ADAPTER_SAFE_WEIGHTS_NAME)
    layer0, layer2 = lm.model[0], lm.model[2]
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.0.lora_A.weight": (2, 5), "base_model.model.0.lora_B.weight": (4, 2),
        "base_model.model.2.lora_A.weight": (2, 4), "base_model.model.2.lora_B.weight": (3, 2)}
    assert np.array_equal(tensors["base_model.model.0.lora_A.weight"], layer0.lora_A["default"].data)
    assert np.array_equal(tensors["base_model.model.2.lora_B.weight"], layer2.original_module.lora_B["default"].data)
    config = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    assert config == {"peft_type": "LORA", "r": 2, "lora_alpha": 6, "lora_dropout": 0.0,
                      "target_modules": ["0", "2"], "bias": "none", "use_rslora": False, "use_dora": False,
                      "init_lora_weights": True, "fan_in_fan_out": False, "modules_to_save": None,
                      "rank_pattern": {}, "alpha_pattern": {}, "task_type": None,
                      "base_model_name_or_path": None, "inference_mode": True}
    head = lr.get_lora_model(lr.MLP([5, 4, 3]), lr.LoraConfig(r=1, target_modules=["0"], modules_to_save=["2"]))
    head.save_pretrained(tmp_path / "head")
    copy = safetensors.numpy.load_file(tmp_path / "head" / ADAPTER_SAFE_WEIGHTS_NAME)   # the copy, the module's name
    assert set(copy) == {"base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight",
                         "base_model.model.2.weight", "base_model.model.2.bias"}
    assert np.array_equal(copy["base_model.model.2.bias"], head.model[2].modules_to_save["default"].bias.data)


def test_loaded_model_computes_the_lora_formula(tmp_path):
    lm = trained(lr.get_lora_model(lr.MLP([5, 6, 3], dtype="float64", seed=3),
                                   lr.LoraConfig(r=2, lora_alpha=5, target_modules=["0", "2"], use_rslora=True)),
                 "default")
    lm.save_pretrained(tmp_path)
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 6, 3], dtype="float64", seed=3), tmp_path)
    t = safetensors.numpy.load_file(tmp_path / ADAPTER_SAFE_WEIGHTS_NAME)
    base = lr.MLP([5, 6, 3], dtype="float64", seed=3).state_dict()
    s = 5 / math.sqrt(2)                                       # rsLoRA: alpha / sqrt(r)
    W = {i: base[f"{i}.weight"] + s * t[f"base_model.model.{i}.lora_B.weight"] @ t[f"base_model.model.{i}.lora_A.weight"]
         for i in (0, 2)}
    h = np.maximum(X @ W[0].T + base["0.bias"], 0)
    np.testing.assert_allclose(loaded(X), h @ W[2].T + base["2.bias"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_round_trip(tmp_path, bias):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=4), lr.LoraConfig(r=1, target_modules=["0"], bias=bias))
    trained(lm, "default")
    lm.save_pretrained(tmp_path)
    keys = set(safetensors.numpy.load_file(tmp_path / ADAPTER_SAFE_WEIGHTS_NAME))
    assert ("base_model.model.0.base_layer.bias" in keys) and (("base_model.model.2.bias" in keys) == (bias == "all"))
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], seed=4), tmp_path)
    assert np.array_equal(loaded(X.astype(np.float32)), lm(X.astype(np.float32)))


PEFT_021 = {"alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
            "base_model_name_or_path": "toy", "bias": "none", "corda_config": None, "ensure_weight_tying": False,
            "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "layer_replication": None, "layers_pattern": None,
            "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16, "lora_bias": False,
            "lora_dropout": 0.05, "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
            "modules_to_save": None, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 2,
            "rank_pattern": {}, "revision": None, "runtime_config": {"ephemeral_gpu_offload": False},
            "target_modules": ["2", "0"], "target_parameters": None, "task_type": "FEATURE_EXTRACTION",
            "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
            "use_rslora": False, "velora_config": None, "monteclora_config": None, "kasa_config": None}


def peft_dir(tmp_path, config, tensors=None, seed=5):
    """An adapter directory as PEFT writes it: its config, and tensors without lowrank's checksums."""
    rng = np.random.default_rng(seed)
    tensors = tensors if tensors is not None else {
        "base_model.model.0.lora_A.weight": rng.normal(size=(2, 5)).astype(np.float32),
        "base_model.model.0.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32),
        "base_model.model.2.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "base_model.model.2.lora_B.weight": rng.normal(size=(3, 2)).astype(np.float32)}
    tmp_path.mkdir(exist_ok=True)
    safetensors.numpy.save_file(tensors, tmp_path / ADAPTER_SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config) if isinstance(config, dict) else config)
    return tmp_path


def test_a_config_written_by_peft_021_loads(tmp_path):
    d = peft_dir(tmp_path, PEFT_021)
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], seed=6), d)
    t = safetensors.numpy.load_file(d / ADAPTER_SAFE_WEIGHTS_NAME)
    assert np.array_equal(loaded.model[0].lora_A["default"].data, t["base_model.model.0.lora_A.weight"])
    assert loaded.peft_config["default"].lora_alpha == 16 and loaded.peft_config["default"].task_type == "FEATURE_EXTRACTION"


REFUSED = [("lora_bias", True), ("layers_pattern", "layers"), ("layers_to_transform", [0]), ("fan_in_fan_out", True),
           ("peft_type", "LOHA"), ("use_qalora", True), ("exclude_modules", ["0"]), ("eva_config", {"rho": 2}),
           ("runtime_config", {"offload": 1}), ("brand_new_field", 3), ("peft_version", 3), ("r", 0), ("r", "2"),
           ("r", True), ("lora_alpha", False), ("bias", "some"), ("target_modules", [0]), ("modules_to_save", [2]),
           ("rank_pattern", {"0": 0}), ("rank_pattern", {"(": 2}), ("alpha_pattern", {"0": "x"}),
           ("target_modules", "(unclosed"), ("init_lora_weights", "olora"),
           ("target_modules", ["9"]), ("target_modules", ["1"]), ("modules_to_save", ["nope"])]


@pytest.mark.parametrize("field,value", REFUSED)
def test_configs_that_would_change_the_math_are_refused(tmp_path, field, value):
    d = peft_dir(tmp_path / "a", dict(PEFT_021, **{field: value}))
    base = lr.MLP([5, 4, 3], seed=6)
    before = fingerprint(base)
    with pytest.raises(AdapterFileError, match=str(d / ADAPTER_CONFIG_NAME)):
        lr.LoraModel.from_pretrained(base, d)
    assert_same(before, fingerprint(base))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", b"\xff\xfe{}", json.dumps({"peft_type": "LORA", "r": 2})])
def test_unreadable_configs_are_refused(tmp_path, text):
    d = peft_dir(tmp_path, "{}")
    (d / ADAPTER_CONFIG_NAME).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(AdapterFileError, match=ADAPTER_CONFIG_NAME):
        lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3]), d)


def good_tensors():
    rng = np.random.default_rng(8)
    return {"base_model.model.0.lora_A.weight": rng.normal(size=(2, 5)).astype(np.float32),
            "base_model.model.0.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32),
            "base_model.model.2.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
            "base_model.model.2.lora_B.weight": rng.normal(size=(3, 2)).astype(np.float32)}


def edited(change):
    t = good_tensors()
    change(t)
    return t


BAD_TENSORS = [
    (lambda t: t.pop("base_model.model.2.lora_B.weight"), r"missing tensors \['base_model.model.2.lora_B.weight'\]"),
    (lambda t: t.update({"base_model.model.1.lora_A.weight": t["base_model.model.0.lora_A.weight"]}),
     r"unexpected tensors \['base_model.model.1.lora_A.weight'\]"),
    (lambda t: t.update({"base_model.model.0.lora_A.weight": np.zeros((3, 5), np.float32)}),
     r"adapter_config.json: r is 2 for layer '0', but .* holds its lora_A with shape \(3, 5\), rank 3"),
    (lambda t: t.update({"base_model.model.0.lora_B.weight": np.zeros((4, 3), np.float32)}),
     r"lora_B of module '0', \(D_out, r\) with r=2\) has shape \(4, 3\), expected \(4, 2\)"),
    (lambda t: t.update({"base_model.model.2.lora_B.weight": np.zeros((3, 2), np.int32)}), "dtype int32"),
    (lambda t: t.update({"base_model.model.2.lora_B.weight": np.zeros((3, 2), np.float64)}), "dtype float64"),
    (lambda t: t.update({"base_model.model.0.lora_B.weight": np.full((4, 2), np.nan, np.float32)}), "NaN or Inf"),
]


@pytest.mark.parametrize("change,message", BAD_TENSORS)
def test_bad_tensors_are_refused_and_change_nothing(tmp_path, change, message):
    d = peft_dir(tmp_path, PEFT_021, edited(change))
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=6), lr.LoraConfig(r=1, target_modules=["0"]))
    before = fingerprint(lm)
    with pytest.raises(FileFormatError, match=message):
        lm.load_adapter(d, "b")
    assert_same(before, fingerprint(lm))
    assert list(lm.peft_config) == ["default"]


def test_a_wrong_modules_to_save_copy_is_named(tmp_path):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3]), lr.LoraConfig(r=1, target_modules=["0"], modules_to_save=["2"]))
    lm.save_pretrained(tmp_path)
    t = safetensors.numpy.load_file(tmp_path / ADAPTER_SAFE_WEIGHTS_NAME)
    t["base_model.model.2.weight"] = np.zeros((4, 4), np.float32)
    safetensors.numpy.save_file(t, tmp_path / ADAPTER_SAFE_WEIGHTS_NAME)
    with pytest.raises(FileFormatError,
                       match=r"'base_model.model.2.weight' \(modules_to_save copy or trained bias.*expected \(3, 4\)"):
        lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3]), tmp_path)


def test_nonfinite_loads_on_request_and_float16_upcasts_exactly(tmp_path):
    t = good_tensors()
    t["base_model.model.0.lora_B.weight"][0, 0] = np.inf
    t["base_model.model.2.lora_A.weight"] = t["base_model.model.2.lora_A.weight"].astype(np.float16)
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3]), peft_dir(tmp_path, PEFT_021, t), allow_nonfinite=True)
    assert np.isinf(loaded.model[0].lora_B["default"].data[0, 0])
    assert loaded.model[2].lora_A["default"].dtype == np.float32
    assert np.array_equal(loaded.model[2].lora_A["default"].data, t["base_model.model.2.lora_A.weight"].astype(np.float32))


def test_missing_and_broken_files(tmp_path):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3]), lr.LoraConfig(r=1, target_modules=["0"]))
    lm.add_adapter("b", lr.LoraConfig(r=1, target_modules=["2"]))
    lm.save_pretrained(tmp_path / "ad", selected_adapters=["b"])
    with pytest.raises(AdapterFileError, match=r"adapter_config.json: file not found \(adapters in sub-directories"):
        lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3]), tmp_path / "ad")
    with pytest.raises(AdapterFileError, match="file not found"):
        lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3]), tmp_path / "nowhere")
    (tmp_path / "ad" / "b" / ADAPTER_SAFE_WEIGHTS_NAME).unlink()
    with pytest.raises(FileFormatError, match=f"{ADAPTER_SAFE_WEIGHTS_NAME}: file not found"):
        lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3]), tmp_path / "ad" / "b")


def test_a_load_that_fails_midway_is_rolled_back(tmp_path, monkeypatch):
    lm = trained(lr.get_lora_model(lr.MLP([5, 4, 3], seed=9), lr.LoraConfig(r=2, target_modules=["0", "2"],
                                                                            bias="all")), "default")
    lm.save_pretrained(tmp_path)
    calls = []

    def fail_on_third(a, device):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated failure while copying tensors in")
        return a
    monkeypatch.setattr(save_and_load, "to_device", fail_on_third)
    base = lr.MLP([5, 4, 3], seed=9)
    before, y = fingerprint(base), base(X.astype(np.float32))
    with pytest.raises(MemoryError):
        lr.LoraModel.from_pretrained(base, tmp_path)
    assert_same(before, fingerprint(base))
    assert base[0]._path == "0" and np.array_equal(base(X.astype(np.float32)), y)
    calls.clear()
    before, y = fingerprint(lm), lm(X.astype(np.float32))
    with pytest.raises(MemoryError):
        lm.load_adapter(tmp_path, "again")
    assert_same(before, fingerprint(lm))
    assert list(lm.peft_config) == ["default"] and np.array_equal(lm(X.astype(np.float32)), y)


def test_trainability_follows_peft(tmp_path):
    lm = trained(lr.get_lora_model(lr.MLP([5, 4, 3]), lr.LoraConfig(r=1, target_modules=["0"])), "default")
    lm.save_pretrained(tmp_path)
    frozen = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3]), tmp_path)
    assert frozen.num_parameters(trainable_only=True) == 0 and not frozen.training
    assert frozen.peft_config["default"].inference_mode
    live = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3]), tmp_path, is_trainable=True)
    assert live.num_parameters(trainable_only=True) == 5 + 4 and live.training
    live.load_adapter(tmp_path, "b", is_trainable=True)
    assert live.num_parameters(trainable_only=True) == 5 + 4           # not active: frozen until set_adapter
    live.set_adapter("b")
    assert all(p.trainable for p in adapter_parameters(live, "b").values())


def test_name_clash_and_pissa_init_leave_the_base_alone(tmp_path):
    lm = trained(lr.get_lora_model(lr.MLP([5, 4, 3]), lr.LoraConfig(r=1, target_modules=["0"],
                                                                     init_lora_weights="pissa")), "default")
    lm.save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match="already exists"):
        lm.load_adapter(tmp_path, "default")
    W = lm.model[0].weight.data.copy()
    lm.load_adapter(tmp_path, "copy")                      # no PiSSA re-init: the (residual) base is untouched
    assert np.array_equal(lm.model[0].weight.data, W) and lm.peft_config["copy"].init_lora_weights == "pissa"


def test_dora_round_trip_with_magnitude_under_peft_name(tmp_path):
    config = lr.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"], use_dora=True)
    lm = trained(lr.get_lora_model(lr.MLP([5, 4, 3], dtype="float64", seed=11), config), "default")
    lm.save_pretrained(tmp_path)
    tensors = safetensors.numpy.load_file(tmp_path / ADAPTER_SAFE_WEIGHTS_NAME)
    assert tensors["base_model.model.0.lora_magnitude_vector"].shape == (4,)
    assert np.array_equal(tensors["base_model.model.2.lora_magnitude_vector"],
                          lm.model[2].lora_magnitude_vector["default"].data)
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], dtype="float64", seed=11), tmp_path)
    assert loaded.peft_config["default"].use_dora and np.array_equal(loaded(X), lm(X))
    plain = dict(json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text()), use_dora=False)   # m present, config says no
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(plain))
    (tmp_path / ADAPTER_SAFE_WEIGHTS_NAME).write_bytes(safetensors.numpy.save(tensors))    # unbound, as PEFT writes
    with pytest.raises(FileFormatError, match="unexpected tensors .*lora_magnitude_vector"):
        lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], dtype="float64", seed=11), tmp_path)


def test_save_refuses_to_overwrite_and_bad_names(tmp_path):
    lm = trained(lr.get_lora_model(lr.MLP([5, 4, 3]), lr.LoraConfig(r=1, target_modules=["0"])), "default")
    save_pretrained(lm, tmp_path)
    old = (tmp_path / ADAPTER_SAFE_WEIGHTS_NAME).read_bytes()
    trained(lm, "default", seed=3)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lm.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTER_SAFE_WEIGHTS_NAME).read_bytes() == old
    lm.save_pretrained(tmp_path, overwrite=True)
    written = safetensors.numpy.load_file(tmp_path / ADAPTER_SAFE_WEIGHTS_NAME)
    assert all(np.array_equal(written[k], p.data) for k, p in adapter_parameters(lm, "default").items())
    with pytest.raises(ValueError, match="no adapters"):
        lm.save_pretrained(tmp_path / "x", selected_adapters=["missing"])
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a directory"):
        lm.save_pretrained(tmp_path / "file")
    lm.peft_config["a.b"] = lm.peft_config["default"]      # a name that bypassed add_adapter's check
    with pytest.raises(ValueError, match="adapter name"):
        lm.save_pretrained(tmp_path / "y", selected_adapters=["a.b"])
    assert not (tmp_path / "y").exists()
