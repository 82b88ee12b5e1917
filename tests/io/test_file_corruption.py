"""Corrupted files: loading either succeeds with the results the file's contents define, or
raises FileFormatError and leaves the model exactly as it was. Never another exception type.

The oracle is the LoRA formula in float64, y = relu(x W0'ᵀ + b0) W2'ᵀ + b2 with
Wi' = Wi + s·Bi·Ai and s = alpha / r (alpha / √r with rsLoRA), read from the edited files.
"""
import functools
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import assume, given, strategies as st

import lowrank as lr
from lowrank.tuners.lora.save_and_load import (ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, CONFIG_HASH_KEY,
                                               adapter_parameters)
from lowrank.io.model_files import FileFormatError, load_model, save_model, tensor_file_bytes

X = np.random.default_rng(3).normal(size=(4, 5))
CONFIG = lr.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"])


def base():
    return lr.MLP([5, 4, 3], dtype="float64", seed=21)


ROOT = []          # the directory every file of this module goes under (see scratch_root)


@pytest.fixture(scope="module", autouse=True)
def scratch_root():
    """Every file these tests write goes under one directory, removed at the end."""
    ROOT.append(tempfile.mkdtemp(prefix="lowrank-corruption-"))
    yield
    shutil.rmtree(ROOT.pop())


def fresh_dir() -> Path:
    return Path(tempfile.mkdtemp(dir=ROOT[-1]))


@functools.lru_cache(maxsize=None)
def saved() -> tuple:
    """(config bytes, weights bytes, model-file bytes) of a trained adapter and its base."""
    lm = lr.get_lora_model(base(), CONFIG)
    rng = np.random.default_rng(4)
    for p in adapter_parameters(lm, "default").values():
        p.data = rng.normal(size=p.shape)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        lm.save_pretrained(d / "ad")
        save_model(base(), d / "base.safetensors")
        return ((d / "ad" / ADAPTER_CONFIG_NAME).read_bytes(), (d / "ad" / ADAPTER_SAFE_WEIGHTS_NAME).read_bytes(),
                (d / "base.safetensors").read_bytes())


@functools.lru_cache(maxsize=None)
def unbound(weights: bytes) -> bytes:
    """The weights without the hash of their config (as PEFT writes them): any config goes with them."""
    n = int.from_bytes(weights[:8], "little")
    meta = json.loads(weights[8:8 + n])["__metadata__"]
    del meta[CONFIG_HASH_KEY]
    return safetensors.numpy.save(safetensors.numpy.load(weights), metadata=meta)


def adapter_dir(config: bytes, weights: bytes) -> Path:
    d = fresh_dir()
    (d / ADAPTER_CONFIG_NAME).write_bytes(config)
    (d / ADAPTER_SAFE_WEIGHTS_NAME).write_bytes(weights)
    return d


def oracle(config: bytes, weights: bytes):
    c, t, W = json.loads(config), safetensors.numpy.load(weights), base().state_dict()
    Wp = {}
    for i in (0, 2):
        A, B = t[f"base_model.model.{i}.lora_A.weight"], t[f"base_model.model.{i}.lora_B.weight"]
        r = A.shape[0]                                              # the rank the file holds
        alphas = [a for p, a in c.get("alpha_pattern", {}).items() if re.fullmatch(p, str(i))]
        alpha = alphas[0] if alphas else c.get("lora_alpha", 8)      # PEFT: the first matching pattern
        s = alpha / (math.sqrt(r) if c.get("use_rslora") else r)
        Wp[i] = W[f"{i}.weight"] + s * B @ A
    return np.maximum(X @ Wp[0].T + W["0.bias"], 0) @ Wp[2].T + W["2.bias"]


def snapshot(module):
    return [(n, id(p), p.data.copy(), p.trainable) for n, p in module.named_parameters()], repr(module)


def unchanged(before, module):
    after = snapshot(module)
    return before[1] == after[1] and len(before[0]) == len(after[0]) and all(
        n == m and i == j and t == u and np.array_equal(a, b)
        for (n, i, a, t), (m, j, b, u) in zip(before[0], after[0]))


def load_or_refuse(config: bytes, weights: bytes):
    """from_pretrained on a fresh base: the loaded model, or None after FileFormatError (base untouched)."""
    model = base()
    before = snapshot(model)
    try:
        return lr.LoraModel.from_pretrained(model, adapter_dir(config, weights))
    except FileFormatError:
        assert unchanged(before, model)
        return None


