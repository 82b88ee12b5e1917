"""The public conformance suite: any kernel backend against the reference, property by property.

    check_backend(backend, *, max_examples=25, dtypes=None, functions=None) -> Report
    python -m lowrank.kernels.conformance MODULE_OR_NAME        # prints the table; exit 1 on a failure
    pytest -p lowrank.kernels.pytest_plugin --lowrank-backend=MODULE_OR_NAME

Every API function the backend implements natively (``describe``) runs on hypothesis-drawn cases
(``conformance_cases``: N = 0 and 1, r > min(D_in, D_out), F-ordered and strided inputs, dropout
masks, W=None, −1 indices, zero-padded ranks, SGMV segments, NF4 with and without double
quantization) in each float dtype it claims, and each output and gradient is held to
``config.RTOL``/``ATOL`` of the reference's (float16: the reference on float32 copies of the same
values). Each call runs twice, the second time with ``np.empty`` poisoned with NaN, so an element
a kernel forgets to write fails (the first call lets a JIT backend compile outside the poison). A failure is shrunk by hypothesis to the smallest failing case, which the report prints.
Derandomized: the same backend gives the same report.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager, nullcontext
from typing import NamedTuple
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, Phase, Verbosity, given, settings

from . import config, reference
from .api import API
from .backends import describe, resolve
from .common import host
from .conformance_cases import CASES

OUTPUTS = {
    "dense_forward": ("y",), "dense_backward": ("dx", "dW", "db"),
    "lora_forward": ("y", "h"), "lora_backward": ("dx", "dA", "dB"),
    "lora_forward_multi": ("y", "h"), "lora_backward_multi": ("dx", "dA_stack", "dB_stack"),
    "lora_forward_sgmv": ("y", "h"), "lora_backward_sgmv": ("dx", "dA_stack", "dB_stack"),
    "nf4_dequantize": ("W",), "nf4_matmul": ("y",), "nf4_matmul_dx": ("dx",),
    "gguf_dequantize": ("W",), "gguf_matmul": ("y",), "gguf_matmul_dx": ("dx",), "gguf_matmul_q8": ("y",),
    "matmul": ("y",), "rope_forward": ("y",), "rope_backward": ("dx",), "causal_softmax": ("P",), "causal_softmax_backward": ("dS",),
    "causal_attention": ("O",),
    "silu_and_mul": ("y",), "silu_and_mul_backward": ("dg", "du"),
    "rms_norm": ("y", "rstd"), "rms_norm_backward": ("dx", "dw"),
    "linear_cross_entropy": ("loss_sum", "dx", "dW"),
}


class Row(NamedTuple):
    """One function in one dtype: how it did over every case drawn."""
    function: str
    dtype: str
    examples: int          # cases run (hypothesis' shrinking included)
    worst_error: float     # max |got − want| over every output of every case
    worst_ratio: float     # the same in tolerance units, max |got − want| / (atol + rtol·|want|); pass: ≤ 1
    passed: bool
    case: str              # a failure: the smallest failing case (shrunk); a pass: the case of the worst error
    message: str = ""      # what failed: the output, by how much, or what the call raised


class Report(list):
    """The rows of a conformance run; ``str()`` is the table the command line prints."""

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self)

    @property
    def failures(self) -> list:
        return [row for row in self if not row.passed]

    def __str__(self):
        lines = [f"{'function':20s} {'dtype':8s} {'cases':>5s} {'worst |err|':>11s} {'/tol':>8s}  result  case"]
        for r in self:
            lines.append(f"{r.function:20s} {r.dtype:8s} {r.examples:5d} {r.worst_error:11.2e} {r.worst_ratio:8.3f}  "
                         f"{'pass' if r.passed else 'FAIL'}    {r.case}")
            if r.message:
                lines.append(f"{'':20s} -> {r.message}")
        lines.append(f"{len(self) - len(self.failures)}/{len(self)} passed")
        return "\n".join(lines)


def check_backend(backend, *, max_examples: int = 25, dtypes=None, functions=None, oracle=None,
                  to_device=None, poison: bool = True) -> Report:
    """Run the conformance suite on ``backend``: a registered or built-in name, a module, an import
    path or a .py file. Returns a ``Report`` (rows: function, dtype, worst error, pass/fail, case).

    max_examples  hypothesis cases per function and dtype (plus the fixed edge cases)
    dtypes        the float dtypes to check; default: the ones the backend claims (``DTYPES``)
    functions     API names to check; default: every function the backend implements natively
    oracle        what to compare against (any object with the API functions); default the reference
    to_device     applied to every input array before the backend sees it (``cupy.asarray`` for a GPU)
    poison        fill ``np.empty`` buffers with NaN during backend calls (unwritten outputs show)
    """
    b = resolve(backend)
    oracle = reference if oracle is None else oracle
    unknown = set(functions or ()) - set(API)
    if unknown:
        raise ValueError(f"not API functions: {sorted(unknown)}; the API is {API}")
    names = [n for n in b.native if (functions is None or n in functions) and callable(getattr(oracle, n, None))]
    report = Report()
    for dtype in (dtypes or b.dtypes):
        for name in names:
            report.append(_check(name, getattr(b, name), getattr(oracle, name), np.dtype(dtype).name,
                                 oracle, max_examples, to_device, poison))
    return report


def _check(name, fn, oracle_fn, dtype, oracle, max_examples, to_device, poison) -> Row:
    """Drive hypothesis over ``name``'s cases; its shrinking replays the smallest failure last."""
    strategy, inputs, edges = CASES[name]
    seen = dict(n=0, err=0.0, ratio=0.0, case=None)
    failed = []

    def one(case):
        seen["n"] += 1
        args = inputs(case, dtype, oracle)
        want = oracle_fn(*(_upcast(args) if dtype == "float16" else args))      # before the backend sees args
        try:
            args = args if to_device is None else _device(args, to_device)
            if poison:
                fn(*args)                            # once plain: a JIT backend compiles outside the poison
            with _poisoned_empty() if poison else nullcontext():
                got = fn(*args)
            message, err, ratio = _compare(name, got, want, dtype)
        except Exception as e:                       # a crash is a failure too, shrunk like any other
            message, err, ratio = f"raised {type(e).__name__}: {e}", float("inf"), float("inf")
        if not message and ratio >= seen["ratio"]:
            seen.update(err=err, ratio=ratio, case=case)
        if message:
            failed.append((case, message, err, ratio))
            raise AssertionError(message)

    test = settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
                    phases=(Phase.generate, Phase.shrink), report_multiple_bugs=False,
                    verbosity=Verbosity.quiet, suppress_health_check=list(HealthCheck))(given(strategy)(one))
    try:
        test()                                       # drawn cases first: a failure among them gets shrunk
        for case in edges:                           # then the fixed edge cases, each as it is
            one(case)
    except Exception:
        if not failed:
            raise                                    # the suite itself broke, not the backend
        case, message, err, ratio = failed[-1]
        return Row(name, dtype, seen["n"], err, ratio, False, _show(case), message)
    return Row(name, dtype, seen["n"], seen["err"], seen["ratio"], True, _show(seen["case"]))


