"""The decoder's elementwise kernels, each backend against the NumPy reference, at the shapes of one
training step of the peers benchmark's decoder (B = 8, T = 128, 8 heads of 32, d = 256, I = 688).

    python -m benchmarks.elementwise --threads 1     # results/elementwise.json (seconds)
    python -m benchmarks.elementwise --quick         # tiny shapes (CI)

One row per kernel (RoPE, the causal softmax, SwiGLU's gate, RMSNorm, each way; inference's causal_attention,
whose reference is two products and the softmax), float32:
``ratio`` is the median over interleaved rounds of t(backend) / t(reference) from the same round.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from . import harness

FULL = dict(B=8, T=128, H=8, h=32, d=256, I=688, rounds=25, target_s=0.02)
QUICK = dict(B=2, T=8, H=2, h=4, d=8, I=12, rounds=3, target_s=0.001)


def inputs(c, seed=0):
    """{kernel name: its arguments}, the shapes one decoder layer gives them."""
    from lowrank.kernels import reference as ref
    from lowrank.nn.rotary import rope_tables
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)              # noqa: E731
    B, T, H, h, d, I = c["B"], c["T"], c["H"], c["h"], c["d"], c["I"]
    S = 3 * f(B, H, 1, T, T)
    q = f(B, T, H, 1, h).transpose(0, 2, 3, 1, 4)                # the head-major view attention rotates
    cos, sin = rope_tables(T, h, 10000.0, np.float32)
    g, u, dy, x, w = f(B * T, I), f(B * T, I), f(B * T, I), f(B, T, d), f(d)
    rstd = ref.rms_norm(x, w, 1e-6)[1]
    return {"rope_forward": (q, cos, sin), "rope_backward": (q, cos, sin),
            "causal_softmax": (S,), "causal_softmax_backward": (f(*S.shape), ref.causal_softmax(S)),
            "causal_attention": (q, f(B, H, T, h), f(B, H, T, h)),
            "silu_and_mul": (g, u), "silu_and_mul_backward": (dy, g, u),
            "rms_norm": (x, w, 1e-6), "rms_norm_backward": (f(B, T, d), x, w, rstd)}


def run(c, backend="numba"):
    """``backend``: a built-in or registered name, an import path or a .py file (``backends.resolve``);
    a function it lacks runs the reference's (its row then reads about 1)."""
    from lowrank.kernels import api, backends
    ref, other = backends.load("numpy"), backends.resolve(backend)
    rows = []
    for name, args in inputs(c).items():
        variants = {"reference": lambda: getattr(ref, name)(*args), backend: lambda: getattr(other, name)(*args)}
        res = harness.interleaved(variants, c["rounds"], "reference", c["target_s"])
        rows.append(dict(kernel=name, reference_ms=1e3 * res["reference"]["median_s"],
                         backend_ms=1e3 * res[backend]["median_s"], ratio=res[backend]["ratio"]))
        print(f"{name:24s} reference {rows[-1]['reference_ms']:7.3f} ms  {backend} {rows[-1]['backend_ms']:7.3f} ms"
              f"  x{rows[-1]['ratio']:.2f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes: finishes in seconds (CI)")
    p.add_argument("--threads", type=int, default=1, help="BLAS and Numba threads (default 1)")
    p.add_argument("--backend", default="numba",
                   help="the backend set against the reference: a name, an import path or a .py file (default numba)")
    p.add_argument("--out", default=None, help="JSON path (default results/elementwise[_quick].json)")
    a = p.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    out = a.out or os.path.join(harness.RESULTS, f"elementwise{'_quick' if a.quick else ''}.json")
    mach, rows = harness.run_pinned(a, lambda c: run(c, a.backend), cfg)
    harness.write_json(out, {"benchmark": "elementwise", "command": "python -m benchmarks.elementwise",
                             "argv": argv, "config": cfg, "machine": mach, "rows": rows})
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
