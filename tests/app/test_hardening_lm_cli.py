"""``lowrank lm`` output folders: --out is checked before training (an earlier run's outputs
are replaced only with --overwrite; an unwritable or wrong-kind output is refused), a bad --seed is
named, and a finetune run's adapter and summary.json are committed as one: a run killed at any step
leaves the old run, the new run, or an adapter that is refused at load, never an r = 8 adapter
beside an r = 4 summary."""
import json
import multiprocessing
import os
import signal
from types import SimpleNamespace

import pytest

import lowrank as lr
from lowrank.app import lm_finetune, lm_pretrain, train
from lowrank.app.cli import main
from lowrank.io.tensor_files import FileFormatError

FORK = multiprocessing.get_context("fork")
PRETRAIN = ["lm", "pretrain", "--quick", "--steps", "2", "--eval-every", "2", "--eval-windows", "2",
            "--batch-size", "2", "--seq-len", "16", "--threads", "1", "--quiet"]
FINETUNE = ["lm", "finetune", "--steps", "2", "--eval-every", "2", "--eval-windows", "2", "--batch-size", "2",
            "--seq-len", "16", "--threads", "1", "--quiet"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowrank lm: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Training fails the test: every refusal here must come before it."""
    def trained(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(lm_pretrain, "train_steps", trained)
    monkeypatch.setattr(lm_finetune, "finetune", trained)


@pytest.mark.parametrize("command", [PRETRAIN, FINETUNE])
def test_a_negative_seed_is_named(tmp_path, capsys, no_training, command):
    assert main([*command, "--seed", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "--seed must be >= 0, got -1" in one_line_error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, earlier", [(PRETRAIN, "config.json"), (FINETUNE, "summary.json")])
def test_an_earlier_run_is_kept_unless_overwrite(tmp_path, capsys, no_training, command, earlier):
    (tmp_path / earlier).write_text("an earlier run")
    assert main([*command, "--out", str(tmp_path)]) == 2
    assert f"holds {tmp_path / earlier} from an earlier run; pass --overwrite" in one_line_error(capsys)
    assert (tmp_path / earlier).read_text() == "an earlier run"


def test_an_unwritable_or_wrong_kind_output_is_refused_before_training(tmp_path, capsys, no_training, monkeypatch):
    (tmp_path / "adapter").mkdir()
    real = os.access
    monkeypatch.setattr(train.os, "access", lambda p, mode: False if str(p).endswith("adapter") else real(p, mode))
    assert main([*FINETUNE, "--out", str(tmp_path), "--overwrite"]) == 2
    assert f"{tmp_path / 'adapter'} is not writable" in one_line_error(capsys)
    monkeypatch.undo()
    (tmp_path / "adapter").rmdir()
    (tmp_path / "adapter").write_text("a file where the adapter folder goes")
    assert main([*FINETUNE, "--out", str(tmp_path), "--overwrite"]) == 2
    assert f"{tmp_path / 'adapter'} is a file" in one_line_error(capsys)


# -- a finetune run's outputs, killed at every step ---------------------------------------------
def base() -> lr.LlamaForCausalLM:
    config = lr.LlamaConfig(vocab_size=19, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16)
    return lr.LlamaForCausalLM(config, seed=0)


def run_outputs(r: int):
    """(args, summary, model) of a finished lora run of rank ``r``, as ``lm_finetune.run`` hands them on."""
    model = lm_finetune.build_model(base(), "lora", lm_finetune.lora_config("lora", "q_proj,v_proj", r))
    return SimpleNamespace(method="lora", overwrite=True), {"lora": {"r": r}}, model


def _write_killed_at(out, n, counter):
    args, summary, model = run_outputs(8)
    args.out, steps = str(out), []
    for name in ("replace", "link", "rename", "unlink", "fsync"):
        real = getattr(os, name)

        def step(*a, _real=real, **kw):
            steps.append(1)
            if len(steps) == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*a, **kw)
        setattr(os, name, step)
    lm_finetune.write_outputs(args, summary, model)
    counter.value = len(steps)


def kill_at(out, n):
    counter = FORK.Value("i", -1)
    child = FORK.Process(target=_write_killed_at, args=(out, n, counter))
    child.start()
    child.join(60)
    return child.exitcode, counter.value


def written_r(out) -> tuple[int, int] | None:
    """(r of the adapter that loads, r in summary.json), or None when the adapter is refused."""
    try:
        loaded = lr.LoraModel.from_pretrained(base(), out / "adapter")
    except FileFormatError as e:
        assert "two different saves" in str(e), str(e)
        return None
    return loaded.peft_config["default"].r, json.loads((out / "summary.json").read_text())["lora"]["r"]


def test_a_finetune_run_killed_at_every_step_leaves_one_run_or_is_refused(tmp_path):
    args, summary, model = run_outputs(4)
    args.out = str(tmp_path / "probe")
    lm_finetune.write_outputs(args, summary, model)
    code, steps = kill_at(tmp_path / "probe", 0)              # the steps of a run over an earlier one
    assert code == 0 and written_r(tmp_path / "probe") == (8, 8) and steps >= 8
    outcomes = []
    for n in range(1, steps + 1):
        out = tmp_path / f"kill{n}"
        args, summary, model = run_outputs(4)
        args.out = str(out)
        lm_finetune.write_outputs(args, summary, model)
        assert kill_at(out, n)[0] == -signal.SIGKILL
        outcome = written_r(out)
        assert outcome in (None, (4, 4), (8, 8)), f"killed at step {n}: adapter r, summary r = {outcome}"
        outcomes.append(outcome)
    assert {None, (4, 4), (8, 8)} <= set(outcomes), outcomes
