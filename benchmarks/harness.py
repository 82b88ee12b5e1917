"""The shared timing harness: pinned threads, interleaved rounds, medians, machine floors.

On shared, noisy machines a single timing means little; what holds up is a *ratio* of two
things measured in the same moment. So every benchmark here runs its variants interleaved
(A, B, C, A, B, C, ... with the order rotated each round), takes each variant's median over
rounds, and divides per round by the reference variant (the bare base product) before
taking the median of those ratios (with ``settle_s``, each timed sample follows untimed calls of
its own variant, so one library's leftover threads stay out of another's timing). BLAS and
Numba threads are pinned and printed, and the machine's floors (BLAS GEMM peak in GFLOP/s,
copy bandwidth in GB/s) are measured in the same run so "achieved / possible" needs no datasheet.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np


@contextmanager
def pinned_threads(n: int):
    """Pin Numba, BLAS and every OpenMP pool threadpoolctl sees to ``n`` threads (``pool.limit``: SciPy's
    BLAS stays at one, numba_cpu's GEMM tasks run on it one per Numba thread); yields the settings."""
    import numba
    from threadpoolctl import threadpool_info
    from lowrank.kernels.numba_cpu import pool
    with pool.limit(n):
        info = {"numba_threads": numba.get_num_threads(), "numba_layer": pool.layer(),
                "blas": [{"library": d["internal_api"], "version": d.get("version"), "threads": d["num_threads"],
                          "path": os.path.basename(d["filepath"])} for d in threadpool_info()]}
        yield info


def time_call(fn, inner: int = 1) -> float:
    """Seconds per call of ``fn()``, averaged over ``inner`` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def inner_repeats(fn, target_s: float = 0.02) -> int:
    """How many back-to-back calls make one sample last about ``target_s`` (one call warms up)."""
    t = time_call(fn)                          # the warm-up call; timed again only if it was short
    if t < target_s:
        t = time_call(fn)
    return max(1, min(1000, int(target_s / max(t, 1e-7))))


def settle(fn, seconds: float) -> None:
    """Call ``fn()`` untimed for at least ``seconds`` (at least once)."""
    t0 = time.perf_counter()
    fn()
    while time.perf_counter() - t0 < seconds:
        fn()


def interleaved(variants: dict, rounds: int, base: str, target_s: float = 0.02, settle_s: float = 0.0) -> dict:
    """Time ``variants`` {name: fn} interleaved over ``rounds`` rounds.

    ``settle_s`` > 0: before each timed sample the variant runs untimed for that long, so that what
    the previous variant left running is gone. Needed when variants use different thread pools
    (lowrank and torch): OpenBLAS's workers spin for about 0.1 s after a GEMM (2^28 cycles,
    OpenBLAS's THREAD_TIMEOUT), and at 2 threads a torch step that started inside that window took
    215 ms instead of 137 (benchmarks.peers, decoder row, 6 runs).

    Returns {name: {"median_s", "min_s", "ratio", "samples_s"}} where ratio is the median over
    rounds of t(name) / t(base) with both measured in the same round; ``samples_s`` holds each
    round's seconds, so a ratio to any other variant can be taken round by round too.
    """
    names = list(variants)
    inner = {n: inner_repeats(variants[n], target_s) for n in names}
    samples = {n: [] for n in names}
    for k in range(rounds):
        for n in names[k % len(names):] + names[:k % len(names)]:     # rotate the order each round
            if settle_s > 0:
                settle(variants[n], settle_s)
            samples[n].append(time_call(variants[n], inner[n]))
    b = np.array(samples[base])
    return {n: {"median_s": float(np.median(s)), "min_s": float(np.min(s)),
                "ratio": float(np.median(np.array(s) / b)), "rounds": rounds, "inner": inner[n],
                "samples_s": [float(t) for t in s]}
            for n, s in samples.items()}


def peak_bytes(fn) -> int:
    """The most bytes Python allocated at once while ``fn()`` ran (NumPy reports to tracemalloc; a mapped file
    is not an allocation)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def blas_peak_gflops(dtype="float32", n: int = 2048, rounds: int = 5) -> float:
    """Median GFLOP/s of an n×n×n GEMM through the faster of NumPy's BLAS and numba_cpu's products (on the pool,
    on MKL where it is installed): this run's compute floor."""
    from lowrank.kernels.numba_cpu import blas
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(dtype) for _ in range(2))
    best = float("inf")
    for product in (np.matmul, blas.matmul):
        product(a, b)
        best = min(best, float(np.median([time_call(lambda: product(a, b)) for _ in range(rounds)])))
    return 2 * n**3 / best / 1e9