def _compare(name, got, want, dtype):
    """(message, worst |got − want|, worst in tolerance units) of every output; message '' = all pass."""
    got, want = _outputs(got), _outputs(want)
    if len(got) != len(want):
        return f"returned {len(got)} outputs, expected {len(want)} {OUTPUTS[name]}", np.inf, np.inf
    rtol, atol = config.RTOL[dtype], config.ATOL[dtype]
    err = ratio = 0.0
    for out, g, w in zip(OUTPUTS[name], got, want):
        if (g is None) != (w is None):
            return f"{out} is {'None' if g is None else 'an array'}, expected {'None' if w is None else 'an array'}" \
                   " (need_* flags)", np.inf, np.inf
        if w is None:
            continue
        g, w = host(g), np.asarray(w, np.float64)
        if g.shape != w.shape or g.dtype != np.dtype(dtype):
            return f"{out} is {g.dtype} {g.shape}, expected {dtype} {w.shape}", np.inf, np.inf
        if g.size == 0:
            continue
        d = np.abs(g.astype(np.float64) - w)
        if np.isnan(d).any():
            where = tuple(int(i) for i in np.argwhere(np.isnan(d))[0])
            return f"{out}{list(where)} is NaN (an element never written?)", np.inf, np.inf
        r = d / (atol + rtol * np.abs(w))
        if r.max() > ratio:
            err, ratio, worst = float(d.max()), float(r.max()), out
            where = tuple(int(i) for i in np.unravel_index(r.argmax(), r.shape))
            detail = f"{worst}{list(where)} = {g[where]:.6g}, expected {w[where]:.6g}"
    if ratio > 1:
        return f"{detail} (|err| {err:.3g} = {ratio:.3g}x the {dtype} tolerance)", err, ratio
    return "", err, ratio


def _outputs(result):
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _upcast(args):
    """float16 arrays as float32, a requested 'float16' as 'float32': the oracle computes on the same values."""
    return tuple(a.astype(np.float32) if getattr(a, "dtype", None) == np.float16 else
                 "float32" if isinstance(a, str) and a == "float16" else a for a in args)


def _device(args, to_device):
    return tuple(to_device(a) if isinstance(a, np.ndarray) else a for a in args)


@contextmanager
def _poisoned_empty():
    """np.empty hands out NaN-filled float buffers: an output element nobody wrote stays NaN."""
    real = np.empty

    def empty(shape, dtype=float, *args, **kwargs):
        a = real(shape, dtype, *args, **kwargs)
        if np.dtype(dtype).kind == "f":
            a.fill(np.nan)
        return a

    with mock.patch.object(np, "empty", empty):
        yield


_ORDER = ("N", "D_in", "D_out", "r", "K", "ranks", "index", "indptr", "seg_index", "blocksize", "double_quant", "blocks", "qtype",
          "B", "lead", "heads", "T", "past", "half", "key_mask", "shape", "d", "eps", "need_dw",
          "scaling", "masked", "base", "bias", "need_dx", "need_dW", "need_db", "keep_x", "layout", "seed")


def _show(case) -> str:
    """A case as ``N=1 D_in=1 index=[-1] ...``: what shrinking kept."""
    keys = sorted(case or (), key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER))
    return " ".join(f"{k}={case[k]}" for k in keys)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowrank.kernels.conformance",
                                description="Check a kernel backend against the lowrank reference.")
    p.add_argument("backend", help="a registered name, an import path (pkg.module) or a .py file")
    p.add_argument("--max-examples", type=int, default=25, help="hypothesis cases per function and dtype")
    p.add_argument("--dtypes", nargs="+", help="float dtypes to check (default: those the backend claims)")
    p.add_argument("--functions", nargs="+", help="API functions to check (default: every native one)")
    a = p.parse_args(argv)
    print(describe(a.backend), end="\n\n")
    report = check_backend(a.backend, max_examples=a.max_examples, dtypes=a.dtypes, functions=a.functions)
    print(report)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
