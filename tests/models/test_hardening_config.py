"""Hostile or careless model folders (issue #29): shard names leading out of the folder, config.json claims
the tensors don't back (checked before anything is built), settings of the wrong type or out of range,
and what loading holds in memory."""
import json
import os
import tracemalloc

import numpy as np
import pytest

from lowrank.io.model_files import FileFormatError
from lowrank.io.tensor_files import tensor_file_bytes
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.models.llama.checkpoint import expected_shapes

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def write_folder(folder, config: dict | None = None, tensors: dict | None = None, **changes):
    """A transformers-style folder (no lowrank binding) of a tiny Llama, config.json edited by ``changes``."""
    config = dict(SIZES, model_type="llama", **(config or {}))
    model = LlamaForCausalLM(LlamaConfig.from_dict(config), seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: np.asarray(v) for k, v in model.state_dict().items()}
    state.update(tensors or {})
    (folder / "model.safetensors").write_bytes(tensor_file_bytes(state))
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder, state


def shard(folder, name):
    """Move the single file's tensors behind an index naming ``name`` as their shard."""
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for k in LlamaForCausalLM.from_pretrained(folder).state_dict()}}))
    (folder / "model.safetensors").rename(folder / "kept.safetensors")


# -- 1: shard names ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["/etc/passwd", "../outside/model.safetensors", "../../x", "link"])
def test_a_shard_outside_the_folder_is_refused_without_reading_it(tmp_path, where):
    folder, _ = write_folder(tmp_path / "m")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.link(folder / "model.safetensors", outside / "model.safetensors")    # a valid shard, but outside
    (folder / "link").symlink_to(outside / "model.safetensors")
    shard(folder, where)
    with pytest.raises(FileFormatError, match="points outside the model directory") as e:
        LlamaForCausalLM.from_pretrained(folder)
    assert "header length" not in str(e.value) and "root" not in str(e.value).replace(str(tmp_path), "")


def test_a_shard_inside_the_folder_still_loads(tmp_path):
    folder, state = write_folder(tmp_path / "m")
    shard(folder, "./kept.safetensors")
    model = LlamaForCausalLM.from_pretrained(folder)
    assert all(np.array_equal(model.state_dict()[k], v) for k, v in state.items())


# -- 2: claims checked against the headers before building -----------------------------
@pytest.mark.parametrize("changes, words", [
    (dict(vocab_size=3_000_000), "(3000000, 32)"),
    (dict(intermediate_size=10**9), "(1000000000, 32)"),
    (dict(num_hidden_layers=10**6), "num_hidden_layers is 1000000"),
    (dict(num_hidden_layers=2**64), f"num_hidden_layers is {2**64}"),
    (dict(model_type="qwen2", num_hidden_layers=2**64), f"num_hidden_layers is {2**64}"),
])
def test_config_claims_are_checked_against_the_tensor_headers_before_anything_is_allocated(tmp_path, changes, words):
    folder, _ = write_folder(tmp_path, **changes)
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError, match="config.json") as e:
            LlamaForCausalLM.from_pretrained(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert words in str(e.value)
    assert peak < 5_000_000                     # the checkpoint is ~70 kB; the claim was gigabytes


def test_a_config_without_its_sizes_does_not_build_llama_7b(tmp_path):
    folder, _ = write_folder(tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError, match=r"vocab_size 32000 \(absent: the default\), hidden_size 4096 \(absent"):
            LlamaForCausalLM.from_pretrained(folder)
        assert tracemalloc.get_traced_memory()[1] < 5_000_000
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("config", [
    dict(SIZES), dict(SIZES, tie_word_embeddings=True), dict(SIZES, attention_bias=True, mlp_bias=True),
    dict(SIZES, model_type="qwen2"), dict(SIZES, model_type="qwen3", head_dim=4, attention_bias=True),
    dict(SIZES, model_type="mistral", head_dim=16)])
def test_expected_shapes_are_the_built_models_parameters(config):
    config = LlamaConfig.from_dict(config)
    built = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config, seed=0).named_parameters()}
    assert expected_shapes(config) == built


# -- 5, 6 and the messages that named nothing ---------------------------------------------
@pytest.mark.parametrize("changes, key", [
    (dict(num_key_value_heads=0), "num_key_value_heads"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(hidden_size=128.0), "hidden_size"),
    (dict(hidden_size=float("inf")), "hidden_size"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(rms_norm_eps="1e-5"), "rms_norm_eps"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(initializer_range=float("nan")), "initializer_range"),
    (dict(rope_parameters={"rope_type": "linear", "factor": float("inf")}), "factor"),
    (dict(hidden_size=4, num_attention_heads=4, num_key_value_heads=4), "head_dim"),
])
def test_bad_settings_raise_one_value_error_naming_the_file_and_the_key(tmp_path, changes, key):
    folder, _ = write_folder(tmp_path, **changes)
    with pytest.raises(ValueError, match=key) as e:
        LlamaForCausalLM.from_pretrained(folder)
    assert str(folder / "config.json") in str(e.value)


def test_a_config_that_is_not_an_object_is_refused_naming_the_file(tmp_path):
    folder, _ = write_folder(tmp_path)
    (folder / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="JSON object"):
        LlamaForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="JSON object"):
        LlamaConfig.from_json_file(folder / "config.json")


def test_nan_weights_are_refused_and_the_flag_the_message_names_loads_them(tmp_path):
    bad = np.zeros((SIZES["hidden_size"],), np.float32)
    bad[3] = np.nan
    folder, _ = write_folder(tmp_path, tensors={"model.norm.weight": bad})
    with pytest.raises(FileFormatError, match="allow_nonfinite=True"):
        LlamaForCausalLM.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, allow_nonfinite=True)
    assert np.isnan(model.model.norm.weight.data[3])


# -- memory: the loaded arrays become the parameters --------------------------------------
def test_loading_a_float32_folder_holds_no_second_copy_of_the_weights(tmp_path):
    folder, state = write_folder(tmp_path, config=dict(vocab_size=4096, hidden_size=64))
    nbytes = sum(a.nbytes for a in state.values())
    tracemalloc.start()
    try:
        model = LlamaForCausalLM.from_pretrained(folder)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(np.array_equal(model.state_dict()[k], v) for k, v in state.items())
    assert held < 0.3 * nbytes                  # the parameters are views of the file's private map
    assert peak < 2.5 * nbytes                  # no float64 init of every weight on top


def test_load_state_dict_checks_finiteness_without_a_mask_of_the_weights_size():
    from lowrank.nn.module import Module, Parameter

    class Holder(Module):
        def __init__(self):
            super().__init__()
            self.weight = Parameter(np.zeros((2048, 1024), np.float32))

    holder, new = Holder(), np.ones((2048, 1024), np.float32)
    tracemalloc.start()
    try:
        holder.load_state_dict({"weight": new}, assign=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert holder.weight.data is new and peak < new.nbytes / 4


def test_load_state_dict_copies_by_default_so_two_models_never_share_a_weight():
    a, b = LlamaForCausalLM(LlamaConfig.from_dict(SIZES), seed=0), LlamaForCausalLM(LlamaConfig.from_dict(SIZES))
    b.load_state_dict(a.state_dict())
    assert not any(np.shares_memory(p.data, q.data) for p, q in zip(a.parameters(), b.parameters()))
