"""A crash mid-save leaves the previous files intact; a failed model change is undone exactly."""
import os

import numpy as np
import pytest

import lowrank as lr
from lowrank.tuners.lora import save_and_load
from lowrank.io import atomic
from lowrank.tuners.lora.save_and_load import ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME
from lowrank.io.atomic import LOCK_NAME, atomic_write_bytes, commit, commit_files
from lowrank.nn.snapshot import all_or_nothing


def listing(d):
    """The files in ``d``, a lock file aside (a writer killed holding the lock leaves it: see atomic's docstring)."""
    return sorted(p.name for p in d.iterdir() if p.name != LOCK_NAME)


def test_commit_writes_and_refuses_to_overwrite(tmp_path):
    commit_files(tmp_path / "new" / "deeper", {"a": b"1", "b": b"22"})
    assert (tmp_path / "new" / "deeper" / "b").read_bytes() == b"22"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        commit_files(tmp_path / "new" / "deeper", {"c": b"3", "a": b"x"})
    assert listing(tmp_path / "new" / "deeper") == ["a", "b"]
    atomic_write_bytes(tmp_path / "new" / "deeper" / "a", b"new", overwrite=True)
    assert (tmp_path / "new" / "deeper" / "a").read_bytes() == b"new"


def failing_nth(monkeypatch, module, name, n):
    """Make ``module.name`` raise on its n-th call (1-based), as a crash at that point would."""
    real, calls = getattr(module, name), []

    def patched(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise OSError(f"simulated crash in {name}")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, patched)


@pytest.mark.parametrize("where,n", [("replace", 1), ("replace", 2), ("fsync", 1), ("fsync", 2), ("link", 2)])
def test_a_crash_mid_commit_keeps_the_previous_files(tmp_path, monkeypatch, where, n):
    commit_files(tmp_path, {"weights": b"old weights", "config": b"old config"})
    failing_nth(monkeypatch, atomic.os, where, n)
    with pytest.raises(OSError, match="simulated crash"):
        commit_files(tmp_path, {"weights": b"new weights", "config": b"new config"}, overwrite=True)
    monkeypatch.undo()
    assert (tmp_path / "weights").read_bytes() == b"old weights"
    assert (tmp_path / "config").read_bytes() == b"old config"
    assert listing(tmp_path) == ["config", "weights"]          # no temporaries or backups left behind


def test_a_crash_in_a_new_directory_leaves_nothing_but_the_lock(tmp_path, monkeypatch):
    failing_nth(monkeypatch, atomic.os, "link", 2)             # new files are linked into place
    with pytest.raises(OSError):
        commit(tmp_path / "fresh", {tmp_path / "fresh" / "a": b"1", tmp_path / "fresh" / "sub" / "b": b"2"})
    assert listing(tmp_path / "fresh") == []                    # the new sub-folder is gone too
    with pytest.raises(ValueError, match="not inside"):
        commit(tmp_path / "fresh", {tmp_path / "elsewhere": b"1"})


def test_a_crash_while_saving_an_adapter_keeps_the_previous_one(tmp_path, monkeypatch):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=0), lr.LoraConfig(r=1, target_modules=["0"]))
    lm.add_adapter("b", lr.LoraConfig(r=2, target_modules=["2"]))
    lm.save_pretrained(tmp_path)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    lm.model[0].lora_B["default"].data += 1
    calls = []

    def tensor_write_crashes(tensors, metadata=None):
        calls.append(1)
        if len(calls) == 2:                                     # the second adapter's tensors
            raise MemoryError("simulated crash while serialising tensors")
        return b"never written"
    monkeypatch.setattr(save_and_load, "tensor_file_bytes", tensor_write_crashes)
    with pytest.raises(MemoryError):
        lm.save_pretrained(tmp_path, overwrite=True)
    monkeypatch.undo()
    failing_nth(monkeypatch, atomic.os, "replace", 2)           # the first adapter's config rename
    with pytest.raises(OSError):
        lm.save_pretrained(tmp_path, overwrite=True)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before
    assert listing(tmp_path) == [ADAPTER_CONFIG_NAME, ADAPTER_SAFE_WEIGHTS_NAME, "b"]


def test_all_or_nothing_restores_structure_values_flags_and_rng(rng):
    lm = lr.get_lora_model(lr.MLP([5, 4, 3], seed=1), lr.LoraConfig(r=1, target_modules=["0"], lora_dropout=0.5))
    params = list(lm.named_parameters())
    state = [(n, p, p.data, p.trainable) for n, p in params]
    text, x = repr(lm), rng.normal(size=(3, 5)).astype(np.float32)
    layer = lm.model[0]
    rng_state = layer._rng.bit_generator.state
    with pytest.raises(KeyboardInterrupt):
        with all_or_nothing(lm):
            lm.add_adapter("b", lr.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
            lm.model[0].weight.data = lm.model[0].weight.data * 0
            lm.model[0].lora_A["default"].trainable = False
            lm.eval()
            raise KeyboardInterrupt
    assert [(n, p, p.data, p.trainable) for n, p in lm.named_parameters()] == state
    assert repr(lm) == text and lm.model[0] is layer and lm.training and list(lm.peft_config) == ["default"]
    assert layer._rng.bit_generator.state == rng_state
    with all_or_nothing(lm):                                      # no error: changes stay
        lm.add_adapter("c", lr.LoraConfig(r=1, target_modules=["2"]))
    assert "c" in lm.peft_config and lm(x).shape == (3, 3)


def test_fsync_of_a_directory_that_cannot_be_opened_is_skipped(tmp_path, monkeypatch):
    def no_open(*args):
        raise PermissionError("directories can't be opened here")
    monkeypatch.setattr(atomic.os, "open", no_open)
    atomic._fsync_dir(tmp_path)
    assert os.path.isdir(tmp_path)
