"""Adapter names are checked once, before anything is injected or trained: a reserved word,
a path, or a non-string would otherwise be saved under names that read as something else."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.tuners.lora.save_and_load import adapter_parameters

RESERVED = ["original_module", "modules_to_save", "base_layer", "lora_A", "lora_B", "lora_embedding_A",
            "lora_embedding_B", "lora_magnitude_vector", "weight", "bias", "__base__", "_parameters", "train"]
MALFORMED = ["", ".", "..", "a/b", "a\\b", "../up", "a.b", "x" * 129, "tab\t"]
CONFIG = lr.LoraConfig(r=1, target_modules=["0"], modules_to_save=["2"])


def fingerprint(module):
    return [(n, p.data.copy(), p.trainable) for n, p in module.named_parameters()], repr(module)


@pytest.mark.parametrize("name", RESERVED + MALFORMED)
def test_bad_names_are_refused_before_anything_changes(name):
    base = lr.MLP([5, 4, 3], seed=0)
    before = fingerprint(base)
    with pytest.raises(ValueError, match="adapter name"):
        lr.get_lora_model(base, CONFIG, adapter_name=name)
    after = fingerprint(base)
    assert before[1] == after[1] and all(n == m and t == u and np.array_equal(a, b)
                                         for (n, a, t), (m, b, u) in zip(before[0], after[0]))
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=0), CONFIG)
    with pytest.raises(ValueError, match="adapter name"):
        lm.add_adapter(name, CONFIG)
    assert list(lm.peft_config) == ["default"] and "lora_A" not in repr(lm).split("default")[-1]


@pytest.mark.parametrize("name", [None, 3, b"default", ("a",)])
def test_names_that_are_not_strings_are_a_type_error(name):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=0), CONFIG)
    with pytest.raises(TypeError, match="adapter name must be a str"):
        lm.add_adapter(name, CONFIG)


@pytest.mark.parametrize("name", ["default", "task_b", "A-1", "x" * 128])
def test_good_names_round_trip_with_their_tensors(tmp_path, name):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=0), CONFIG)
    lm.add_adapter(name, CONFIG) if name != "default" else None
    for p in adapter_parameters(lm, name).values():
        p.data = p.data + 1
    lm.save_pretrained(tmp_path, selected_adapters=[name])
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], seed=0), tmp_path if name == "default" else tmp_path / name)
    saved, back = adapter_parameters(lm, name), adapter_parameters(loaded, "default")
    assert len(saved) == 4 and set(back) == set(saved)                  # lora_A, lora_B, the head's weight and bias
    assert all(np.array_equal(back[k].data, saved[k].data) for k in saved)
