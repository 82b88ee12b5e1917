"""GPU benchmark: the CuPy fused LoRA forward against cuBLAS's base product, on one device.

    python -m benchmarks.gpu            # the full matrix (a few minutes on an H200)
    python -m benchmarks.gpu --quick    # (4096, 4096), N in {1, 256}, r = 16: well under a minute

Matrix: N in {1, 16, 256, 4096} × Llama-7B layer shapes (D_out, D_in) in {(4096, 4096),
(11008, 4096), (4096, 11008)} × r in {8, 16, 64} × float16, float32 (float32 accumulation,
no TF32). Each case times, with CUDA events (cupyx.profiler.benchmark, medians):

    base    cuBLAS alone: y = x Wᵀ (cublasGemmEx into a preallocated y)
    fused   cupy_gpu.lora_forward(x, W, A, B, s, b): shrink + epilogue + cuBLAS beta = 1
            (or the fused GEMV for N <= config.CUPY_GEMV_MAX_N)
    graph   the same calls replayed from a CUDA graph (no Python launch gaps); null if capture fails

and reports fused/base, achieved TB/s (each operand read or written once) and TFLOP/s against
the device-to-device copy bandwidth and the cuBLAS GEMM rate measured in the same run. Inputs
rotate among enough copies to exceed 3× the L2 cache, so small cases are not timed from L2.
Mixed batch: N = 256, (4096, 4096), r = 16, 16 adapters (BGMV, random rows) against one.
Writes benchmarks/results/gpu_<device>_<date>[_quick].json and prints a short table.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re

import numpy as np

from lowrank.nn.device import cupy_module

from . import harness

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))        # (D_out, D_in): q/o, up/gate, down
NS, RANKS, DTYPES = (1, 16, 256, 4096), (8, 16, 64), ("float16", "float32")
QUICK = dict(shapes=SHAPES[:1], ns=(1, 256), ranks=(16,))


def _time(fn, max_s=0.3, repeat=200):
    """Median GPU seconds per call (CUDA events), after warm-up."""
    from cupyx.profiler import benchmark
    res = benchmark(fn, n_repeat=repeat, n_warmup=5, max_duration=max_s)
    return float(np.median(res.gpu_times[0]))


def _graph_time(fn, calls):
    """Seconds per call of ``fn`` replayed ``calls`` times from one captured CUDA graph, or None."""
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            fn()
            stream.synchronize()
            stream.begin_capture()
            for _ in range(calls):
                fn()
            graph = stream.end_capture()
            return _time(graph.launch) / calls
    except Exception as e:                          # capture is best effort; eager numbers stand alone
        return f"capture failed: {type(e).__name__}: {e}"[:200]


def ceilings(quick):
    """This run's device copy bandwidth (bytes read + written) and cuBLAS GEMM rates."""
    import cupy
    from lowrank.kernels import cupy_gpu as g
    n = (1 << 26) if quick else (1 << 28)                     # 256 MiB or 1 GiB of float32
    a, b = cupy.ones(n, cupy.float32), cupy.empty(n, cupy.float32)
    t = _time(lambda: b.data.copy_from_device_async(a.data, a.nbytes), max_s=1.0, repeat=20)
    out = {"copy_TBps": 2 * a.nbytes / t / 1e12}
    del a, b
    m = 4096 if quick else 8192
    for dt in DTYPES:
        x = cupy.random.standard_normal((m, m), dtype=cupy.float32).astype(dt)
        y = cupy.empty((m, m), dt)
        t = _time(lambda: g.device.gemm(x, x, y, trans_b=True), max_s=1.0, repeat=20)
        out[f"gemm_{dt}_TFLOPs"] = 2 * m ** 3 / t / 1e12
    return out


