"""The program tests/training/test_distributed.py runs under ``mpiexec -n 2``; also the place both sides
build their models and data, so the single-process reference starts from the same numbers.

    mpiexec -n 2 python tests/mpi_worker.py train OUT_DIR      every case in CASES; rank 0 writes OUT_DIR
    mpiexec -n 2 python tests/mpi_worker.py step_error         rank 1 feeds a bad shard at step 3
    mpiexec -n 2 python tests/mpi_worker.py setup_error        rank 1 raises before any collective
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

import lowrank as lr
from lowrank.nn.module import Module, Parameter

D_IN = 5
# name -> (method, rows N, global batch, epochs, lora_dropout)
CASES = {
    "lora_even": ("lora", 24, 6, 2, 0.0),     # 3 + 3 rows per step
    "lora_uneven": ("lora", 21, 5, 2, 0.0),   # 3 + 2 rows, and a last batch of 1 row: 1 + 0
    "full_uneven": ("full", 23, 7, 2, 0.0),   # 4 + 3 rows, last batch 2: 1 + 1
    "lora_dropout": ("lora", 16, 8, 1, 0.5),  # exactness not expected: ranks must stay in sync
}


class WithSpare(Module):
    """An MLP plus a trainable parameter the forward never uses (its grad stays None)."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.spare = Parameter(np.ones(3))

    def forward(self, x):
        return self.mlp.forward(x)

    def backward(self, dy):
        return self.mlp.backward(dy)


def build(case: str):
    """(model, optimizer, X, y) of ``case``, identical in every process (float64, tanh: no kinks)."""
    method, n, _, _, dropout = CASES[case]
    rng = np.random.default_rng(7)
    X = rng.standard_normal((n, D_IN))
    y = (X[:, 0] * X[:, 1] + 0.3 * X[:, 2] > 0).astype(np.int64)
    mlp = lr.MLP([D_IN, 7, 6, 1], activation="tanh", dtype="float64", seed=3)
    if method == "lora":
        config = lr.LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["0", "2"],
                               modules_to_save=["4"], init_lora_weights=False)   # B ≠ 0: A moves from step 1
        model = lr.get_lora_model(mlp, config)
    else:
        model = WithSpare(mlp.requires_grad_(True))
    return model, lr.Adam(model.parameters(trainable_only=True), lr=1e-2), X, y


def _train(comm, out_dir):
    from lowrank.training.distributed import DataParallel
    results = {}
    for case, (_, _, batch, epochs, _) in CASES.items():
        model, opt, X, y = build(case)
        dp = DataParallel(model, opt, lr.BCEWithLogitsLoss(), comm)
        synced_before = None
        if case == "lora_uneven":                     # rank 1 starts elsewhere; the broadcast repairs it
            for p in model.parameters():
                p.data += dp.rank
            synced_before = dp.in_sync()
            dp.broadcast_parameters()
        setup_calls = dp.stats.other_calls
        history = dp.fit(X, y, epochs=epochs, batch_size=batch, seed=11)
        draws = comm.allgather(float(model.model.get_submodule("0")._rng.random())) if case == "lora_dropout" else None
        results[case] = {**dp.stats.to_dict(), "setup_calls": setup_calls, "in_sync": dp.in_sync(),
                         "in_sync_before_broadcast": synced_before, "train_loss": history.train_loss,
                         "dropout_draws": draws, "size": dp.size}
        if dp.is_root:
            np.savez(os.path.join(out_dir, f"{case}.npz"), **model.state_dict())
    results["early_stop"] = _early_stop_and_bad_arguments(comm)
    if comm.Get_rank() == 0:
        with open(os.path.join(out_dir, "stats.json"), "w") as f:
            json.dump(results, f)


def _early_stop_and_bad_arguments(comm):
    """fit with validation data and target_acc = 0 stops after one epoch; bad arguments raise."""
    from lowrank.training.distributed import DataParallel
    model, opt, X, y = build("lora_even")
    dp = DataParallel(model, opt, lr.BCEWithLogitsLoss(), comm)
    history = dp.fit(X, y, X_val=X[:10], y_val=y[:10], epochs=3, batch_size=6, target_acc=0.0)
    errors = []
    for kwargs in ({"epochs": 0}, {"batch_size": 0}, {"target_acc": 0.5}):
        try:
            dp.fit(X, y, **kwargs)
        except ValueError as e:
            errors.append(str(e))
    return {"epochs_run": history.epoch, "stopped_early": history.stopped_early, "val_acc": history.val_acc,
            "val_loss": history.val_loss, "errors": errors, "steps": dp.stats.steps}


def _step_error(comm):
    from lowrank.training.distributed import DataParallel, DistributedError, abort_on_error
    model, opt, X, y = build("lora_even")
    dp = DataParallel(model, opt, lr.BCEWithLogitsLoss())          # comm=None: COMM_WORLD
    try:
        with abort_on_error(comm):                    # a DistributedError passes through: no Abort
            for step in range(5):
                rows = slice(4 * step + 2 * dp.rank, 4 * step + 2 * dp.rank + 2)
                Xk = X[rows, :-1] if (dp.rank == 1 and step == 3) else X[rows]      # rank 1: 4 features, not 5
                dp.step(Xk, y[rows], 4)
    except DistributedError as e:
        print(f"rank {dp.rank} caught DistributedError after {dp.stats.steps} steps: {e}", file=sys.stderr)
        sys.exit(3)


def _setup_error(comm):
    from lowrank.training.distributed import DataParallel, abort_on_error
    with abort_on_error(comm):
        model, opt, X, y = build("lora_even")
        if comm.Get_rank() == 1:
            raise ValueError("rank-local setup failure (bad input file)")
        DataParallel(model, opt, lr.BCEWithLogitsLoss(), comm).broadcast_parameters()   # rank 0 would wait here


def main(argv):
    from lowrank.training.distributed import world
    lr.set_backend("numpy")            # no Numba compile in every rank; the reference uses numpy too
    comm = world()
    {"train": lambda: _train(comm, argv[1]), "step_error": lambda: _step_error(comm),
     "setup_error": lambda: _setup_error(comm)}[argv[0]]()


if __name__ == "__main__":
    main(sys.argv[1:])
