"""Saves that are killed at a chosen point or race another writer: the folder always holds one
complete save (config and tensors from the same one), and a mix that a power cut or a foreign
writer leaves behind is refused at load, naming both files."""
import json
import multiprocessing
import os
import random
import re
import signal
import time

import numpy as np
import pytest
import safetensors.numpy

import lowrank as lr
from lowrank.io import atomic
from lowrank.tuners.lora.save_and_load import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, adapter_parameters
from lowrank.io.atomic import LOCK_NAME, commit_files
from lowrank.io.model_files import FileFormatError, tensor_file_bytes

FORK = multiprocessing.get_context("fork")
LEFTOVER = re.compile(r"\..+\.(tmp|bak)-[0-9a-f]{8}")


def adapters(seed: int, alpha: int = 3) -> lr.LoraModel:
    """Two adapters ("default" in the root, "task_b" in a sub-folder) whose values depend on ``seed``."""
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=0), lr.LoraConfig(r=2, lora_alpha=alpha, target_modules=["0"]))
    lm.add_adapter("task_b", lr.LoraConfig(r=1, lora_alpha=alpha, target_modules=["2"]))
    rng = np.random.default_rng(seed)
    for name in lm.peft_config:
        for p in adapter_parameters(lm, name).values():
            p.data = rng.normal(size=p.shape).astype(p.dtype)
    return lm


