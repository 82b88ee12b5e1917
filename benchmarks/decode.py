"""Decode-shaped products: x (M, D_in) · Wᵀ for a few rows M against a frozen W, the product of every
weight in a batched greedy-decoding step.

    python -m benchmarks.decode --threads 1      # the real 135M decoder's weights; writes results/decode_t1.json
    python -m benchmarks.decode --threads 2
    python -m benchmarks.decode --quick          # small shapes, seconds (CI)
    python -m benchmarks.decode --stream         # one row through a whole decoder's weights; decode_stream_t1.json

Shapes (float32, no bias): W 576×576 (q, o), 1536×576 (gate, up), 576×1536 (down) and 49152×576 (the tied
LM head), M = 1, 2, 4, 8, 16, 32, 64. Variants, interleaved round by round (``harness.interleaved``, the
order rotated each round, each timed sample after ``settle_s`` of its own untimed calls):

    small_m     numba_cpu's few-row kernel (numba_cpu/small_m.py) at every M, 1 included
    numba_blas  numba_cpu's BLAS path (GEMV at M = 1, GEMM tasks on the pool above): what it ran before
    numpy       NumPy's x @ W.T (OpenBLAS, --threads threads)
    gemv        at M ≤ config.NUMBA_SMALL_M: numba_cpu's few-row IR kernel (numba_cpu/gemv.py, prefetching)
numba_cpu's dense_forward runs gemv (float32) where M ≤ config.NUMBA_SMALL_M, small_m for float64 there, and
numba_blas elsewhere; the threshold is where the few-row kernels stop beating numba_blas (round by round).

Floors: ``floor_us`` is W's bytes over this run's copy bandwidth (``harness.copy_bandwidth_gbs``, a 256 MiB
copy: memory, not cache); a W that fits the last-level cache is read faster than that when one product is
timed over and over, so the one-row GEMV of the same W (``gemv_us``, the numpy variant at M = 1) is printed
beside it: reading W once from where it lives. ``spread`` is each variant's (max − min) / median over rounds.

``--stream``: what one core reads once the weights are not in the cache. Every product of a batch-1 decode
step of the 135M shape (30 layers of q, k, v, o, gate, up, down and the tied head), laid out ``copies``
times over (1.08 GB: beyond this machine's 480 MB L3), one row each, one pass over all of them per sample:
``numpy`` (BLAS's GEMV), ``small_m`` (the few-row kernel's 4-rows-per-pass loop at one row) and ``gemv``
(numba_cpu's one-row kernel, asking for each row's bytes ahead), each matrix its own allocation as a model's
layers make them, and ``numpy_one_block`` and ``gemv_one_block``: the same weights as views of one block in
the order they are read (``Module.flatten_parameters``'s layout). Reported as GB/s of weights read and
milliseconds per decoder's worth of products.
"""
from __future__ import annotations

import sys
from unittest import mock

import numpy as np

from lowrank.kernels import config
from lowrank.kernels import numba_cpu as nb
from lowrank.kernels.numba_cpu import gemv, small_m
from lowrank.nn.module import block_views

from . import harness

FULL = dict(shapes=[(576, 576), (1536, 576), (576, 1536), (49152, 576)], Ms=(1, 2, 4, 8, 16, 32, 64),
            rounds=7, target_s=0.02, settle_s=0.05)
QUICK = dict(shapes=[(96, 64), (64, 96)], Ms=(1, 2, 8, 64), rounds=3, target_s=0.002, settle_s=0.001)
LAYER = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))   # q k v o g u d
STREAM = dict(layer=LAYER, layers=30, head=(49152, 576), copies=2, rounds=5)
STREAM_QUICK = dict(layer=((32, 16), (16, 32)), layers=2, head=(64, 16), copies=2, rounds=2)


def numba_blas(x, W):
    """numba_cpu's dense_forward with the one- and few-row kernels off (config.NUMBA_GEMV_IR, NUMBA_SMALL_M = 0)."""
    with mock.patch.object(config, "NUMBA_SMALL_M", 0), mock.patch.object(config, "NUMBA_GEMV_IR", False):
        return nb.dense_forward(x, W)


def run(cfg, copy_gbs):
    rows = []
    rng = np.random.default_rng(0)
    for D_out, D_in in cfg["shapes"]:
        W = (rng.standard_normal((D_out, D_in)) / np.sqrt(D_in)).astype(np.float32)
        floor_us = W.nbytes / (copy_gbs * 1e9) * 1e6
        gemv_us = None
        for M in cfg["Ms"]:
            x = rng.standard_normal((M, D_in)).astype(np.float32)
            np.testing.assert_allclose(small_m.product(x, W), x @ W.T, rtol=1e-4, atol=1e-4)
            variants = {"numpy": lambda: x @ W.T, "small_m": lambda: small_m.product(x, W),
                        "numba_blas": lambda: numba_blas(x, W)}
            if M <= config.NUMBA_SMALL_M:
                variants["gemv"] = lambda: gemv.product(x, W)
            res = harness.interleaved(variants, cfg["rounds"], "numpy", cfg["target_s"], cfg["settle_s"])
            us = {n: r["median_s"] * 1e6 for n, r in res.items()}
            gemv_us = us["numpy"] if M == 1 else gemv_us
            spread = {n: (max(r["samples_s"]) - min(r["samples_s"])) / r["median_s"] for n, r in res.items()}
            runs = "gemv" if M <= config.NUMBA_SMALL_M else "numba_blas"
            row = dict(D_out=D_out, D_in=D_in, M=M, dense_forward_runs=runs, us=us, small_m_over_numpy=res["small_m"]["ratio"],
                       small_m_over_numba_blas=float(np.median(np.array(res["small_m"]["samples_s"])
                                                               / np.array(res["numba_blas"]["samples_s"]))),
                       floor_us=floor_us, gemv_us=gemv_us, small_m_over_floor=us["small_m"] / floor_us,
                       small_m_over_gemv=us["small_m"] / gemv_us, spread=spread,
                       gflops={n: 2 * M * D_in * D_out / (t * 1e3) for n, t in us.items()}, raw=res)
            rows.append(row)
            print(f"W {D_out:5d}x{D_in:<5d} M {M:3d}  gemv {us.get('gemv', float('nan')):9.1f}  "
                  f"small_m {us['small_m']:9.1f}  numba_blas {us['numba_blas']:9.1f}  "
                  f"numpy {us['numpy']:9.1f} us   small_m/numba_blas {row['small_m_over_numba_blas']:5.2f}  "
                  f"/numpy {row['small_m_over_numpy']:5.2f}  /gemv {row['small_m_over_gemv']:5.2f}  "
                  f"/floor {row['small_m_over_floor']:5.2f} (floor {floor_us:.0f} us)  spread {max(spread.values()):.2f}",
                  flush=True)
    return rows


