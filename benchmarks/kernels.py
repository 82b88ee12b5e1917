"""Kernel benchmark: the fused LoRA path against its floor, the bare base product x·Wᵀ.

    python -m benchmarks.kernels --threads 1   # pruned full matrix (see FULL): 5-12 min on the shared
                                               # 2 cores; writes results/kernels.{json,png}
    python -m benchmarks.kernels --quick       # tiny shapes, seconds (CI)
    python -m benchmarks.kernels --quick --backend examples/torch_backend.py   # + any backend (repeatable):
                                               # a registered name, an import path or a .py file

Groups (float32, no bias, like an LLM projection; every variant interleaved with the base):
  forward   base | numpy (reference, unfused: a temporary + add) | numba (fused: GEMM beta = 1)
            | term_numba / term_numpy (the LoRA work alone, added into a ready y: on a noisy machine
              1 + term/base estimates fused/base far more tightly than two big timings do)
            | concat ([x, h]·[W, s·B]ᵀ, rebuilt per call) | merged (W + s·B·A rebuilt per call)
            | merged_cached (inference with a pre-merged W: the base by construction)
  backward  numpy / numba lora_backward (W frozen, dx needed) | full (dense_backward with dW)
  train     one step, forward + backward + SGD update: LoRA (numpy, numba) vs full fine-tuning
  multi     one adapter vs mixed batches of K adapters: BGMV (per-row index), SGMV (sorted rows),
            loop_numpy (base once + per-adapter gather/scatter, PEFT's mixed batch), loop_batches
            (a separate fused forward per adapter's rows)
  --backend NAME adds NAME (forward, backward), lora_NAME (train), bgmv_NAME and sgmv_NAME (multi)
            beside the built-in variants, in the same rounds; its native functions run, the rest are
            the reference's (``lowrank.kernels.backends.describe``, printed first); a backend with its own thread
            pool pins it to --threads through an optional ``set_num_threads(n)`` function
Ratios are per-round t(variant) / t(base), medians over rounds (a target "a/b" between two
variants is ratio(a) / ratio(b)); each timed sample follows ``settle_s`` of untimed calls of the same
variant, because the variants use two thread pools (NumPy's BLAS for the NumPy ones, numba_cpu's pool
for the Numba ones) and one's spinning workers must not run inside the other's timing. GF/s and GB/s count the
minimum FLOPs and bytes (each operand touched once) against this run's measured floors.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time

import numpy as np

from lowrank.kernels import api, backends
from lowrank.kernels import numba_cpu as nb
from lowrank.kernels import reference as ref
from lowrank.kernels.numba_cpu.blas import gemm_acc

from . import harness

SQUARE, TALL, WIDE = (4096, 4096), (11008, 4096), (4096, 11008)
# The matrix, pruned to what 2 shared (and, when measured, heavily loaded) cores can time
# in ~15-20 minutes: every rank at N = 1, 16 on 4096²; r = 16 beyond that; the LLaMA MLP shapes at
# small N; the N = 2048 products (~70 GFLOP each) only for the rows the targets name.
FULL = dict(
    forward=[(SQUARE, r, N) for N in (1, 16) for r in (8, 16, 64)] + [(SQUARE, 16, 256), (SQUARE, 16, 2048)]
    + [(shape, 16, N) for shape in (TALL, WIDE) for N in (1, 16)],
    step=[(SQUARE, 16, N) for N in (1, 16, 256, 2048)] + [(shape, 16, 16) for shape in (TALL, WIDE)],
    multi=[(SQUARE, 16, N, K) for N in (16, 256) for K in (4, 16)],
    skip={2048: {"backward", "forward:concat", "forward:merged", "forward:merged_cached", "train:lora_numpy"}},
    target_s=0.05, rounds={1: 9, 16: 7, 256: 5, 2048: 3}, target_shape=SQUARE, target_r=16,
    target_Ns=(1, 256, 2048), step_N=2048, multi_N=256, settle_s=0.3)
QUICK = dict(
    forward=[((96, 64), r, N) for N in (1, 16) for r in (1, 4)],
    step=[((96, 64), 4, N) for N in (1, 16)],
    multi=[((96, 64), 4, 16, K) for K in (4, 16)],
    skip={16: {"backward", "forward:merged"}}, target_s=0.002, rounds={1: 3, 16: 3}, target_shape=(96, 64), target_r=4,
    target_Ns=(1, 16), step_N=16, multi_N=16, settle_s=0.001)


def _data(D_out, D_in, r, N, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32) / np.sqrt(s[-1])  # noqa: E731
    return dict(x=f(N, D_in), W=f(D_out, D_in), A=f(r, D_in), B=f(D_out, r), dy=f(N, D_out))


def forward_variants(d, s=2.0, backends=None):
    x, W, A, B = d["x"], d["W"], d["A"], d["B"]
    Wm, y = W + s * (B @ A), x @ W.T
    return {**{name: functools.partial(k.lora_forward, x, W, A, B, s) for name, k in (backends or {}).items()},
        "base": lambda: x @ W.T,
        "numpy": lambda: ref.lora_forward(x, W, A, B, s),
        "numba": lambda: nb.lora_forward(x, W, A, B, s),
        "concat": lambda: np.concatenate([x, x @ A.T], 1) @ np.concatenate([W, s * B], 1).T,
        "merged": lambda: x @ (W + s * (B @ A)).T,
        "merged_cached": lambda: x @ Wm.T,
        "term_numba": lambda: gemm_acc(y, x @ A.T, B.T, s),     # the LoRA work alone, added into y
        "term_numpy": lambda: y.__iadd__((s * (x @ A.T)) @ B.T),
    }


def backward_variants(d, s=2.0, backends=None):
    x, W, A, B, dy = d["x"], d["W"], d["A"], d["B"], d["dy"]
    h = x @ A.T
    return {**{name: functools.partial(k.lora_backward, dy, x, h, W, A, B, s) for name, k in (backends or {}).items()},
        "base": lambda: x @ W.T,
        "numpy": lambda: ref.lora_backward(dy, x, h, W, A, B, s),
        "numba": lambda: nb.lora_backward(dy, x, h, W, A, B, s),
        "full": lambda: nb.dense_backward(dy, x, W, need_db=False),
    }


def train_variants(d, s=2.0, lr=1e-6, backends=None):
    x, W, A, B, dy = d["x"], d["W"], d["A"], d["B"], d["dy"]
    W_full = W.copy()

    def lora_step(k):
        y, h = k.lora_forward(x, W, A, B, s)
        _, dA, dB = k.lora_backward(dy, x, h, W, A, B, s)
        A.__isub__(lr * dA)
        B.__isub__(lr * dB)

    def full_step():
        nb.dense_forward(x, W_full)
        _, dW, _ = nb.dense_backward(dy, x, W_full, need_db=False)
        dW *= lr
        W_full.__isub__(dW)                        # in place: one read-modify-write pass over W

    return {"base": lambda: x @ W.T, "lora_numpy": lambda: lora_step(ref), "lora_numba": lambda: lora_step(nb),
            "full": full_step, **{f"lora_{name}": functools.partial(lora_step, k) for name, k in (backends or {}).items()}}


def multi_variants(d, K, s=2.0, seed=1, backends=None):
    rng = np.random.default_rng(seed)
    x, W, A, B = d["x"], d["W"], d["A"], d["B"]
    N, r = x.shape[0], A.shape[0]
    A_stack = np.stack([A * (1 + 0.1 * k) for k in range(K)])          # (K, r, D_in)
    B_stack = np.stack([B * (1 - 0.05 * k) for k in range(K)])         # (K, D_out, r)
    scalings = np.full(K, s, np.float32)
    index = rng.integers(0, K, N)
    order = np.argsort(index, kind="stable")
    xs = np.ascontiguousarray(x[order])
    indptr = np.searchsorted(index[order], np.arange(K + 1))
    seg = np.arange(K)

    def loop_batches():
        y = np.empty((N, W.shape[0]), np.float32)
        for k in range(K):
            rows = np.nonzero(index == k)[0]
            y[rows] = nb.lora_forward(x[rows], W, A_stack[k], B_stack[k], s)[0]
        return y

    return {
        "base": lambda: x @ W.T,
        "single": lambda: nb.lora_forward(x, W, A, B, s),
        "bgmv": lambda: nb.lora_forward_multi(x, W, A_stack, B_stack, scalings, index),
        "sgmv": lambda: nb.lora_forward_sgmv(xs, W, A_stack, B_stack, scalings, indptr, seg),
        "loop_numpy": lambda: ref.lora_forward_multi(x, W, A_stack, B_stack, scalings, index),
        "loop_batches": loop_batches,
        **{f"{kind}_{name}": functools.partial(fn, *args) for name, k in (backends or {}).items()
           for kind, fn, args in (("bgmv", k.lora_forward_multi, (x, W, A_stack, B_stack, scalings, index)),
                                  ("sgmv", k.lora_forward_sgmv, (xs, W, A_stack, B_stack, scalings, indptr, seg)))},
    }


def cost(group, variant, D_out, D_in, r, N):
    """(FLOPs, bytes) touched at least once by ``variant``; float32."""
    base = 2.0 * N * D_in * D_out
    lora = 2.0 * N * r * (D_in + D_out)
    io = 4.0 * (N * D_in + D_in * D_out + N * D_out)
    lora_io = 4.0 * r * (D_in + D_out)
    if variant in ("base", "merged_cached"):
        return base, io
    if variant.startswith("term"):
        return lora, 4.0 * (N * D_in + 2 * N * D_out) + lora_io
    if group == "backward" and variant == "full":
        return 2 * base, io + 4.0 * D_in * D_out
    if group == "backward":
        return base + 2 * lora, io + lora_io
    if group == "train" and variant == "full":
        return 3 * base, io + 3 * 4.0 * D_in * D_out
    if group == "train":
        return 2 * base + 4 * lora, io + lora_io
    return base + lora, io + lora_io


def run(cfg, log=print, backends=None):
    """Time cfg's matrix; ``backends`` {name: kernel backend} join every group beside the built-in ones."""
    rows, extra = [], dict(backends=backends)

    def timed(group, variants, N):
        """Interleave ``variants`` minus those cfg["skip"][N] names as "group" or "group:variant"."""
        skip = cfg["skip"].get(N, set())
        keep = {k: v for k, v in variants.items() if f"{group}:{k}" not in skip}
        return harness.interleaved(keep, cfg["rounds"][N], "base", cfg["target_s"], cfg["settle_s"])

    def record(group, shape, r, N, K, res):
        D_out, D_in = shape
        for variant, m in res.items():
            flops, nbytes = cost(group, variant, D_out, D_in, r, N)
            rows.append(dict(group=group, variant=variant, D_out=D_out, D_in=D_in, r=r, N=N, K=K,
                             median_ms=1e3 * m["median_s"], min_ms=1e3 * m["min_s"], ratio=m["ratio"],
                             gflops=flops / m["median_s"] / 1e9, gbs=nbytes / m["median_s"] / 1e9,
                             rounds=m["rounds"], inner=m["inner"]))
            log(f"{group:8s} {D_out:5d}x{D_in:<5d} r={r:<3d} N={N:<5d} K={K:<3d} {variant:14s} "
                f"{1e3 * m['median_s']:10.3f} ms  x{m['ratio']:6.3f}  {rows[-1]['gflops']:7.1f} GF/s "
                f"{rows[-1]['gbs']:6.1f} GB/s")

    for shape, r, N in cfg["forward"]:
        record("forward", shape, r, N, 1, timed("forward", forward_variants(_data(*shape, r, N), **extra), N))
    for shape, r, N in cfg["step"]:
        d = _data(*shape, r, N)
        if "backward" not in cfg["skip"].get(N, ()):
            record("backward", shape, r, N, 1, timed("backward", backward_variants(d, **extra), N))
        record("train", shape, r, N, 1, timed("train", train_variants(d, **extra), N))
    for shape, r, N, K in cfg["multi"]:
        record("multi", shape, r, N, K, timed("multi", multi_variants(_data(*shape, r, N), K, **extra), N))
    return rows


