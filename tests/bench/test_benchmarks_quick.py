"""The --quick kernel benchmark runs in-process and writes sane JSON with every promised row."""
import json
import math

import numpy as np
import pytest

import numba  # noqa: F401  (a required dependency: a broken install fails here, it is never skipped)
from benchmarks import kernels as bench  # noqa: E402


def promised(cfg):
    """(group, variant, D_out, D_in, r, N, K) for every row the table promises under ``cfg``."""
    def keep(group, names, N):
        skip = cfg["skip"].get(N, set())
        return [] if group in skip else [v for v in names if f"{group}:{v}" not in skip]

    rows = set()
    for (D_out, D_in), r, N in cfg["forward"]:
        d = bench._data(D_out, D_in, r, N)
        rows |= {("forward", v, D_out, D_in, r, N, 1) for v in keep("forward", bench.forward_variants(d), N)}
    for (D_out, D_in), r, N in cfg["step"]:
        d = bench._data(D_out, D_in, r, N)
        for group, variants in (("backward", bench.backward_variants(d)), ("train", bench.train_variants(d))):
            rows |= {(group, v, D_out, D_in, r, N, 1) for v in keep(group, variants, N)}
    for (D_out, D_in), r, N, K in cfg["multi"]:
        names = bench.multi_variants(bench._data(D_out, D_in, r, N), K)
        rows |= {("multi", v, D_out, D_in, r, N, K) for v in keep("multi", names, N)}
    return rows


def test_quick_benchmark_writes_every_row_with_positive_numbers(tmp_path):
    out = tmp_path / "kernels_quick.json"
    bench.main(["--quick", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert (tmp_path / "kernels_quick.png").stat().st_size > 1000
    m = data["machine"]
    assert m["threads"] == 1 and m["blas_peak_gflops"] > 0 and m["copy_gbs"] > 0
    assert all(lib["threads"] == 1 for lib in m["blas"]) and m["numba_threads"] == 1
    got = {(r["group"], r["variant"], r["D_out"], r["D_in"], r["r"], r["N"], r["K"]) for r in data["rows"]}
    assert got == promised(bench.QUICK)
    assert len(got) == len(data["rows"])                       # no row twice
    for row in data["rows"]:
        for key in ("median_ms", "min_ms", "ratio", "gflops", "gbs", "pct_peak", "pct_bw"):
            assert math.isfinite(row[key]) and row[key] > 0, (row, key)
        assert row["min_ms"] <= row["median_ms"]
        if row["variant"] == "base":
            assert row["ratio"] == 1.0                         # each round divided by itself
    assert data["targets"] and all(v is not None and v > 0 for v in data["targets"].values())


def test_cost_counts_the_lora_term_on_top_of_the_base():
    base, io = bench.cost("forward", "base", 8, 4, 2, 3)
    assert base == 2 * 3 * 4 * 8 and io == 4 * (3 * 4 + 4 * 8 + 3 * 8)
    flops, _ = bench.cost("forward", "numba", 8, 4, 2, 3)
    assert flops == base + 2 * 3 * 2 * (4 + 8)
    assert bench.cost("train", "full", 8, 4, 2, 3)[0] == 3 * base
    assert np.isclose(bench.cost("train", "lora_numba", 8, 4, 2, 3)[0] / base, 2 + 4 * (2 * 3 * 2 * 12) / base)


def test_quick_nf4_benchmark_counts_storage_from_real_buffers(tmp_path):
    from benchmarks import nf4
    out = tmp_path / "nf4_quick.json"
    data = nf4.main(["--quick", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["targets"] == data["targets"]
    bits = data["storage"]
    # 4 bits per weight plus one float32 absmax per 64 weights (4.5), or with double quantization
    # one byte per 64 weights plus a float32 per 64·256 weights and one offset (≈ 4.127)
    assert bits["plain"]["bits_per_param"] == pytest.approx(4 + 32 / 64, abs=1e-3)
    assert bits["double_quant"]["bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)
    for row in data["rows"]:
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0


def test_quick_qlora_accuracy_compares_the_same_task(tmp_path):
    from benchmarks import qlora_accuracy
    out = tmp_path / "qa.json"
    result = qlora_accuracy.main(["--quick", "--seeds", "0", "--r", "2", "--out", str(out)])
    row = result["rows"][0]
    from lowrank.app.experiment import DemoConfig, downstream, pretrain, test_accuracy
    cfg = DemoConfig.quick(seed=0, r=2)                        # the benchmark's seed-0 task, rebuilt
    base, ds_pre, _ = pretrain(cfg)
    ds = downstream(cfg, ds_pre)
    n, p = len(ds.y_test), float(np.mean(ds.y_test))
    # Learning the task means beating both the majority class and the base model by 3 binomial standard
    # errors of the test split (3·sqrt(1/4n) ≈ 0.14 at n = 120); chance-level fine-tuning stays below.
    floor = max(p, 1 - p, test_accuracy(base, ds)) + 3 * math.sqrt(0.25 / n)
    assert floor <= row["lora"] <= 1 and floor <= row["qlora"] <= 1, (row, floor)
    assert result["gap_points"] == pytest.approx(100 * (row["lora"] - row["qlora"]))
    assert json.loads(out.read_text())["rows"] == result["rows"]


@pytest.mark.parametrize("backend", ["numba", "examples/torch_backend.py"])   # a path: resolved like --backend of kernels
def test_quick_elementwise_benchmark_times_every_decoder_kernel(tmp_path, backend):
    """One row per elementwise kernel of the API, each timed on both sides (no timing assertion)."""
    from pathlib import Path
    from benchmarks import elementwise
    from lowrank.kernels import api, backends
    out = tmp_path / "elementwise_quick.json"
    backend = backend if backend == "numba" else str(Path(__file__).resolve().parents[2] / backend)
    rows = elementwise.main(["--quick", "--threads", "1", "--backend", backend, "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows
    assert {r["kernel"] for r in rows} == {n for n in api.API if n.split("_")[0] in ("rope", "causal", "silu", "rms")}
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("reference_ms", "backend_ms", "ratio")), r


def test_quick_pool_benchmark_times_both_sides_and_every_kernel_of_the_step(tmp_path):
    """The decoder step with numba_cpu's pool on and off, and the per-kernel breakdown of each (no timing
    assertion); the pool setting is restored after."""
    from benchmarks import pool as bench
    from lowrank.kernels import api, backends
    from lowrank.kernels import config
    before = config.NUMBA_PARALLEL
    out = tmp_path / "pool_quick.json"
    result = bench.main(["--quick", "--threads", "2", "--out", str(out)])
    assert config.NUMBA_PARALLEL == before
    assert json.loads(out.read_text())["breakdown"] == result["breakdown"]
    assert set(result["timing"]) == set(result["breakdown"]) == {"pool_on", "pool_off", "serial_loops"}
    used = {"matmul", "dense_forward", "dense_backward", "lora_forward", "lora_backward", "rope_forward",
            "rope_backward", "causal_softmax", "causal_softmax_backward", "silu_and_mul", "silu_and_mul_backward",
            "rms_norm", "rms_norm_backward"}
    for side in result["breakdown"].values():
        assert used <= set(side) <= used | {"step_ms", "outside_kernels_ms"} | set(api.API)
        assert all(math.isfinite(v) and v > 0 for k, v in side.items() if k != "outside_kernels_ms"), side
        assert sum(v for k, v in side.items() if k not in ("step_ms", "outside_kernels_ms")) < side["step_ms"]
