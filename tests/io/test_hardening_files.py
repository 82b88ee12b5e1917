"""Files under stress: a junk header is refused before the data is read and never echoed;
a good file is mapped, not copied; a model folder binds its config and extra files to its tensors;
a save killed at any step leaves the old folder, the new one, or a folder that is refused at load;
no lock file is left behind, and the lock still excludes a second writer."""
import json
import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest

import lowrank as lr
from benchmarks.harness import peak_bytes
from lowrank.io import atomic, tensor_files
from lowrank.io.tensor_files import FileFormatError, read_tensor_file, tensor_file_bytes

FORK = multiprocessing.get_context("fork")
MiB = 1 << 20
CONFIG, WEIGHTS, ARGS = "config.json", "model.safetensors", "training_args.json"


# -- reading: the header first, no copies, no echo --------------------------------------------
def test_a_junk_header_is_refused_before_the_data_is_read(tmp_path):
    path = tmp_path / "junk.safetensors"
    with open(path, "wb") as f:
        f.write((64).to_bytes(8, "little") + b"\x00not json" + b" " * 55)
        f.truncate(256 * MiB)                                  # sparse: the data costs no disk
    def read():
        with pytest.raises(FileFormatError, match="header is not JSON"):
            read_tensor_file(path)
    assert peak_bytes(read) < 1 * MiB                         # the whole file would be 256 MiB (twice, copied)


def test_reading_maps_the_tensors_without_copying_them(tmp_path):
    w = np.random.default_rng(0).normal(size=(4096, 2048)).astype(np.float32)     # 32 MiB
    path = tmp_path / "w.safetensors"
    path.write_bytes(tensor_file_bytes({"w": w, "b": np.arange(3, dtype=np.int64)}))
    got = {}
    peak = peak_bytes(lambda: got.update(read_tensor_file(path)[0]))
    assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB allocated to read a {w.nbytes / MiB:.0f} MiB tensor"
    np.testing.assert_array_equal(got["w"], w)
    assert got["w"].flags.writeable
    got["w"][0, 0] = 123.0                                     # copy-on-write: the file keeps its bytes
    np.testing.assert_array_equal(read_tensor_file(path)[0]["w"], w)


def test_a_file_system_that_cannot_map_files_is_read_once(tmp_path, monkeypatch):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    (tmp_path / "w.safetensors").write_bytes(tensor_file_bytes({"w": w}))

    def no_map(*args, **kwargs):
        raise OSError("mmap: operation not supported")
    monkeypatch.setattr(tensor_files.mmap, "mmap", no_map)
    got = read_tensor_file(tmp_path / "w.safetensors")[0]["w"]
    np.testing.assert_array_equal(got, w)
    assert got.flags.writeable


@pytest.mark.parametrize("start, hidden", [
    (b"SECRET!!", str(int.from_bytes(b"SECRET!!", "little"))),       # the 8 bytes read as a length
    ((5).to_bytes(8, "little") + b"{\xff}  ", "0xff"),                # a byte the UTF-8 decoder would quote
])
def test_errors_never_echo_the_bytes_of_a_file_that_is_not_safetensors(tmp_path, start, hidden):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(start + b"x" * 64)
    with pytest.raises(FileFormatError, match="not a valid safetensors file") as info:
        read_tensor_file(path)
    assert hidden not in str(info.value) and "SECRET" not in str(info.value) and str(path) in str(info.value)


# -- model folders: bound to their tensors, committed as one --------------------------------
def tiny_llama(seed: int, eps: float = 1e-5) -> lr.LlamaForCausalLM:
    config = lr.LlamaConfig(vocab_size=19, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=16, rms_norm_eps=eps)
    return lr.LlamaForCausalLM(config, seed=seed)


def save(model, folder, run: str, overwrite=True):
    model.save_pretrained(folder, overwrite=overwrite, extra_files={ARGS: json.dumps({"run": run}).encode()})


def folder_bytes(folder) -> dict:
    return {name: (folder / name).read_bytes() for name in (CONFIG, WEIGHTS, ARGS)}


def test_a_config_from_another_save_is_refused(tmp_path):
    save(tiny_llama(1, eps=1e-5), tmp_path / "a", "a")
    save(tiny_llama(2, eps=1e-6), tmp_path / "b", "b")        # same shapes: only the bytes can tell
    (tmp_path / "a" / CONFIG).write_bytes((tmp_path / "b" / CONFIG).read_bytes())
    with pytest.raises(FileFormatError, match=f"{tmp_path / 'a' / WEIGHTS}.*{tmp_path / 'a' / CONFIG}.*two different"):
        lr.LlamaForCausalLM.from_pretrained(tmp_path / "a")


def test_training_args_from_another_save_are_refused(tmp_path):
    save(tiny_llama(1), tmp_path / "a", "a")
    (tmp_path / "a" / ARGS).write_text(json.dumps({"run": "older"}))
    with pytest.raises(FileFormatError, match=f"{tmp_path / 'a' / ARGS}.*two different saves"):
        lr.LlamaForCausalLM.from_pretrained(tmp_path / "a")


