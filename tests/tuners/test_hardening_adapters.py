"""Hostile or careless adapters on the decoder (issue #29): the ranks adapter_config.json claims are checked
against the tensor file's headers before any LoRA factor is allocated."""
import json
import tracemalloc

import numpy as np
import pytest
import safetensors.numpy

import lowrank as lr
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.tuners.lora.save_and_load import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, AdapterFileError

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def llama(**changes):
    return LlamaForCausalLM(LlamaConfig.from_dict(dict(SIZES, model_type="llama", **changes)), seed=0)


def peft_style_adapter(folder, **config_changes):
    """An r = 4 adapter on q_proj, v_proj saved by lowrank, then rewritten as PEFT writes it (no config hash in
    the tensors), its config edited by ``config_changes``."""
    lm = lr.get_lora_model(llama(), lr.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lm.save_pretrained(folder)
    tensors = safetensors.numpy.load_file(folder / ADAPTER_SAFE_WEIGHTS_NAME)
    safetensors.numpy.save_file(tensors, folder / ADAPTER_SAFE_WEIGHTS_NAME, metadata={"format": "pt"})
    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.mark.parametrize("changes, key", [
    (dict(r=300_000), "r is 300000"),
    (dict(rank_pattern={"q_proj": 300_000}), r"rank_pattern\['q_proj'\] is 300000"),
    (dict(rank_pattern={"layers\\.1\\.self_attn\\.v_proj": 300_000}), r"rank_pattern\[.*v_proj'\] is 300000"),
    (dict(r=2), "r is 2"),
])
@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_a_claimed_rank_is_checked_against_the_tensor_headers_before_anything_is_allocated(tmp_path, changes, key,
                                                                                           how):
    folder = peft_style_adapter(tmp_path / "a", **changes)
    base = llama()
    tracemalloc.start()
    try:
        with pytest.raises(AdapterFileError, match=key) as e:
            if how == "from_pretrained":
                lr.LoraModel.from_pretrained(base, folder)
            else:
                lr.get_lora_model(base, lr.LoraConfig(r=1, target_modules=["k_proj"])).load_adapter(folder, "b")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(folder / ADAPTER_CONFIG_NAME) in str(e.value) and "(4, 32)" in str(e.value)
    assert peak < 5_000_000                     # r = 300000 would take 300000 x 32 float32s per factor


def test_a_targeted_layer_without_tensors_is_refused_before_its_factors_are_allocated(tmp_path):
    folder = peft_style_adapter(tmp_path / "a", target_modules=["q_proj", "v_proj", "o_proj"],
                                rank_pattern={"o_proj": 10**6})
    tracemalloc.start()
    try:
        with pytest.raises(AdapterFileError, match=r"missing tensors \[.*layers.0.self_attn.o_proj.lora_A.weight"):
            lr.LoraModel.from_pretrained(llama(), folder)
        assert tracemalloc.get_traced_memory()[1] < 5_000_000
    finally:
        tracemalloc.stop()


def test_a_matching_rank_pattern_still_loads(tmp_path):
    lm = lr.get_lora_model(llama(), lr.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                                  rank_pattern={"v_proj": 2, "embed_tokens": 3}))
    lm.save_pretrained(tmp_path)
    loaded = lr.LoraModel.from_pretrained(llama(), tmp_path)
    layer = loaded.model.model.layers[1].self_attn
    assert layer.q_proj.r["default"] == 4 and layer.v_proj.r["default"] == 2
    assert loaded.model.model.embed_tokens.r["default"] == 3
