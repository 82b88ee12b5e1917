"""``lowrank train`` on one process: tiny sizes, checked against closed-form parameter counts
and against the files it writes (reloaded here, the test accuracy recomputed)."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from lowrank.app.cli import main
from lowrank.app import experiment
from lowrank.app.experiment import DemoConfig, downstream, task_spec
from lowrank.training.data import make_task
from lowrank.io.model_files import load_model
from lowrank.tuners.lora.model import LoraModel

D, H1, H2 = 6, 16, 12                                    # sizes [D, H1, H2, 1]
FLAGS = ["train", "--n-features", str(D), "--hidden", f"{H1},{H2}", "--n-samples", "300", "--epochs", "2",
         "--pretrain-epochs", "3", "--batch-size", "32", "--dtype", "float64"]
DENSE = (D * H1 + H1) + (H1 * H2 + H2) + (H2 + 1)      # every weight and bias of the MLP
HEAD = H2 + 1


def train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    assert main([*FLAGS, "--out", str(out), *extra]) == 0
    return out, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("train"), "--method", "lora", "--r", "2")


def test_lora_counts_r_times_in_plus_out_per_layer_plus_the_head(lora_run):
    _, s = lora_run
    r = 2
    assert s["trainable_params"] == r * (D + H1) + r * (H1 + H2) + HEAD
    assert s["all_params"] == DENSE + r * (D + H1) + r * (H1 + H2) + HEAD     # the head's trainable copy
    assert s["lora"] == {"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["0", "2"]}
    assert s["ranks"] == 1 and s["seconds_per_epoch"] > 0 and len(s["train_loss"]) == 2


def test_the_written_base_and_adapter_reproduce_the_reported_accuracy(lora_run):
    out, s = lora_run
    cfg = DemoConfig(**{**s["config"], "hidden": tuple(s["config"]["hidden"]), "ranks": tuple(s["config"]["ranks"])})
    ds = downstream(cfg, make_task(task_spec(cfg)))
    model = LoraModel.from_pretrained(load_model(out / "base.safetensors"), out / "adapter")
    assert experiment.test_accuracy(model, ds) == s["test_acc"]
    assert experiment.test_accuracy(load_model(out / "base.safetensors"), ds) == s["base_test_acc"]
    assert s["files"] == {"summary": str(out / "summary.json"), "base": str(out / "base.safetensors"),
                          "adapter": str(out / "adapter")}


def test_a_base_file_replays_the_same_run(lora_run, tmp_path):
    first, s1 = lora_run
    out, s2 = train(tmp_path, "--method", "lora", "--r", "2", "--base", str(first / "base.safetensors"),
                    "--hidden", "1")                     # ignored: the architecture comes from the file
    assert s2["test_acc"] == s1["test_acc"] and s2["train_loss"] == s1["train_loss"]
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (first, out))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert "base" not in s2["files"] and s2["base_file"] == str(first / "base.safetensors")


def bottleneck(width, m=DemoConfig.bottleneck):
    """Houlsby adapter after a hidden layer: down (m, width) + m, up (width, m) + width."""
    return (m * width + m) + (width * m + width)


@pytest.mark.parametrize("method, trainable", [("full", DENSE), ("head", HEAD),
                                               ("adapter", bottleneck(H1) + bottleneck(H2) + HEAD)])
def test_other_methods_train_their_closed_form_parameter_counts(tmp_path, capsys, method, trainable):
    out, s = train(tmp_path, "--method", method)
    assert s["trainable_params"] == trainable
    assert "lora" not in s and not (out / "adapter").exists()
    assert f"lowrank train: {method} on moons, 1 rank(s)" in capsys.readouterr().out


def test_lora_flags_reach_the_adapter_config(tmp_path, capsys):
    out, s = train(tmp_path, "--method", "lora", "--r", "1", "--alpha", "3", "--dropout", "0.1",
                   "--target-modules", "0", "--quiet")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["target_modules"]) == (1, 3, 0.1, ["0"])
    assert s["trainable_params"] == 1 * (D + H1) + HEAD
    assert capsys.readouterr().out == ""                        # --quiet


@pytest.mark.parametrize("extra, message", [
    (["--hidden", "8,x"], "--hidden must be comma-separated integers"),
    (["--hidden", "8,0"], "--hidden widths must be >= 1"),
    (["--base", "no-such-file.safetensors"], "file not found"),
    (["--r", "0"], "r must be"),
])
def test_bad_flags_exit_2_with_the_reason(tmp_path, capsys, extra, message):
    assert main([*FLAGS, "--out", str(tmp_path / "bad"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_base_of_another_width_is_refused(lora_run, tmp_path, capsys):
    first, _ = lora_run
    code = main([*FLAGS, "--out", str(tmp_path / "bad"), "--base", str(first / "base.safetensors"),
                 "--n-features", str(D + 1)])
    assert code == 2
    assert f"--n-features {D + 1} does not match the --base model's input width {D}" in capsys.readouterr().err


def test_all_linear_adapts_every_dense_layer_but_the_saved_head(tmp_path):
    out, _ = train(tmp_path, "--method", "lora", "--r", "1", "--target-modules", "all-linear", "--quiet")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["0", "2"] and config["modules_to_save"] == ["4"]


def test_qlora_takes_the_lora_flags_and_writes_its_adapter(tmp_path):
    out, _ = train(tmp_path, "--method", "qlora", "--r", "1", "--alpha", "3", "--quiet")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 1 and config["lora_alpha"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lora"]["r"] == 1
