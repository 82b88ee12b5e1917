"""NF4 (QLoRA) benchmark: the 4-bit products against the float32 base product, and storage.

    python -m benchmarks.nf4            # (4096, 4096) at N = 1, 16, 256; results/nf4.json
    python -m benchmarks.nf4 --quick    # (512, 1024), seconds (CI); results/nf4_quick.json
    python -m benchmarks.nf4 --threads 1

Variants, interleaved by ``benchmarks.harness`` (ratio = per-round t / t(base), median):
  forward   base (x·Wᵀ, float32 W) | numba nf4_matmul | numpy reference nf4_matmul (N > 1 only)
  backward  base_dx (dy·W, float32 W) | numba nf4_matmul_dx
Targets: numba nf4_matmul / base <= 1.0 at N = 1 and <= 1.25 at N = 256 (4096²).
Storage: bits per weight counted from the real buffers of a quantized (D_out, D_in) weight,
with and without double quantization (targets <= 4.13 and 4.5).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from lowrank.kernels.numba_cpu import nf4 as nb
from lowrank.kernels.reference import nf4 as ref
from lowrank.nn.quant import quantize_nf4

from . import harness

FULL = dict(shape=(4096, 4096), Ns=(1, 16, 256), rounds=7, settle_s=0.3)
QUICK = dict(shape=(512, 1024), Ns=(1, 16), rounds=3, settle_s=0.001)


def storage(shape) -> dict:
    """Bits per weight of a real quantized Gaussian weight, per buffer and in total."""
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = {}
    for dq in (True, False):
        q = quantize_nf4(w, 64, dq)
        out["double_quant" if dq else "plain"] = {
            "bits_per_param": q.bits_per_param, "nbytes": q.nbytes,
            "buffers": {k: int(a.nbytes) for k, a in q.buffers().items()},
            "max_abs_error": float(np.abs(q.dequantize() - w).max())}
    return out


def run(cfg) -> list[dict]:
    """One row per (group, N, variant) with the harness's medians and ratios."""
    D_out, D_in = cfg["shape"]
    rng = np.random.default_rng(1)
    q = quantize_nf4(rng.standard_normal((D_out, D_in)).astype(np.float32), 64, double_quant=False)
    packed, absmax, shape = q.data, q.absmax(), q.shape
    W = q.dequantize(np.float32)                                   # the float32 base the ratio is taken against
    rows = []
    for N in cfg["Ns"]:
        x = rng.standard_normal((N, D_in)).astype(np.float32)
        dy = rng.standard_normal((N, D_out)).astype(np.float32)
        forward = {"base": lambda: x @ W.T, "numba": lambda: nb.nf4_matmul(x, packed, absmax, shape)}
        if N > 1:
            forward["numpy"] = lambda: ref.nf4_matmul(x, packed, absmax, shape)
        backward = {"base_dx": lambda: dy @ W, "numba_dx": lambda: nb.nf4_matmul_dx(dy, packed, absmax, shape)}
        for group, variants, base in (("forward", forward, "base"), ("backward", backward, "base_dx")):
            res = harness.interleaved(variants, cfg["rounds"], base, settle_s=cfg["settle_s"])
            for name, r in res.items():
                rows.append(dict(group=group, N=N, D_out=D_out, D_in=D_in, variant=name, **r))
                print(f"{group:8s} N={N:4d} {name:9s} median {r['median_s'] * 1e3:9.3f} ms   ratio {r['ratio']:.3f}")
    return rows


def targets(rows, cfg) -> dict:
    """The issue's ratios (None when this run did not measure that N)."""
    def ratio(N):
        hit = [r["ratio"] for r in rows if r["group"] == "forward" and r["variant"] == "numba" and r["N"] == N]
        return hit[0] if hit else None
    label = "x".join(map(str, cfg["shape"]))
    return {f"numba nf4_matmul / base {label} N=1 (<= 1.0)": ratio(1),
            f"numba nf4_matmul / base {label} N=256 (<= 1.25)": ratio(256)}


def main(argv=None):
    a = harness.parse_args(argv, __doc__, "nf4")
    cfg, out = (QUICK if a.quick else FULL), a.out
    t0 = time.time()
    mach, rows = harness.run_pinned(a, run, cfg)
    bits = storage(cfg["shape"])
    for kind, s in bits.items():
        print(f"storage  {kind:12s} {s['bits_per_param']:.4f} bits/weight  {s['buffers']}")
    tg = targets(rows, cfg)
    tg["bits/weight double quant (<= 4.13)"] = bits["double_quant"]["bits_per_param"]
    tg["bits/weight plain (<= 4.5)"] = bits["plain"]["bits_per_param"]
    for name, v in tg.items():
        print(f"target  {name:50s} {'-' if v is None else f'{v:.3f}'}")
    payload = dict(command="python -m benchmarks.nf4" + (" --quick" if a.quick else ""), argv=sys.argv[1:],
                   machine=mach, config=cfg, rows=rows, storage=bits, targets=tg, wall_s=time.time() - t0)
    harness.write_json(out, payload)
    print(f"wrote {out} in {time.time() - t0:.1f} s")
    return payload


if __name__ == "__main__":
    main()