def flipped(data: bytes, flips) -> bytes:
    b = bytearray(data)
    for position, xor in flips:
        b[position % len(b)] ^= xor
    return bytes(b)


FLIPS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3)


@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated_weights_are_refused(cut):
    config, weights, _ = saved()
    assert load_or_refuse(config, weights[:int(cut * len(weights))]) is None


@given(flips=FLIPS)
def test_flipped_weight_bytes_are_refused_or_harmless(flips):
    config, weights, _ = saved()
    loaded = load_or_refuse(config, flipped(weights, flips))
    assert loaded is None or np.array_equal(loaded(X), load_or_refuse(config, weights)(X))


@given(flips=FLIPS)
def test_a_config_changed_after_saving_is_refused(flips):
    config, weights, _ = saved()
    edited = flipped(config, flips)
    assume(edited != config)
    assert load_or_refuse(edited, weights) is None


@given(flips=FLIPS)
def test_flipped_config_bytes_load_what_the_config_says(flips):
    config, weights, _ = saved()
    weights, edited = unbound(weights), flipped(config, flips)
    loaded = load_or_refuse(edited, weights)
    if loaded is not None:
        np.testing.assert_allclose(loaded(X), oracle(edited, weights), rtol=1e-12, atol=1e-12)


VALUES = st.sampled_from([None, True, False, 0, 1, 2, -1, 0.5, 7.5, "x", "LORA", "none", "all", "all-linear", [],
                          ["0"], ["0", "2"], [0], {}, {"0": 1}, {"2": 2}, "(", "DROP"])
FIELDS = st.sampled_from(sorted(json.loads(saved()[0])) + ["lora_bias", "layers_pattern", "use_qalora", "novel"])


@given(edits=st.lists(st.tuples(FIELDS, VALUES), min_size=1, max_size=3))
def test_edited_config_fields_load_what_the_config_says(edits):
    config, weights, _ = saved()
    fields = json.loads(config)
    for key, value in edits:
        if value == "DROP":
            fields.pop(key, None)
        else:
            fields[key] = value
    edited = json.dumps(fields).encode()
    loaded = load_or_refuse(edited, unbound(weights))
    if loaded is not None:
        np.testing.assert_allclose(loaded(X), oracle(edited, weights), rtol=1e-12, atol=1e-12)


@given(key=st.integers(0, 3), action=st.sampled_from(["drop", "rename", "reshape", "retype"]),
       checksums=st.sampled_from(["kept", "fresh", "none"]))
def test_dropped_renamed_or_reshaped_tensors_are_refused(key, action, checksums):
    config, weights, _ = saved()
    tensors = safetensors.numpy.load(weights)
    name = sorted(tensors)[key]
    if action == "drop":
        tensors.pop(name)
    elif action == "rename":
        tensors[name.replace("lora_", "lora_x")] = tensors.pop(name)
    elif action == "reshape":
        tensors[name] = np.zeros((tensors[name].shape[0] + 1, tensors[name].shape[1]))
    else:
        tensors[name] = tensors[name].astype(np.int64)
    if checksums == "fresh":
        data = tensor_file_bytes(tensors)
    else:
        n = int.from_bytes(weights[:8], "little")
        meta = json.loads(weights[8:8 + n])["__metadata__"] if checksums == "kept" else None
        data = safetensors.numpy.save(tensors, metadata=meta)
    assert load_or_refuse(config, data) is None


@given(flips=FLIPS)
def test_a_corrupted_second_adapter_leaves_the_first_alone(flips):
    config, weights, _ = saved()
    lm = lr.LoraModel.from_pretrained(base(), adapter_dir(config, weights))
    before, y = snapshot(lm), lm(X)
    try:
        lm.load_adapter(adapter_dir(config, flipped(weights, flips)), "second")
    except FileFormatError:
        assert unchanged(before, lm) and list(lm.peft_config) == ["default"]
    lm.set_adapter("default")
    assert np.array_equal(lm(X), y)


@given(flips=FLIPS, cut=st.sampled_from([None, 0, 7, 100, -1]))
def test_corrupted_model_files_are_refused_or_identical(flips, cut):
    data = flipped(saved()[2], flips)[:cut]
    d = fresh_dir()
    (d / "m.safetensors").write_bytes(data)
    try:
        model = load_model(d / "m.safetensors")
    except FileFormatError:
        return
    assert np.array_equal(model(X), base()(X))