def targets(rows, cfg, backends=()):
    """The issue's target figures (at ``cfg``'s target shape), looked up in ``rows``; None if absent."""
    def get(group, variant, **k):
        for row in rows:
            if row["group"] == group and row["variant"] == variant and all(row[a] == v for a, v in k.items()):
                return row
        return None

    def ratio(a, b):
        """a / b through their per-round ratios to the same base: steadier than a ratio of medians."""
        return a["ratio"] / b["ratio"] if a and b else None

    (D_out, D_in), r = cfg["target_shape"], cfg["target_r"]
    at, out = f"{D_out}x{D_in} r={r}", {}
    for N in cfg["target_Ns"]:
        for variant in ("numba", "numpy", *backends):
            row = get("forward", variant, D_out=D_out, D_in=D_in, r=r, N=N)
            out[f"forward {variant}/base {at} N={N}"] = row and row["ratio"]
            if variant in ("numba", "numpy"):
                row = get("forward", f"term_{variant}", D_out=D_out, D_in=D_in, r=r, N=N)
                out[f"forward 1 + term_{variant}/base {at} N={N}"] = row and 1 + row["ratio"]
    k = dict(D_out=D_out, D_in=D_in, r=r, N=cfg["step_N"])
    for variant in ("lora_numba", "lora_numpy", *(f"lora_{b}" for b in backends)):
        out[f"train {variant}/full {at} N={k['N']}"] = ratio(get("train", variant, **k), get("train", "full", **k))
    k = dict(D_out=D_out, D_in=D_in, r=r, N=cfg["multi_N"], K=16)
    pairs = [("bgmv", "single"), ("sgmv", "single"), ("loop_numpy", "bgmv"), ("loop_batches", "bgmv")]
    for a, b in pairs + [(f"{kind}_{name}", kind) for name in backends for kind in ("bgmv", "sgmv")]:
        out[f"multi K=16 {a}/{b} {at} N={k['N']}"] = ratio(get("multi", a, **k), get("multi", b, **k))
    return out