def one_row(x, W):
    """small_m's loop on one row of x (dense_forward sends one row to BLAS's GEMV instead)."""
    y = np.empty((1, W.shape[0]), x.dtype)
    small_m._product(W, x, np.empty(0, x.dtype), y)
    return y


def run_stream(cfg) -> dict:
    """One pass of one-row products over ``copies`` decoders' weights per sample: numpy, small_m and gemv."""
    rng = np.random.default_rng(0)
    shapes = [s for _ in range(cfg["layers"]) for s in cfg["layer"]] + [tuple(cfg["head"])]
    Ws = [rng.standard_normal(s, dtype=np.float32) for _ in range(cfg["copies"]) for s in shapes]
    xs = {D_in: rng.standard_normal((1, D_in), dtype=np.float32) for D_in in {s[1] for s in shapes}}
    for W in Ws[:len(cfg["layer"])]:
        np.testing.assert_allclose(one_row(xs[W.shape[1]], W), xs[W.shape[1]] @ W.T, rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(gemv.product(xs[W.shape[1]], W), xs[W.shape[1]] @ W.T, rtol=1e-3, atol=1e-3)
    nbytes = sum(W.nbytes for W in Ws)
    flat = block_views([W.shape for W in Ws], np.float32)                # the same weights, one after another
    for view, W in zip(flat, Ws):
        view[...] = W
    variants = {"numpy": lambda: [xs[W.shape[1]] @ W.T for W in Ws],
                "small_m": lambda: [one_row(xs[W.shape[1]], W) for W in Ws],
                "numpy_one_block": lambda: [xs[W.shape[1]] @ W.T for W in flat],
                "gemv": lambda: [gemv.product(xs[W.shape[1]], W) for W in Ws],
                "gemv_one_block": lambda: [gemv.product(xs[W.shape[1]], W) for W in flat]}
    res = harness.interleaved(variants, cfg["rounds"], "numpy", target_s=0.0)
    out = dict(working_set_bytes=nbytes, decoders=cfg["copies"])
    for name, r in res.items():
        spread = (max(r["samples_s"]) - min(r["samples_s"])) / r["median_s"]
        out[name] = dict(gb_s=nbytes / r["median_s"] / 1e9, ms_per_decoder=r["median_s"] / cfg["copies"] * 1e3,
                         spread=spread, samples_s=r["samples_s"])
        print(f"{name:8s} {out[name]['gb_s']:5.1f} GB/s  {out[name]['ms_per_decoder']:6.1f} ms per decoder's "
              f"products  (working set {nbytes / 1e9:.2f} GB, spread {spread:.2f})", flush=True)
    return out


def main(argv=None):
    a = harness.parse_args(argv, __doc__, lambda a: "decode_stream" if a.stream else "decode",
                           add_arguments=lambda p: p.add_argument("--stream", action="store_true", help="one row "
                                                                  "through a whole decoder's weights, beyond the cache"))
    stem = "decode_stream" if a.stream else "decode"
    if a.out.endswith(f"{stem}.json"):
        a.out = a.out.replace(f"{stem}.json", f"{stem}_t{a.threads}.json")
    if a.stream:
        with harness.pinned_threads(a.threads) as info:
            print(f"threads pinned: {info}")
            mach = harness.machine(a.threads, info, quick=a.quick)
            result = run_stream(STREAM_QUICK if a.quick else STREAM)
        harness.write_json(a.out, dict(machine=mach, config=STREAM_QUICK if a.quick else STREAM, result=result,
                                       command="python -m benchmarks.decode " + " ".join(argv or sys.argv[1:])))
        print(f"wrote {a.out}")
        return result
    cfg = QUICK if a.quick else FULL
    with harness.pinned_threads(a.threads) as info:
        print(f"threads pinned: {info}")
        mach = harness.machine(a.threads, info, quick=a.quick)
        print(f"{harness.floors_line(mach)}, NUMBA_SMALL_M {config.NUMBA_SMALL_M}")
        rows = run(cfg, mach["copy_gbs"])
    harness.write_json(a.out, dict(machine=mach, numba_small_m=config.NUMBA_SMALL_M, config=cfg, rows=rows,
                                   command="python -m benchmarks.decode " + " ".join(argv or sys.argv[1:])))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
