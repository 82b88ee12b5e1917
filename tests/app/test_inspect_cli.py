"""``lowrank inspect``: what an adapter directory or a model file holds."""
import argparse
import json

import numpy as np
import pytest
import safetensors.numpy

import lowrank as lr
from lowrank.app import cli
from lowrank.app import inspect as inspect_cli
from lowrank.tuners.lora.save_and_load import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME
from lowrank.io.model_files import ARCH_KEY, FileFormatError, save_model, tensor_file_bytes


def inspect(path, capsys) -> str:
    parser = argparse.ArgumentParser()
    inspect_cli.add_arguments(parser)
    assert inspect_cli.run(parser.parse_args([str(path)])) == 0
    return capsys.readouterr().out


def test_registered_as_a_subcommand():
    assert cli.COMMANDS["inspect"][0] == "lowrank.app.inspect"


def test_adapter_directory(tmp_path, capsys):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3]), lr.LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"]))
    lm.add_adapter("task_b", lr.LoraConfig(r=1, target_modules=["0"]))
    lm.save_pretrained(tmp_path)
    out = inspect(tmp_path, capsys)
    assert '  lora_alpha: 6' in out and '  peft_type: "LORA"' in out and "lowrank loads this config: yes" in out
    for name, shape in [("0.lora_A.weight", (2, 5)), ("0.lora_B.weight", (4, 2)), ("2.lora_A.weight", (2, 4)),
                        ("2.lora_B.weight", (3, 2))]:
        line = next(l for l in out.splitlines() if f"base_model.model.{name} " in l)
        assert str(shape) in line and "float32" in line and f"{np.prod(shape):,d}" in line
    params = 2 * 5 + 4 * 2 + 2 * 4 + 3 * 2
    assert f"total: 4 tensors, {params:,d} parameters, {4 * params:,d} bytes" in out
    weights = tmp_path / ADAPTER_SAFE_WEIGHTS_NAME
    assert f"file {weights} ({weights.stat().st_size:,d} bytes)" in out
    assert "checksums verified" in out and "adapters in sub-directories: task_b" in out


def test_model_file_with_architecture(tmp_path, capsys):
    save_model(lr.MLP([5, 4, 3], "gelu_tanh"), tmp_path / "m.safetensors")
    out = inspect(tmp_path / "m.safetensors", capsys)
    assert "  model: Sequential" in out and "    1: GELU approximate=tanh" in out
    assert "    0: Dense bias=True dtype=float32 in_features=5 out_features=4" in out
    assert f"total: 4 tensors, {5 * 4 + 4 + 4 * 3 + 3:,d} parameters" in out
    (tmp_path / "odd.safetensors").write_bytes(tensor_file_bytes({}, {ARCH_KEY: '{"module": [1]}'}))
    assert "  model: [1]" in inspect(tmp_path / "odd.safetensors", capsys)


def test_a_foreign_file_with_nonfinite_values(tmp_path, capsys):
    safetensors.numpy.save_file({"w": np.array([1.0, np.nan]), "i": np.arange(3)}, tmp_path / "f.safetensors",
                                metadata={"format": "pt"})
    out = inspect(tmp_path / "f.safetensors", capsys)
    assert "metadata: format=pt; no checksums" in out and "NaN/Inf in: w" in out


def test_a_config_lowrank_refuses_is_shown_with_the_reason(tmp_path, capsys):
    config = {"peft_type": "LORA", "target_modules": ["0"], "lora_bias": True}
    (tmp_path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config))
    (tmp_path / ADAPTER_SAFE_WEIGHTS_NAME).write_bytes(tensor_file_bytes({}))
    out = inspect(tmp_path, capsys)
    assert "lora_bias: true" in out and "lowrank loads this config: no: lora_bias=true means a trainable bias" in out
    (tmp_path / ADAPTER_CONFIG_NAME).write_text("[1]")
    assert "  <not an object>: [1]" in inspect(tmp_path, capsys)


@pytest.mark.parametrize("case", ["no config", "bad json", "bad arch", "no file"])
def test_unreadable_inputs_raise_file_format_error(tmp_path, case):
    path = tmp_path
    if case == "bad json":
        (tmp_path / ADAPTER_CONFIG_NAME).write_text("{oops")
    elif case == "bad arch":
        path = tmp_path / "m.safetensors"
        path.write_bytes(tensor_file_bytes({}, {ARCH_KEY: "{oops"}))
    elif case == "no file":
        path = tmp_path / "missing.safetensors"
    with pytest.raises(FileFormatError, match="not found|not valid JSON"):
        inspect_cli.run(argparse.Namespace(path=str(path)))
