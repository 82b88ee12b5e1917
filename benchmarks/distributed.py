"""Data-parallel benchmark: bytes all-reduced, communication vs compute, 1 → 2 → 4 ranks.

    python -m benchmarks.distributed              # driver: mpiexec -n 1, 2, 4 itself, one table,
                                                  # results/distributed.json (~1 min on 2 cores)
    python -m benchmarks.distributed --quick      # tiny model, seconds (CI)
    mpiexec -n 4 python -m benchmarks.distributed --worker --json PATH     # one measurement on 4 ranks

Each method (LoRA on the hidden layers + the head saved, and full fine-tuning) trains the
demo's MLP (32 → 200 → 2000 → 200 → 1, float32) on a fixed global batch of ``batch`` rows
split over the ranks (strong scaling), through ``lowrank.training.distributed.DataParallel``: one
Allreduce of (2 + P + Σ trainable sizes) × 4 bytes per step. Per step and rank we time
compute (forward, backward, packing, optimizer step) and communication (inside the Allreduce,
waiting for the slowest rank included); medians over steps, then the slowest rank's compute
and step time and the ranks' mean communication. "allreduce alone" times the same
Allreduce after a Barrier: the transfer without the wait. BLAS and Numba are pinned to one
thread per rank, so K ranks use K cores; on a 2-core machine 4 ranks are oversubscribed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from . import harness

FULL = dict(sizes=[32, 200, 2000, 200, 1], r=8, batch=512, steps=20, warmup=3)
QUICK = dict(sizes=[8, 32, 64, 32, 1], r=4, batch=64, steps=5, warmup=2)
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def build(method: str, spec: dict):
    """The benchmark model for ``method`` ('lora' or 'full') and its Adam."""
    import lowrank as lr
    mlp = lr.MLP(spec["sizes"], dtype="float32", seed=0)
    if method == "lora":
        dense = [n for n, m in mlp.named_modules() if isinstance(m, lr.Dense)]
        model = lr.get_lora_model(mlp, lr.LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"],
                                                     target_modules=dense[:-1], modules_to_save=[dense[-1]]))
    else:
        model = mlp.requires_grad_(True)
    return model, lr.Adam(model.parameters(trainable_only=True), lr=1e-3)


def measure(method: str, spec: dict, comm) -> dict:
    """Per-step medians on this rank, gathered to rank 0 (None elsewhere)."""
    import lowrank as lr
    from lowrank.training.distributed import DataParallel, shard_bounds
    model, opt = build(method, spec)
    dp = DataParallel(model, opt, lr.BCEWithLogitsLoss(), comm)
    rng = np.random.default_rng(1)
    X = rng.standard_normal((spec["batch"], spec["sizes"][0])).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    lo, hi = shard_bounds(spec["batch"], dp.rank, dp.size)
    step, compute, comm_s = [], [], []
    for k in range(spec["warmup"] + spec["steps"]):
        c0, m0, t0 = dp.stats.compute_seconds, dp.stats.comm_seconds, time.perf_counter()
        dp.step(X[lo:hi], y[lo:hi], spec["batch"])
        if k >= spec["warmup"]:
            step.append(time.perf_counter() - t0)
            compute.append(dp.stats.compute_seconds - c0)
            comm_s.append(dp.stats.comm_seconds - m0)
    alone = []
    for _ in range(spec["steps"]):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(dp._MPI.IN_PLACE, dp.buffer, op=dp._MPI.SUM)
        alone.append(time.perf_counter() - t0)
    mine = {"step_s": float(np.median(step)), "compute_s": float(np.median(compute)),
            "comm_s": float(np.median(comm_s)), "allreduce_alone_s": float(np.median(alone))}
    ranks = comm.gather(mine, root=0)
    if dp.rank != 0:
        return None
    return {"trainable": model.num_parameters(trainable_only=True), "ranks": dp.size,
            "bytes_per_step": dp.stats.allreduce_bytes // dp.stats.steps,
            "allreduce_calls_per_step": dp.stats.allreduce_calls / dp.stats.steps,
            "step_s": max(r["step_s"] for r in ranks), "compute_s": max(r["compute_s"] for r in ranks),
            "comm_s": float(np.mean([r["comm_s"] for r in ranks])),
            "allreduce_alone_s": float(np.mean([r["allreduce_alone_s"] for r in ranks])), "per_rank": ranks}


def worker(args) -> int:
    """One measurement on the ranks of this mpiexec; rank 0 writes ``args.json``."""
    import lowrank as lr
    from lowrank.training.distributed import world
    lr.set_backend(args.backend)
    comm = world()
    spec = QUICK if args.quick else FULL
    with harness.pinned_threads(1) as threads:
        results = {m: measure(m, spec, comm) for m in ("lora", "full")}
    if comm.Get_rank() == 0:
        harness.write_json(args.json, {"spec": spec, "threads": threads, "methods": results})
    return 0


def mpiexec() -> str:
    """The mpiexec next to this Python (pip's mpich), else the one on PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.access(local, os.X_OK) else "mpiexec"


def driver(args) -> int:
    """Launch the worker on 1, 2 and 4 ranks, print one table, write results/distributed[_quick].json."""
    tag = "_quick" if args.quick else ""
    out = args.out or os.path.join(RESULTS, f"distributed{tag}.json")
    env = {**os.environ, "HYDRA_LAUNCHER": "fork", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    runs = {}
    for n in args.ranks:
        path = os.path.join(os.path.dirname(os.path.abspath(out)), f"distributed{tag}_n{n}.json")
        cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "benchmarks.distributed", "--worker", "--json", path,
               "--backend", args.backend, *(["--quick"] if args.quick else [])]
        subprocess.run(cmd, check=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(path) as f:
            runs[n] = json.load(f)
    rows = table_rows(runs)
    print(format_table(rows, runs[args.ranks[0]]["spec"]))
    harness.write_json(out, {"machine_cores": os.cpu_count(), "backend": args.backend, "spec": runs[args.ranks[0]]["spec"], "rows": rows,
                         "runs": {str(n): r for n, r in runs.items()}})
    return 0


def table_rows(runs: dict) -> list[dict]:
    """One row per (method, ranks); speedup = the 1-rank (or fewest-rank) step time / this step time."""
    rows = []
    for method in ("lora", "full"):
        first = runs[min(runs)]["methods"][method]["step_s"]
        for n, run in sorted(runs.items()):
            m = run["methods"][method]
            rows.append({"method": method, "ranks": n, "trainable": m["trainable"],
                         "bytes_per_step": m["bytes_per_step"], "calls_per_step": m["allreduce_calls_per_step"],
                         "step_ms": 1e3 * m["step_s"], "compute_ms": 1e3 * m["compute_s"],
                         "comm_ms": 1e3 * m["comm_s"], "alone_ms": 1e3 * m["allreduce_alone_s"],
                         "speedup": first / m["step_s"]})
    return rows


def format_table(rows: list[dict], spec: dict) -> str:
    head = (f"MLP {spec['sizes']} float32, global batch {spec['batch']}, LoRA r={spec['r']}; "
            f"medians of {spec['steps']} steps\n"
            "| method | ranks | trainable | bytes/step | allreduce/step | step ms | compute ms | comm ms "
            "| allreduce alone ms | speedup |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['method']} | {r['ranks']} | {r['trainable']:,d} | {r['bytes_per_step']:,d} | "
             f"{r['calls_per_step']:g} | {r['step_ms']:.2f} | {r['compute_ms']:.2f} | {r['comm_ms']:.2f} | "
             f"{r['alone_ms']:.3f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join([head, *lines])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model: finishes in seconds (CI)")
    p.add_argument("--backend", default="auto", help="LoRA kernel backend: auto | numpy | numba (default auto)")
    p.add_argument("--worker", action="store_true", help="measure on the ranks of this mpiexec (rank 0 writes --json)")
    p.add_argument("--json", default=os.path.join(RESULTS, "distributed_worker.json"), help="worker output path")
    p.add_argument("--ranks", type=lambda s: [int(k) for k in s.split(",")], default=[1, 2, 4],
                   help="driver: rank counts to launch (default 1,2,4)")
    p.add_argument("--out", default=None, help="driver: JSON path (default results/distributed[_quick].json; "
                   "the per-rank-count files go beside it)")
    args = p.parse_args(argv)
    return worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    sys.exit(main())