def plot(rows, path, r):
    """PNG of the forward, train and multi ratios at rank ``r``, one panel per group."""
    panels = {}
    for row in rows:
        if row["group"] in ("forward", "train", "multi") and row["r"] == r and row["variant"] != "base":
            label = f"{row['D_out']}x{row['D_in']} N={row['N']}" + (f" K={row['K']}" if row["K"] > 1 else "")
            panels.setdefault(row["group"], {}).setdefault(label, {})[row["variant"]] = row["ratio"]
    harness.plot_ratios(path, panels, f"LoRA kernels vs the base product x·Wᵀ (r={r}, float32, medians)")


def extra_backends(specs) -> dict:
    """{name: backend} for ``--backend`` specs; a module's ``NAME`` (else its file's) names its variants."""
    out = {}
    for spec in specs:
        b = backends.resolve(spec)
        name = spec if backends.is_backend(spec) else getattr(b.module, "NAME", b.name)
        if name in ("numpy", "numba") or name in out:
            continue                                     # already in the table
        print(backends.describe(b).replace(repr(b.name), repr(name), 1))
        out[name] = b
    return out


def main(argv=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--backend", action="append", default=[])
    b, argv = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    a = harness.parse_args(argv, __doc__, "kernels")
    cfg, out = (QUICK if a.quick else FULL), a.out
    backends = extra_backends(b.backend)
    for k in backends.values():                          # a backend with its own thread pool pins it here
        getattr(k.module, "set_num_threads", lambda n: None)(a.threads)
    t0 = time.time()
    mach, rows = harness.run_pinned(a, functools.partial(run, backends=backends), cfg)
    for row in rows:
        row["pct_peak"] = 100 * row["gflops"] / mach["blas_peak_gflops"]
        row["pct_bw"] = 100 * row["gbs"] / mach["copy_gbs"]
    tg = targets(rows, cfg, tuple(backends))
    for name, v in tg.items():
        print(f"target  {name:45s} {'-' if v is None else f'{v:.3f}'}")
    payload = dict(command="python -m benchmarks.kernels" + (" --quick" if a.quick else ""), argv=sys.argv[1:],
                   machine=mach, config=cfg, rows=rows, targets=tg, wall_s=time.time() - t0,
                   backends={name: backends.describe(k) for name, k in backends.items()})
    harness.write_json(out, payload)
    plot(rows, out[:-5] + ".png", cfg["target_r"])
    print(f"wrote {out} and {out[:-5]}.png in {time.time() - t0:.1f} s")
    return payload


if __name__ == "__main__":
    main()
