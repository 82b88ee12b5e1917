"""The ``lowrank`` command on bad input: one line on stderr, a non-zero exit, nothing lost,
and a bad flag refused before any training starts."""
import json

import numpy as np
import pytest

import lowrank as lr
from lowrank.app import cli
from lowrank.app import experiment
from lowrank.app import inspect as inspect_cli
from lowrank.app import train as train_cli
from lowrank.app.cli import main
from lowrank.io.model_files import save_model, tensor_file_bytes
from lowrank.tuners.lora.qlora import NF4Dense, quantize_model

D = 6
FLAGS = ["train", "--n-features", str(D), "--hidden", "16,12", "--n-samples", "300", "--epochs", "1",
         "--pretrain-epochs", "1", "--batch-size", "32", "--dtype", "float64", "--quiet"]


@pytest.fixture
def no_training(monkeypatch):
    """Make any pretraining a test failure: these flags must be refused before it."""
    def pretrain(cfg):
        raise AssertionError("training started before the flags were checked")
    monkeypatch.setattr(train_cli, "pretrain", pretrain)


def one_line_error(capsys, command="train") -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"lowrank {command}: error: ")
    assert "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_an_out_path_that_is_or_is_under_a_file_is_refused_before_training(tmp_path, capsys, no_training, where):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me\n")
    out = blocker if where == "file" else blocker / "run"
    assert main([*FLAGS, "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert f"--out {out}" in err and "not a directory" in err
    assert blocker.read_text() == "keep me\n"                      # nothing lost


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "0", "--lr must be a finite number > 0, got 0.0"),
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--n-features", "0", "--n-features must be >= 1, got 0"),
    ("--epochs", "0", "--epochs must be >= 1, got 0"),
    ("--alpha", "inf", "LoraConfig: lora_alpha must be a finite number, got inf"),
])
def test_zero_or_nonfinite_flags_are_refused_not_replaced(tmp_path, capsys, no_training, flag, value, message):
    assert main([*FLAGS, "--method", "lora", "--out", str(tmp_path / "run"), flag, value]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def nf4_base(tmp_path):
    model = quantize_model(lr.MLP([D, 16, 12, 1], dtype="float64", seed=0), skip=("4",), blocksize=16)
    path = tmp_path / "nf4.safetensors"
    save_model(model, path)
    return path


@pytest.mark.parametrize("method", ["lora", "qlora", "head"])
def test_a_4bit_base_written_by_save_model_is_accepted(tmp_path, method):
    path = nf4_base(tmp_path)
    out = tmp_path / method
    assert main([*FLAGS, "--method", method, "--r", "2", "--base", str(path), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["n_features"] == D and s["config"]["dtype"] == "float64"
    if method != "head":
        assert s["lora"]["target_modules"] == ["0", "2"]            # the 4-bit hidden layers: QLoRA
        assert s["trainable_params"] == 2 * (D + 16) + 2 * (16 + 12) + 13


@pytest.mark.parametrize("method", ["full", "adapter"])
def test_a_4bit_base_refuses_methods_that_need_float_weights(tmp_path, capsys, method):
    path = nf4_base(tmp_path)
    assert main([*FLAGS, "--method", method, "--base", str(path), "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert f"--method {method}" in err and "4-bit" in err and "['0', '2']" in err


@pytest.mark.parametrize("error, message", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (PermissionError(13, "Permission denied", "x/summary.json"), "Permission denied"),
    (MemoryError(), "out of memory"),
    (RecursionError("maximum recursion depth exceeded"), "nested too deeply"),
])
def test_os_memory_and_recursion_errors_are_one_line(monkeypatch, capsys, error, message):
    def run(args):
        raise error
    monkeypatch.setattr(inspect_cli, "run", run)
    assert main(["inspect", "anything"]) != 0
    assert message in one_line_error(capsys, "inspect")


def test_a_deeply_nested_config_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["inspect", str(tmp_path)]) != 0
    one_line_error(capsys, "inspect")


EVIL = "lora\x1b[2J\x1b[31mA\nB\r\x07"                               # clears the screen, fakes a line


def test_inspect_escapes_control_characters_in_names_and_metadata(tmp_path, capsys):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(tensor_file_bytes({EVIL: np.zeros(2, np.float32)}, {f"k{EVIL}": f"v{EVIL}"}))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert "lora\\x1b[2J\\x1b[31mA\\nB\\r\\x07" in out
    assert not any(line.startswith("B") for line in out.splitlines())
    assert "ΔW" == cli.printable("ΔW")                         # printable text is left alone


def test_inspect_escapes_control_characters_in_a_config(tmp_path, capsys):
    (tmp_path / "adapter_config.json").write_text(json.dumps({EVIL: 1, "r": 2}))
    (tmp_path / "adapter_model.safetensors").write_bytes(tensor_file_bytes({"w": np.zeros(1, np.float32)}))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "lora\\x1b[2J" in out


def test_python_m_lowrank_is_the_lowrank_command():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "lowrank", "generate", "--model", "/nonexistent", "--prompt", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "/nonexistent" in done.stderr