@contextmanager
def _split(threads: int, size: int, fn):
    """Within: a call that runs fn(slice) over ``size`` items split into ``threads`` slices, each on its own
    thread (NumPy's copies and BLAS release the GIL), or directly on one."""
    if threads <= 1:
        yield lambda: fn(slice(0, size))
        return
    spans = [slice(size * t // threads, size * (t + 1) // threads) for t in range(threads)]
    with ThreadPoolExecutor(threads) as pool:
        yield lambda: list(pool.map(fn, spans))


def copy_bandwidth_gbs(mbytes: int = 256, rounds: int = 5, threads: int = 1) -> float:
    """Median GB/s of a large array copy (bytes read + bytes written) on ``threads`` threads: this run's memory
    floor."""
    src = np.ones(mbytes * 2**20 // 8)
    dst = np.empty_like(src)
    with _split(threads, src.size, lambda s: np.copyto(dst[s], src[s])) as copy:
        copy()
        t = float(np.median([time_call(copy) for _ in range(rounds)]))
    return 2 * src.nbytes / t / 1e9


def read_bandwidth_gbs(mbytes: int = 256, rounds: int = 5, threads: int = 1) -> float:
    """Median GB/s of reading a large array once (its dot product with itself, one BLAS thread per reader) on
    ``threads`` threads: the floor of a product that streams its operand once, as a decode step its weights.
    It differs from the copy's: one core here reads about 17 GB/s but copies 24 (read + write)."""
    from threadpoolctl import threadpool_limits
    a = np.ones(mbytes * 2**20 // 8)
    with threadpool_limits(limits=1, user_api="blas"), _split(threads, a.size, lambda s: np.dot(a[s], a[s])) as read:
        read()
        t = float(np.median([time_call(read) for _ in range(rounds)]))
    return a.nbytes / t / 1e9


def machine(threads: int, thread_info: dict, dtype="float32", quick: bool = False) -> dict:
    """This run's machine facts: CPU, pinned threads, measured GEMM peak, copy and read bandwidth (on ``threads``)."""
    from lowrank.kernels.numba_cpu import blas
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            **thread_info, "products_blas": blas.PROVIDER,
            "blas_peak_gflops": blas_peak_gflops(dtype, 512 if quick else 2048),
            "copy_gbs": copy_bandwidth_gbs(16 if quick else 256, threads=threads),
            "read_gbs": read_bandwidth_gbs(16 if quick else 256, threads=threads)}


def floors_line(mach: dict) -> str:
    """``machine()``'s floors as the line a benchmark prints before its rows."""
    return (f"BLAS ({mach['products_blas']}) sgemm peak {mach['blas_peak_gflops']:.1f} GF/s, "
            f"copy bandwidth {mach['copy_gbs']:.1f} GB/s, read {mach['read_gbs']:.1f} GB/s")


def write_json(path, payload: dict):
    """Write ``payload`` as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o))


def plot_ratios(path, panels: dict, title: str, ylabel: str = "time / base product (log)"):
    """Grouped bars on log axes, one panel per entry of ``panels`` {panel: {x label: {variant: ratio}}};
    a line at 1 marks the base product."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.8), squeeze=False)
    for ax, (name, groups) in zip(axes[0], panels.items()):
        labels = list(groups)
        variants = list(dict.fromkeys(v for g in groups.values() for v in g))
        width = 0.8 / max(len(variants), 1)
        for i, v in enumerate(variants):
            xs = [j + i * width for j, g in enumerate(labels) if v in groups[g]]
            ax.bar(xs, [groups[g][v] for g in labels if v in groups[g]], width, label=v)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULTS = os.path.join(os.path.dirname(__file__), "results")


def parse_args(argv, doc: str, name, add_arguments=None, threads: int | None = None):
    """The command line every CPU kernel benchmark shares: --quick, --threads (default ``threads``, else every
    core), --out; ``add_arguments(parser)`` adds a benchmark's own flags. ``name``: the results' file stem, or a
    function of the parsed flags that gives it."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes: finishes in seconds (CI)")
    p.add_argument("--threads", type=int, default=threads or os.cpu_count() or 1, help="BLAS and Numba threads")
    p.add_argument("--out", default=None, help="JSON path (default results/NAME[_quick].json)")
    if add_arguments is not None:
        add_arguments(p)
    a = p.parse_args(argv)
    stem = name(a) if callable(name) else name
    a.out = a.out or os.path.join(RESULTS, f"{stem}_quick.json" if a.quick else f"{stem}.json")
    return a


def run_pinned(a, run, cfg):
    """Pin threads, measure this machine's BLAS peak, copy and read bandwidth, then ``run(cfg)``:
    returns (machine, rows)."""
    with pinned_threads(a.threads) as info:
        print(f"threads pinned: {info}")
        mach = machine(a.threads, info, quick=a.quick)
        print(floors_line(mach))
        rows = run(cfg)
    return mach, rows
