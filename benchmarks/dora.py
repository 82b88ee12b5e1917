"""DoRA's row norm ‖W + s·B·A‖: the cheap form (lowrank.tuners.lora.dora.dora_norm) against PEFT's
materialised one, interleaved on one pinned thread count.

    python -m benchmarks.dora [--quick] [--threads 1] [--json out/dora.json]

Per shape (D_out, D_in, r) it prints the median seconds of each form, their ratio
(cheap / materialised, measured in the same rounds), the bytes each allocates at its peak
(tracemalloc), and the largest relative difference of the two in float32.
"""
from __future__ import annotations

import argparse

import numpy as np

from lowrank.tuners.lora.dora import dora_norm, dora_norm_materialised

from .harness import interleaved, machine, peak_bytes, pinned_threads, write_json

SHAPES = [(1024, 1024, 8), (2048, 2048, 16), (4096, 1024, 8), (2048, 2048, 64), (4096, 4096, 16)]
QUICK_SHAPES = [(512, 512, 8), (1024, 1024, 16)]


def run_shape(D_out, D_in, r, rounds, dtype="float32") -> dict:
    rng = np.random.default_rng(0)
    W = (rng.standard_normal((D_out, D_in)) / np.sqrt(D_in)).astype(dtype)
    A = (rng.standard_normal((r, D_in)) / np.sqrt(D_in)).astype(dtype)
    B = (rng.standard_normal((D_out, r)) * 0.1).astype(dtype)
    s = 2.0
    variants = {"materialised": lambda: dora_norm_materialised(W, A, B, s), "cheap": lambda: dora_norm(W, A, B, s)}
    times = interleaved(variants, rounds, base="materialised")
    exact = dora_norm_materialised(*(a.astype(np.float64) for a in (W, A, B)), s)
    got = {"materialised": variants["materialised"](), "cheap": variants["cheap"]().n}
    rel = {n: float(np.max(np.abs(v / exact - 1))) for n, v in got.items()}
    return {"shape": [D_out, D_in, r], "dtype": dtype,
            **{f"{n}_s": t["median_s"] for n, t in times.items()},
            "cheap_over_materialised": times["cheap"]["ratio"],
            **{f"{n}_peak_bytes": peak_bytes(fn) for n, fn in variants.items()},
            **{f"{n}_max_rel_err_vs_float64": e for n, e in rel.items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, few rounds (CI smoke)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    shapes, rounds = (QUICK_SHAPES, 3) if args.quick else (SHAPES, 9)
    with pinned_threads(args.threads) as info:
        rows = [run_shape(*shape, rounds) for shape in shapes]
        facts = machine(args.threads, info, quick=args.quick)
    print(f"DoRA row norm, float32, {args.threads} thread(s); {rounds} interleaved rounds, medians")
    print(f"{'D_out x D_in, r':>18} {'materialised ms':>16} {'cheap ms':>9} {'cheap/mat':>10} "
          f"{'mat peak MB':>12} {'cheap peak MB':>14} {'cheap rel err':>14}")
    for row in rows:
        D_out, D_in, r = row["shape"]
        print(f"{f'{D_out} x {D_in}, {r}':>18} {1e3 * row['materialised_s']:>16.2f} {1e3 * row['cheap_s']:>9.2f} "
              f"{row['cheap_over_materialised']:>10.3f} {row['materialised_peak_bytes'] / 2**20:>12.1f} "
              f"{row['cheap_peak_bytes'] / 2**20:>14.2f} {row['cheap_max_rel_err_vs_float64']:>14.1e}")
    if args.json:
        write_json(args.json, {"machine": facts, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
