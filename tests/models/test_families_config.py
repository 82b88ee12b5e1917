"""Reading each family's config.json as transformers 5.25's own config classes read it, and the one-line
errors for what lowrank does not compute (an unknown model_type or rope_type, RoPE settings it can't honour).

The expectation is always transformers' config object built from the same dict, never lowrank's own table.
"""
import dataclasses
import json

import pytest
import transformers

from lowrank.models.llama import LlamaConfig, LlamaForCausalLM

SIZES = dict(vocab_size=13, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
ROPE_FORMS = {    # config.json's RoPE keys, the ways older and newer files write them
    "none": {},
    "theta": dict(rope_theta=1e6),
    "parameters": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "parameters+theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0}, rope_theta=7.0),
    "old-linear": dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=50.0),
    "old-linear-no-theta": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3,
                                    "original_max_position_embeddings": 16}),
    "llama3-default-original": dict(rope_scaling={"rope_type": "llama3", **LLAMA3}, rope_theta=5e5),
    "both-agreeing": dict(rope_scaling={"type": "linear", "factor": 2.0},
                          rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
}
CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}


def read_by_transformers(d):
    return CONFIG_CLASSES[d.get("model_type", "llama")].from_dict(dict(d))


@pytest.mark.parametrize("form", sorted(ROPE_FORMS))
@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
def test_rope_keys_are_read_as_transformers_reads_them(model_type, form):
    d = dict(SIZES, model_type=model_type, **json.loads(json.dumps(ROPE_FORMS[form])))
    theirs = read_by_transformers(d).rope_parameters
    ours = LlamaConfig.from_dict(d)
    assert (ours.rope_theta, ours.rope_type) == (theirs["rope_theta"], theirs["rope_type"])
    assert ours.rope_scaling == ({k: v for k, v in theirs.items() if k not in ("rope_theta", "rope_type", "type")}
                                 or None)


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
def test_keys_a_file_leaves_out_take_the_familys_transformers_defaults(model_type):
    d = dict(model_type=model_type, hidden_size=64, num_attention_heads=32, num_hidden_layers=30)
    theirs, ours = read_by_transformers(d), LlamaConfig.from_dict(d)
    for key in ("vocab_size", "intermediate_size", "num_key_value_heads", "max_position_embeddings",
                "rms_norm_eps", "tie_word_embeddings", "sliding_window"):
        assert getattr(ours, key) == getattr(theirs, key, None), key
    assert ours.head_dim == getattr(theirs, "head_dim", 64 // 32)          # as Qwen2Attention reads it
    if model_type.startswith("qwen"):
        assert ours.layer_types == theirs.layer_types


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_windows_slide_from_max_window_layers_on(model_type):
    d = dict(SIZES, model_type=model_type, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    theirs, ours = read_by_transformers(d), LlamaConfig.from_dict(d)
    assert [ours.layer_window(i) for i in range(3)] == [
        theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types] == [None, 5, 5]


@pytest.mark.parametrize("model_type", sorted(CONFIG_CLASSES))
def test_a_saved_config_reads_back_in_transformers_and_lowrank(tmp_path, model_type):
    d = dict(SIZES, model_type=model_type, head_dim=6, rope_scaling={"type": "linear", "factor": 2.0},
             use_sliding_window=True, sliding_window=3, max_window_layers=2, tie_word_embeddings=True)
    ours = LlamaConfig.from_dict(d)
    LlamaForCausalLM(ours, seed=0).save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    expected = read_by_transformers(d)
    assert type(back) is type(expected)
    keys = ("head_dim", "tie_word_embeddings", "rope_parameters") + (() if model_type == "llama" else
                                                                    ("sliding_window", "layer_types"))
    for key in keys:                                     # (LlamaConfig keeps a sliding_window it never reads)
        assert getattr(back, key, None) == getattr(expected, key, None) or key == "rope_parameters", key
    assert back.rope_parameters == {k: v for k, v in expected.rope_parameters.items() if k != "type"}
    assert LlamaConfig.from_json_file(tmp_path / "config.json") == dataclasses.replace(ours, dtype="float32")


def write_config(tmp_path, **changes):
    """A model's folder whose config.json has ``changes`` on top of a tiny Llama's."""
    LlamaForCausalLM(LlamaConfig(**SIZES), seed=0).save_pretrained(tmp_path)
    d = {**json.loads((tmp_path / "config.json").read_text()), **changes}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    return tmp_path


@pytest.mark.parametrize("changes, match", [
    (dict(model_type="gpt2"), r"config\.json: model_type 'gpt2' is not supported; lowrank reads llama, mistral, "
                              r"qwen2, qwen3$"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
     r"config\.json: rope_parameters has rope_type 'yarn', which lowrank does not compute; supported: default, "
     r"linear, llama3$"),
    (dict(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}),
     r"config\.json: rope_scaling has rope_type 'dynamic', .*supported: default, linear, llama3$"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}),
     r"config\.json: rope_scaling \{.*\} and rope_parameters \{.*\} disagree \(transformers would use rope_scaling"),
    (dict(rope_parameters={"rope_type": "linear"}), r"rope_parameters of rope_type 'linear' lacks factor$"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor 0\.5 is not supported"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), r"one RoPE per layer type"),
    (dict(attention_dropout=0.1), r"attention_dropout 0\.1 is not supported"),
    (dict(model_type="qwen2", use_sliding_window=False, layer_types=["sliding_attention"] * 3),
     r"sliding_attention layers but no sliding_window"),
], ids=["model_type", "rope_type", "old_rope_type", "both_keys", "missing_factor", "partial_rotary", "rope_per_layer",
        "dropout", "qwen_window"])
def test_what_lowrank_does_not_compute_is_a_one_line_error_naming_the_file(tmp_path, changes, match):
    folder = write_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as error:
        LlamaForCausalLM.from_pretrained(folder)
    assert "\n" not in str(error.value) and str(folder / "config.json") in str(error.value)


def test_transformers_reads_the_refused_combination_differently_than_the_file_says(tmp_path):
    """Why both keys disagreeing is refused: transformers keeps rope_scaling and drops rope_parameters' θ."""
    d = dict(SIZES, rope_scaling={"type": "linear", "factor": 2.0},
             rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert read_by_transformers(d).rope_parameters["rope_theta"] == 10000.0