def _operands(dt, N, D_in, D_out, r, sets, K=1):
    """``sets`` independent random operand sets (so repeated calls do not run from L2)."""
    import cupy
    rnd = lambda *s: (cupy.random.standard_normal(s, dtype=cupy.float32) * 0.1).astype(dt)   # noqa: E731
    A_shape, B_shape = ((r, D_in), (D_out, r)) if K == 1 else ((K, r, D_in), (K, D_out, r))
    return [dict(x=rnd(N, D_in), W=rnd(D_out, D_in), A=rnd(*A_shape), B=rnd(*B_shape), b=rnd(D_out),
                 y=cupy.empty((N, D_out), dt)) for _ in range(sets)]


def _rotating(fn, sets):
    """A no-argument callable that applies ``fn`` to the operand sets in turn."""
    state = {"i": 0}

    def call():
        fn(sets[state["i"]])
        state["i"] = (state["i"] + 1) % len(sets)
    return call


def case(dt, N, D_out, D_in, r, l2_bytes):
    """Time base / fused / graph for one configuration; returns its row."""
    from lowrank.kernels import cupy_gpu as g
    item = np.dtype(dt).itemsize
    w_bytes = item * (D_out * D_in + N * (D_in + D_out))
    sets = _operands(dt, N, D_in, D_out, r, max(1, -(-3 * l2_bytes // w_bytes)))
    base = _rotating(lambda o: g.device.gemm(o["x"], o["W"], o["y"], trans_b=True), sets)
    fused = _rotating(lambda o: g.lora_forward(o["x"], o["W"], o["A"], o["B"], 2.0, o["b"]), sets)
    t_base, t_fused = _time(base), _time(fused)
    t_base = min(t_base, _time(base))                      # base before and after: the better one
    calls = len(sets) * max(1, -(-8 // len(sets)))
    t_graph, t_graph_base = _graph_time(fused, calls), _graph_time(base, calls)
    flops = 2 * N * D_in * D_out + 2 * N * r * (D_in + D_out)
    nbytes = w_bytes + item * (r * (D_in + D_out) + D_out + N * r)
    row = dict(dtype=dt, N=N, D_out=D_out, D_in=D_in, r=r, sets=len(sets), base_s=t_base, fused_s=t_fused,
               ratio=t_fused / t_base, fused_TBps=nbytes / t_fused / 1e12, fused_TFLOPs=flops / t_fused / 1e12,
               graph_s=t_graph, graph_base_s=t_graph_base)
    if isinstance(t_graph, float) and isinstance(t_graph_base, float):
        row.update(graph_ratio=t_graph / t_graph_base, graph_TBps=nbytes / t_graph / 1e12)
    return row


def mixed(dt, N=256, D=4096, r=16, K=16):
    """One adapter (lora_forward) vs a BGMV batch of K adapters, rows assigned at random."""
    import cupy
    from lowrank.kernels import cupy_gpu as g
    one, = _operands(dt, N, D, D, r, 1)
    many, = _operands(dt, N, D, D, r, 1, K)
    scal = cupy.full(K, 2.0, dt)
    idx = cupy.asarray(np.random.default_rng(0).integers(0, K, N))
    idx1 = cupy.zeros(N, cupy.int64)
    t = {"one": _time(lambda: g.lora_forward(one["x"], one["W"], one["A"], one["B"], 2.0, one["b"])),
         "multi_K1": _time(lambda: g.lora_forward_multi(one["x"], one["W"], one["A"][None], one["B"][None],
                                                        scal[:1], idx1, one["b"])),
         f"multi_K{K}": _time(lambda: g.lora_forward_multi(many["x"], many["W"], many["A"], many["B"], scal, idx,
                                                           many["b"]))}
    return dict(dtype=dt, N=N, D=D, r=r, K=K, **{f"{k}_s": v for k, v in t.items()},
                ratio=t[f"multi_K{K}"] / t["one"])


def targets(rows, mixes, ceil):
    """The issue's H200 targets, evaluated on this run's measurements (eager and graph)."""
    out = {}
    for dt in DTYPES:
        big = [r for r in rows if r["dtype"] == dt and (r["D_out"], r["D_in"]) == (4096, 4096)
               and r["r"] == 16 and r["N"] >= 256]
        n1 = [r for r in rows if r["dtype"] == dt and r["N"] == 1]
        out[dt] = {
            "fused/base at 4096², r=16, N>=256 (<= 1.05)": max((r["ratio"] for r in big), default=None),
            "fused/base, graph replay": max((r["graph_ratio"] for r in big if "graph_ratio" in r), default=None),
            "N=1 TB/s / copy TB/s (>= 0.8)": min((r["fused_TBps"] / ceil["copy_TBps"] for r in n1), default=None),
            "N=1 fraction, graph replay": min((r["graph_TBps"] / ceil["copy_TBps"] for r in n1 if "graph_TBps" in r),
                                              default=None),
            "mixed 16 adapters / one at N=256 (<= 1.15)": next((m["ratio"] for m in mixes if m["dtype"] == dt), None),
        }
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one shape, N in {1, 256}, r = 16")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    cupy = cupy_module()
    if cupy is None:
        raise SystemExit("benchmarks.gpu: no usable CUDA device here (CuPy missing or cupy.is_available() False)")
    m = QUICK if args.quick else dict(shapes=SHAPES, ns=NS, ranks=RANKS)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    device = dict(name=name, cc=f"{props['major']}.{props['minor']}", sms=props["multiProcessorCount"],
                  l2_bytes=props["l2CacheSize"], cupy=cupy.__version__,
                  cuda_runtime=cupy.cuda.runtime.runtimeGetVersion())
    ceil = ceilings(args.quick)
    print(f"{name} (sm_{device['cc'].replace('.', '')}, {device['sms']} SMs): copy {ceil['copy_TBps']:.2f} TB/s, "
          + ", ".join(f"{k[5:-7]} GEMM {v:.0f} TFLOP/s" for k, v in ceil.items() if k.startswith("gemm")))
    rows = []
    for dt in DTYPES:
        for D_out, D_in in m["shapes"]:
            for N in m["ns"]:
                for r in m["ranks"]:
                    rows.append(case(dt, N, D_out, D_in, r, device["l2_bytes"]))
                    cupy.get_default_memory_pool().free_all_blocks()
    mixes = [mixed(dt) for dt in DTYPES]
    result = dict(device=device, date=datetime.date.today().isoformat(), quick=args.quick, ceilings=ceil,
                  rows=rows, mixed=mixes, targets=targets(rows, mixes, ceil))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    path = os.path.join(args.out, f"gpu_{slug}_{result['date']}{'_quick' if args.quick else ''}.json")
    harness.write_json(path, result)
    _print(rows, mixes, result["targets"], path)
    return result


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, float) else "  n/a"


def _print(rows, mixes, tgt, path):
    print(f"{'dtype':8}{'D_out x D_in':>14}{'N':>6}{'r':>4}{'base us':>10}{'fused us':>10}{'ratio':>7}"
          f"{'graph':>7}{'TB/s':>7}{'TFLOP/s':>9}")
    for r in rows:
        if (r["D_out"], r["D_in"]) != (4096, 4096) and r["r"] != 16:
            continue                                   # the JSON has every row; print the core ones
        print(f"{r['dtype']:8}{r['D_out']:>7}x{r['D_in']:<6}{r['N']:>6}{r['r']:>4}{r['base_s'] * 1e6:>10.1f}"
              f"{r['fused_s'] * 1e6:>10.1f}{r['ratio']:>7.3f}{_fmt(r.get('graph_ratio'), '7.3f'):>7}"
              f"{r['fused_TBps']:>7.2f}{r['fused_TFLOPs']:>9.1f}")
    for mx in mixes:
        print(f"mixed {mx['dtype']}: 16 adapters {mx['multi_K16_s'] * 1e6:.1f} us, one {mx['one_s'] * 1e6:.1f} us,"
              f" ratio {mx['ratio']:.3f}")
    for dt, t in tgt.items():
        print(dt + ": " + "; ".join(f"{k} {_fmt(v, '.3f')}" for k, v in t.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