def contents(d) -> dict:
    """Every file under ``d`` (the lock file aside) -> its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def failing_step(monkeypatch, n):
    """Make the n-th file-system step of a commit (write, link, rename, fsync) raise, as a crash would."""
    calls = []
    for module, name in ((atomic.os, "replace"), (atomic.os, "link"), (atomic.os, "fsync"), (atomic, "write_temp")):
        real = getattr(module, name)

        def patched(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == n:
                raise OSError(f"simulated crash at step {n} ({_name})")
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, patched)
    return calls


def test_a_multi_adapter_save_is_all_or_nothing_at_every_step(tmp_path, monkeypatch):
    adapters(seed=1).save_pretrained(tmp_path)
    old = contents(tmp_path)
    new_model = adapters(seed=2, alpha=4)
    adapters(seed=1).save_pretrained(tmp_path / "probe")
    steps = failing_step(monkeypatch, 0)                 # the steps of an overwriting save, as below
    new_model.save_pretrained(tmp_path / "probe", overwrite=True)
    monkeypatch.undo()
    new = {k.removeprefix("probe/"): v for k, v in contents(tmp_path / "probe").items()}
    assert set(new) == set(old) and all(new[k] != old[k] for k in new)
    # so a crash lands after every write, backup link and rename: between any two files of any adapter
    assert steps.count("write_temp") == steps.count("link") == steps.count("replace") == len(new) >= 4, steps
    for n in range(1, len(steps) + 1):
        failing_step(monkeypatch, n)
        try:
            new_model.save_pretrained(tmp_path, overwrite=True)
            failed = False
        except OSError:
            failed = True
        monkeypatch.undo()
        now = {k: v for k, v in contents(tmp_path).items() if not k.startswith("probe")}
        assert now == (old if failed else new), f"crash at step {n} ({steps[n - 1]}) left a mix"
        if now == new:
            adapters(seed=1).save_pretrained(tmp_path, overwrite=True)


def test_overwrite_false_refuses_a_target_that_appears_after_the_check(tmp_path, monkeypatch):
    real = atomic.write_temp

    def another_writer_gets_there_first(target, data):
        if not (tmp_path / "b").exists():
            (tmp_path / "b").write_bytes(b"the other writer's file")
        return real(target, data)
    monkeypatch.setattr(atomic, "write_temp", another_writer_gets_there_first)
    with pytest.raises(FileExistsError, match=r"refusing to overwrite \[.*/b'\]: it appeared while saving"):
        commit_files(tmp_path, {"a": b"mine", "b": b"mine too"})
    assert (tmp_path / "b").read_bytes() == b"the other writer's file"
    assert not (tmp_path / "a").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]                # the lock file goes with the lock


def _save_forever(path, seed, barrier, rounds):
    random.seed(seed)
    lm = adapters(seed=seed, alpha=seed)
    for _ in range(rounds):
        barrier.wait()
        lm.save_pretrained(path, overwrite=True)
        barrier.wait()


def _slow(real):
    def replace(*args, **kwargs):
        time.sleep(random.uniform(0, 0.004))      # widen the windows between renames, unevenly
        return real(*args, **kwargs)
    return replace


def test_two_processes_saving_at_once_leave_one_complete_save(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "replace", _slow(os.replace))          # inherited by the forked writers
    expected = {seed: adapters(seed=seed, alpha=seed) for seed in (5, 6)}
    rounds, barrier = 12, FORK.Barrier(3)
    writers = [FORK.Process(target=_save_forever, args=(tmp_path, seed, barrier, rounds)) for seed in expected]
    for w in writers:
        w.start()
    monkeypatch.undo()
    try:
        for _ in range(rounds):
            barrier.wait(30)                      # both writers save...
            barrier.wait(30)                      # ...and are done: check before the next round
            for directory, name in ((tmp_path, "default"), (tmp_path / "task_b", "task_b")):
                alpha = json.loads((directory / ADAPTER_CONFIG_NAME).read_text())["lora_alpha"]
                tensors = safetensors.numpy.load_file(directory / ADAPTER_SAFE_WEIGHTS_NAME)
                want = adapter_parameters(expected[alpha], name)
                assert all(np.array_equal(tensors[k], p.data) for k, p in want.items()), "config and tensors disagree"
            assert not [p for p in tmp_path.rglob(".*") if LEFTOVER.fullmatch(p.name)]
    except BaseException:
        barrier.abort()                           # release the writers
        raise
    finally:
        for w in writers:
            w.join(10)
    assert [w.exitcode for w in writers] == [0, 0]


def _killed_between_the_renames(path):
    real, calls = os.replace, []

    def replace(*args):
        calls.append(1)
        if len(calls) == 2:                       # the weights are in place, the config is not yet
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    atomic.os.replace = replace
    adapters(seed=2, alpha=4).save_pretrained(path, selected_adapters=["default"], overwrite=True)


def test_a_save_killed_between_renames_is_refused_then_cleaned_up(tmp_path):
    adapters(seed=1).save_pretrained(tmp_path, selected_adapters=["default"])
    child = FORK.Process(target=_killed_between_the_renames, args=(tmp_path,))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if LEFTOVER.fullmatch(p.name)]
    assert leftovers                                  # the killed save's temporaries and backups
    with pytest.raises(FileFormatError,
                       match=f"{ADAPTER_SAFE_WEIGHTS_NAME}.*{ADAPTER_CONFIG_NAME}.*two different saves"):
        lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], seed=0), tmp_path)
    (tmp_path / ".notes.tmp-zz").write_text("not ours")          # not the project's pattern: kept
    (tmp_path / "keep.tmp-0123abcd").write_text("not hidden: kept")
    adapters(seed=3).save_pretrained(tmp_path, selected_adapters=["default"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".notes.tmp-zz", "keep.tmp-0123abcd", ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME])
    loaded = lr.LoraModel.from_pretrained(lr.MLP([5, 4, 3], seed=0), tmp_path)
    want = adapter_parameters(adapters(seed=3), "default")
    assert all(np.array_equal(p.data, want[k].data) for k, p in adapter_parameters(loaded, "default").items())


def test_config_and_tensors_of_two_saves_are_refused_unless_unbound(tmp_path):
    adapters(seed=1, alpha=3).save_pretrained(tmp_path / "a", selected_adapters=["default"])
    adapters(seed=2, alpha=4).save_pretrained(tmp_path / "b", selected_adapters=["default"])
    (tmp_path / "a" / ADAPTER_SAFE_WEIGHTS_NAME).write_bytes((tmp_path / "b" / ADAPTER_SAFE_WEIGHTS_NAME).read_bytes())
    model = lr.MLP([5, 4, 3], seed=0)
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(FileFormatError,
                       match=f"{tmp_path / 'a' / ADAPTER_SAFE_WEIGHTS_NAME}.*{tmp_path / 'a' / ADAPTER_CONFIG_NAME}"):
        lr.LoraModel.from_pretrained(model, tmp_path / "a")
    assert all(np.array_equal(a, p.data) for a, p in zip(before, model.parameters()))
    tensors = safetensors.numpy.load_file(tmp_path / "b" / ADAPTER_SAFE_WEIGHTS_NAME)   # as PEFT writes it: no binding
    (tmp_path / "a" / ADAPTER_SAFE_WEIGHTS_NAME).write_bytes(safetensors.numpy.save(tensors, metadata={"format": "pt"}))
    loaded = lr.LoraModel.from_pretrained(model, tmp_path / "a")
    assert loaded.peft_config["default"].lora_alpha == 3


def test_files_lowrank_writes_are_read_by_safetensors(tmp_path):
    data = tensor_file_bytes({"x": np.ones(3, np.float32)})
    (tmp_path / "t.safetensors").write_bytes(data)
    assert np.array_equal(safetensors.numpy.load_file(tmp_path / "t.safetensors")["x"], np.ones(3, np.float32))
