"""GGUF benchmark: llama.cpp's block formats multiplied in place against the float32 base product.

    python -m benchmarks.gguf            # (4096, 4096) at N = 1 and 256, 1 thread; results/gguf.json
    python -m benchmarks.gguf --quick    # (512, 1024) at N = 1 and 64, seconds (CI); results/gguf_quick.json
    python -m benchmarks.gguf --threads 2

Variants, interleaved by ``benchmarks.harness`` (ratio = per-round t / t(base), median), per format
Q8_0, Q4_0, Q4_1 and Q4_K and per N:
  base   x·Wᵀ with W float32 (the dequantized weight), BLAS
  numba  numba_cpu gguf_matmul(x, blocks): the fused GEMV for small N, tiles of W and BLAS above
Targets (the issue's, 4096², 1 thread): N = 1: Q4_0 <= 0.35 (its bytes are 0.14 of float32's), Q8_0 <= 0.5;
N = 256: every format <= 1.25. ``--threads`` defaults to 1 here, the targets' setting.
Bytes per weight are counted from the real blocks.
"""
from __future__ import annotations

import sys
import time

import numpy as np
from gguf import GGMLQuantizationType, quants

from lowrank.kernels.numba_cpu import gguf as nb

from . import harness

FULL = dict(shape=(4096, 4096), Ns=(1, 256), qtypes=("Q8_0", "Q4_0", "Q4_1", "Q4_K"), rounds=7, settle_s=0.3)
QUICK = dict(shape=(512, 1024), Ns=(1, 64), qtypes=("Q8_0", "Q4_0", "Q4_1", "Q4_K"), rounds=3, settle_s=0.001)
TARGETS = {(1, "Q4_0"): 0.35, (1, "Q8_0"): 0.5, **{(256, q): 1.25 for q in FULL["qtypes"]}}


def weight_blocks(qtype: str, shape, rng) -> np.ndarray:
    """(D_out, D_in / B · S) uint8 blocks of a Gaussian weight: quantized by gguf, or for Q4_K (gguf-py has no
    Q4_K quantizer) random bytes with f16 d and dmin that give weights of about unit size."""
    D_out, D_in = shape
    if qtype != "Q4_K":
        return quants.quantize(rng.standard_normal(shape).astype(np.float32), GGMLQuantizationType[qtype])
    raw = rng.integers(0, 256, (D_out * D_in // 256, 144), dtype=np.uint8)
    raw[:, :4] = rng.uniform(0.002, 0.02, (raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    return raw.reshape(D_out, -1)


def run(cfg) -> list[dict]:
    """One row per (format, N, variant) with the harness's medians and ratios."""
    D_out, D_in = cfg["shape"]
    rng = np.random.default_rng(1)
    rows = []
    for qtype in cfg["qtypes"]:
        blocks = weight_blocks(qtype, (D_out, D_in), rng)
        W = nb.gguf_dequantize(blocks, qtype, (D_out, D_in))          # the float32 base the ratio is taken against
        for N in cfg["Ns"]:
            x = rng.standard_normal((N, D_in)).astype(np.float32)
            variants = {"base": lambda: x @ W.T, "numba": lambda: nb.gguf_matmul(x, blocks, qtype, (D_out, D_in))}
            res = harness.interleaved(variants, cfg["rounds"], "base", settle_s=cfg["settle_s"])
            for name, r in res.items():
                rows.append(dict(qtype=qtype, N=N, D_out=D_out, D_in=D_in, variant=name,
                                 bytes_per_weight=blocks.nbytes / (D_out * D_in) if name == "numba" else 4.0, **r))
                print(f"{qtype:5s} N={N:4d} {name:6s} median {r['median_s'] * 1e3:9.3f} ms   ratio {r['ratio']:.3f}")
    return rows


def targets(rows, cfg) -> dict:
    """numba / base at the issue's points that this run measured, labelled with their targets."""
    label = "x".join(map(str, cfg["shape"]))
    out = {}
    for r in rows:
        if r["variant"] == "numba":
            goal = TARGETS.get((r["N"], r["qtype"])) if cfg["shape"] == FULL["shape"] else None
            out[f"numba gguf_matmul {r['qtype']} / base {label} N={r['N']}"
                + (f" (<= {goal})" if goal is not None else "")] = r["ratio"]
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    a = harness.parse_args(argv, __doc__, "gguf")
    if not any(s.startswith("--threads") for s in argv):
        a.threads = 1                                                  # the setting
    cfg, out = (QUICK if a.quick else FULL), a.out
    t0 = time.time()
    mach, rows = harness.run_pinned(a, run, cfg)
    tg = targets(rows, cfg)
    for name, v in tg.items():
        print(f"target  {name:55s} {v:.3f}")
    payload = dict(command="python -m benchmarks.gguf" + (" --quick" if a.quick else ""), argv=argv,
                   machine=mach, config=cfg, rows=rows, targets=tg, wall_s=time.time() - t0)
    harness.write_json(out, payload)
    print(f"wrote {out} in {time.time() - t0:.1f} s")
    return payload


if __name__ == "__main__":
    main()
