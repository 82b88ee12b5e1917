"""Data-parallel training over MPI: tests/mpi_worker.py runs under ``mpiexec -n 2`` and these
tests compare what it wrote with single-process training computed here.

    exactness   Σ_k (n_k/n)·g_k = g: same seed and global batches → the same parameters as
                lowrank.training.loop.fit to float64 rounding, even and uneven shards, LoRA and full
    traffic     one Allreduce per step of (2 + P + Σ_p size_p) × 8 bytes (the 2 + P header:
                error count, loss sum, one has-gradient count per trainable parameter)
    failure     a rank that raises stops every rank with its message (a timeout turns a hang into a failure)
"""
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lowrank as lr
from conftest import needs_mpi
from conftest import mpirun as conftest_mpirun
from lowrank.training.distributed import DataParallel, shard_bounds, allreduce_nbytes

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "mpi_worker.py")
RANKS = 2
TIMEOUT_S = 60


def _load_worker():
    spec = importlib.util.spec_from_file_location("mpi_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker()


def mpirun(*args, ranks=RANKS):
    """conftest.mpirun with this file's rank count and TIMEOUT_S."""
    return conftest_mpirun(*args, ranks=ranks, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every case of mpi_worker.CASES trained on 2 ranks: ({case: stats}, out_dir)."""
    out = tmp_path_factory.mktemp("mpi")
    done = mpirun(WORKER, "train", str(out))
    assert done.returncode == 0, done.stderr
    with open(out / "stats.json") as f:
        return json.load(f), out


def single_process(case):
    """The reference: lowrank.training.loop.fit in this process, same seed, same global batches."""
    _, _, batch, epochs, _ = worker.CASES[case]
    model, opt, X, y = worker.build(case)
    with lr.use_backend("numpy"):
        history = lr.fit(model, opt, lr.BCEWithLogitsLoss(), X, y, epochs=epochs, batch_size=batch, seed=11)
    return model, history


# -- in-process: no MPI needed ---------------------------------------------------------------
@given(n=st.integers(0, 60), size=st.integers(1, 9))
def test_shards_tile_the_global_batch_within_one_row(n, size):
    bounds = [shard_bounds(n, k, size) for k in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(bounds, bounds[1:]))       # contiguous, in rank order
    counts = [hi - lo for lo, hi in bounds]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_closed_form_bytes_of_a_lora_model():
    model, _, _, _ = worker.build("lora_even")
    r, P = 2, 6                                                   # lora_A, lora_B of "0" and "2"; head W, b
    numbers = r * (5 + 7) + r * (7 + 6) + (6 * 1 + 1)            # r(D_in + D_out) per layer + the saved head
    assert allreduce_nbytes(model.parameters(trainable_only=True)) == (2 + P + numbers) * 8
    assert allreduce_nbytes(model.parameters(trainable_only=True), "float32") == (2 + P + numbers) * 4


def test_a_frozen_model_is_refused_before_mpi_starts():
    model = lr.MLP([3, 2], dtype="float64").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        DataParallel(model, lr.SGD(model.parameters(), lr=0.1), lr.BCEWithLogitsLoss())


def test_world_without_mpi4py_names_the_extra(monkeypatch):
    from lowrank.training import distributed
    monkeypatch.setitem(sys.modules, "mpi4py", None)              # `from mpi4py import MPI` now fails
    with pytest.raises(ImportError, match=r"lowrank\[mpi\]"):
        distributed.world()


def test_import_lowrank_does_not_start_mpi():
    code = "import sys, lowrank, lowrank.training.distributed; assert 'mpi4py' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], timeout=TIMEOUT_S).returncode == 0


# -- under mpiexec -n 2 -------------------------------------------------------------------------
@needs_mpi
@pytest.mark.parametrize("case", ["lora_even", "lora_uneven", "full_uneven"])
def test_two_ranks_match_one_process_to_float64_rounding(trained, case):
    stats, out = trained
    model, history = single_process(case)
    got = np.load(out / f"{case}.npz")
    start = worker.build(case)[0].state_dict()
    assert sorted(got.files) == sorted(model.state_dict())
    for name, want in model.state_dict().items():
        np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-14, err_msg=name)
    moved = [n for n, p in model.named_parameters() if p.trainable and not np.allclose(start[n], p.data)]
    assert moved, "training changed nothing: the comparison would be vacuous"
    np.testing.assert_allclose(stats[case]["train_loss"], history.train_loss, rtol=1e-12)
    assert stats[case]["in_sync"]


@needs_mpi
def test_a_parameter_no_rank_uses_keeps_grad_none(trained):
    _, out = trained
    np.testing.assert_array_equal(np.load(out / "full_uneven.npz")["spare"], np.ones(3))


@needs_mpi
@pytest.mark.parametrize("case", ["lora_even", "lora_uneven", "full_uneven", "lora_dropout"])
def test_one_allreduce_per_step_of_the_closed_form_size(trained, case):
    stats, _ = trained
    _, n, batch, epochs, _ = worker.CASES[case]
    steps = epochs * math.ceil(n / batch)
    trainable = worker.build(case)[0].parameters(trainable_only=True)
    per_step = (2 + len(trainable) + sum(int(np.prod(p.shape)) for p in trainable)) * 8    # float64
    assert stats[case]["steps"] == stats[case]["allreduce_calls"] == steps
    assert stats[case]["allreduce_bytes"] == steps * per_step
    assert stats[case]["other_calls"] == stats[case]["setup_calls"]      # nothing else talks during fit


@needs_mpi
def test_full_fine_tuning_sends_more_than_lora(trained):
    stats, _ = trained
    per_step = {c: stats[c]["allreduce_bytes"] / stats[c]["steps"] for c in ("lora_uneven", "full_uneven")}
    assert per_step["full_uneven"] > per_step["lora_uneven"]


@needs_mpi
def test_broadcast_gives_every_rank_rank0s_start(trained):
    stats, _ = trained
    s = stats["lora_uneven"]
    n_params = len(worker.build("lora_uneven")[0].parameters())
    assert s["in_sync_before_broadcast"] is False and s["in_sync"]
    assert s["setup_calls"] == 1 + n_params                     # one digest allgather + one Bcast per parameter


@needs_mpi
def test_dropout_ranks_draw_their_own_masks_and_stay_in_sync(trained):
    stats, _ = trained
    s = stats["lora_dropout"]
    assert s["in_sync"] and len(set(s["dropout_draws"])) == RANKS


@needs_mpi
def test_fit_stops_early_and_refuses_bad_arguments(trained):
    s = trained[0]["early_stop"]
    assert s["epochs_run"] == [1] and s["stopped_early"] and s["steps"] == 4
    assert len(s["val_acc"]) == len(s["val_loss"]) == 1
    assert [("must be >= 1" in e) for e in s["errors"]] == [True, True, False]
    assert "target_acc needs validation data" in s["errors"][2]


@needs_mpi
def test_a_rank_that_raises_in_a_step_stops_every_rank_with_its_message():
    done = mpirun(WORKER, "step_error")
    assert done.returncode == 3, done.stderr
    for rank in range(RANKS):
        assert f"rank {rank} caught DistributedError after 3 steps" in done.stderr
    assert "rank 1: ValueError: LoraLinear 'model.0' expects input of shape (N, 5), got (2, 4)" in done.stderr
    assert "rank 0: " not in done.stderr.split("failed on ")[1]


@needs_mpi
def test_a_rank_that_raises_outside_a_step_aborts_every_rank():
    done = mpirun(WORKER, "setup_error")
    assert done.returncode != 0
    assert "lowrank rank 1/2: ValueError: rank-local setup failure (bad input file); aborting every rank" in done.stderr


@needs_mpi
def test_lowrank_train_distributed_matches_the_single_process_command(tmp_path):
    flags = ["train", "--method", "lora", "--r", "2", "--n-features", "6", "--hidden", "16,12", "--n-samples", "300",
             "--epochs", "3", "--pretrain-epochs", "4", "--batch-size", "25", "--dtype", "float64"]   # 12 + 13 rows
    from lowrank.app.cli import main
    assert main([*flags, "--out", str(tmp_path / "one"), "--quiet"]) == 0
    done = mpirun("-m", "lowrank.app.cli", *flags, "--distributed", "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("lowrank train: lora (r=2, alpha=4) on moons, 2 rank(s)") == 1     # rank 0 alone
    assert done.stdout.count(" bytes/step, ") == 1
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    numbers = 2 * (6 + 16) + 2 * (16 + 12) + (12 + 1)           # r(D_in + D_out) per layer + the head
    assert two["allreduce_bytes_per_step"] == (2 + 6 + numbers) * 8 and two["in_sync"] and two["ranks"] == 2
    assert two["test_acc"] == one["test_acc"]
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=1e-10)
    from safetensors.numpy import load_file
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-10, atol=1e-13, err_msg=k)


@needs_mpi
def test_benchmark_driver_reports_one_closed_form_allreduce_per_step(tmp_path):
    from benchmarks import distributed as bench
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--quick", "--ranks", "1,2", "--backend", "numpy",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["ranks"]) for r in rows] == [("lora", 1), ("lora", 2), ("full", 1), ("full", 2)]
    d0, d1, d2, d3, _ = bench.QUICK["sizes"]
    r = bench.QUICK["r"]
    lora = r * (d0 + d1) + r * (d1 + d2) + r * (d2 + d3) + (d3 + 1)        # 3 adapted layers + the saved head
    full = sum(a * b + b for a, b in zip(bench.QUICK["sizes"][:-1], bench.QUICK["sizes"][1:]))
    for row in rows:
        n, P = (lora, 8) if row["method"] == "lora" else (full, 8)             # lora: 3 × (A, B) + W, b; full: 4 × (W, b)
        assert row["trainable"] == n and row["bytes_per_step"] == (2 + P + n) * 4 and row["calls_per_step"] == 1
    assert rows[0]["speedup"] == rows[2]["speedup"] == 1.0
    assert "| lora | 2 |" in done.stdout