def _save_killed_at(folder, n, counter):
    """Save the "new" model, SIGKILLing this process at the n-th file-system step (0: never)."""
    model, steps = tiny_llama(2, eps=1e-6), []
    for name in ("replace", "link", "rename", "unlink", "fsync"):
        real = getattr(os, name)

        def step(*args, _real=real, **kwargs):
            steps.append(1)
            if len(steps) == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)
        setattr(os, name, step)
    save(model, folder, "new")
    counter.value = len(steps)


def kill_at(folder, n) -> tuple[int, int]:
    counter = FORK.Value("i", -1)
    child = FORK.Process(target=_save_killed_at, args=(folder, n, counter))
    child.start()
    child.join(60)
    return child.exitcode, counter.value


def test_a_model_folder_save_killed_at_every_step_is_old_new_or_refused(tmp_path):
    save(tiny_llama(1, eps=1e-5), tmp_path / "old", "old")
    save(tiny_llama(2, eps=1e-6), tmp_path / "new", "new")
    old, new = folder_bytes(tmp_path / "old"), folder_bytes(tmp_path / "new")
    save(tiny_llama(1, eps=1e-5), tmp_path / "probe", "old")
    code, steps = kill_at(tmp_path / "probe", 0)               # the steps of an overwriting save
    assert code == 0 and steps >= 12                           # writes, backups, journal, renames, clean-up
    outcomes = []
    for n in range(1, steps + 1):
        folder = tmp_path / f"kill{n}"
        save(tiny_llama(1, eps=1e-5), folder, "old")
        code, _ = kill_at(folder, n)
        assert code == -signal.SIGKILL, n
        try:
            loaded = lr.LlamaForCausalLM.from_pretrained(folder)
        except FileFormatError as e:
            assert "two different saves" in str(e), (n, str(e))
            outcomes.append("refused")
            atomic.finish_interrupted_commits(folder)          # what the next save does first
            assert folder_bytes(folder) == new, f"killed at step {n}: not finished"
            continue
        now = folder_bytes(folder)
        assert now in (old, new), f"killed at step {n}: a silent mix"
        assert loaded.config.rms_norm_eps == (1e-5 if now == old else 1e-6)
        outcomes.append("old" if now == old else "new")
    assert {"old", "refused"} <= set(outcomes), outcomes


# -- the lock -------------------------------------------------------------------------------
def test_no_lock_file_is_left_behind(tmp_path):
    save(tiny_llama(1), tmp_path / "m", "m")
    atomic.commit_files(tmp_path / "f", {"a": b"1", "b": b"2"})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG, WEIGHTS, ARGS]
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["a", "b"]


def test_where_flock_is_missing_filelock_locks_and_its_file_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "fcntl", None)                 # as on Windows
    atomic.commit_files(tmp_path, {"a": b"1", "b": b"2"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [atomic.LOCK_NAME, "a", "b"]


def test_the_lock_excludes_a_second_holder_though_its_file_is_deleted(tmp_path):
    inside, overlaps = [], []

    def worker():
        for _ in range(150):
            with atomic._locked(tmp_path):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                os.sched_yield()
                inside.pop()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not overlaps and not (tmp_path / atomic.LOCK_NAME).exists()


def test_a_run_commits_as_one_or_not_at_all(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic.one_commit(tmp_path / "run"):
            save(tiny_llama(1), tmp_path / "run" / "model", "run")
            raise KeyboardInterrupt                            # before summary.json: nothing may be written
    assert not (tmp_path / "run" / "model").exists()
    with atomic.one_commit(tmp_path / "run"):
        save(tiny_llama(1), tmp_path / "run" / "model", "run")
        with atomic.one_commit(tmp_path / "run" / "model"):     # nested: part of the same commit
            atomic.commit_files(tmp_path / "run" / "model", {"notes.txt": b"n"})
        assert not (tmp_path / "run" / "model").exists()       # nothing until the block ends
        atomic.commit_files(tmp_path / "run", {"summary.json": b"{}"})
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model", "summary.json"]
    assert sorted(p.name for p in (tmp_path / "run" / "model").iterdir()) == [CONFIG, WEIGHTS, "notes.txt", ARGS]


def test_a_live_writer_is_waited_for_and_a_foreign_journal_renames_nothing(tmp_path):
    save(tiny_llama(1), tmp_path, "m")
    journal = tmp_path / atomic.JOURNAL_NAME
    journal.write_text(json.dumps({"renames": [[CONFIG, f".{CONFIG}.tmp-0123abcd"]]}))
    done = []
    with atomic._locked(tmp_path):                             # a writer between its journal and its last rename
        reader = threading.Thread(target=lambda: done.append(read_tensor_file(tmp_path / WEIGHTS)))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not done
        journal.unlink()                                       # ... which finishes
    reader.join(30)
    assert done
    (tmp_path / "victim").write_text("keep")
    journal.write_text(json.dumps({"renames": [["/etc/passwd", f".passwd.tmp-0123abcd"], ["../x", ".x.tmp-0123abcd"],
                                               [CONFIG, "victim"], "junk"]}))
    atomic.finish_interrupted_commits(tmp_path)
    assert (tmp_path / "victim").read_text() == "keep" and not journal.exists()
    lr.LlamaForCausalLM.from_pretrained(tmp_path)
