"""The --quick real-model benchmark runs, times the step and the decode on both sides, measures each side's
memory in its own subprocess, and both sides computed the same numbers (a check of the comparison, not a
timing assertion)."""
import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import real_model  # noqa: E402
from lowrank.kernels.numba_cpu import blas  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_quick_real_model_times_both_sides_and_they_agree(tmp_path):
    out = tmp_path / "real_model_quick.json"
    real_model.main(["--quick", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    m, rows, checks = data["machine"], data["rows"], data["checks"]
    assert m["threads"] == 1 and m["torch_threads"] == 1 and m["numba_threads"] == 1
    assert all(lib["threads"] == 1 for lib in m["blas"])
    assert m["products_blas"] == blas.PROVIDER              # the floor and the step name the BLAS that ran them
    step = rows["step"]
    assert step["floor_s"] > 0
    for side in ("lowrank", "torch"):
        assert 0 < step[side]["min_s"] <= step[side]["median_s"] and math.isfinite(step[side]["ratio_to_torch"])
        assert len(step[side]["samples_s"]) == real_model.QUICK["rounds"]
    assert [r["batch"] for r in rows["decode"]] == list(real_model.QUICK["decode"]["batches"])
    for r in rows["decode"]:
        assert r["floor_step_s"] > 0 and all(r[side]["tokens_per_s"] > 0 for side in ("lowrank", "torch"))
        bytes_ = real_model.decode_bytes(real_model.QUICK["model"])
        assert r["read_floor_step_s"] == pytest.approx(bytes_ / (m["read_gbs"] * 1e9))
        assert r["lowrank"]["over_read_floor"] == pytest.approx(r["lowrank"]["step_s"] / r["read_floor_step_s"])
    assert [r["variant"] for r in rows["memory"]] == list(real_model.QUICK["memory"])
    for r in rows["memory"]:                     # each child holds its own side only: lowrank's never imports torch
        assert r["torch_imported"] == r["variant"].startswith("torch")
        assert 0 < r["rss_before_mb"] <= r["step_peak_mb"] and r["rss_before_mb"] <= r["process_peak_mb"]
    assert [r["variant"] for r in rows["load"]] == list(real_model.LOAD_VARIANTS)   # each load in its own process
    read_s = rows["load"][0]["load_s"]
    for r in rows["load"]:
        assert r["load_s"] > 0 and r["param_mb"] > 0 and len(r["samples_s"]) == real_model.QUICK["rounds"]
        assert r["over_read"] == pytest.approx(r["load_s"] / read_s)
        assert r["rss_over_params"] == pytest.approx(r["rss_added_mb"] / r["param_mb"])
    assert checks["step_loss"] <= 1e-5 and checks["step_lora_grads"] <= 1e-4      # float32 on both sides
    assert all(checks[f"decode_b{B}_same_tokens"] >= 0.75 for B in real_model.QUICK["decode"]["batches"])


def test_the_step_floor_counts_each_product():
    """One layer, d = 4, 2 heads of 2 over 1 key/value head, I = 6, V = 10, B = 1, T = 2, r = 1, counted by hand:
    per layer q 4·4, k and v 4·2 each, o 4·4, gate/up/down 4·6 each: 120 weights, 2·N·120 = 480 flops a pass;
    QKᵀ and PV 2·B·H·T·T·h = 32 each; LoRA (x Aᵀ, h Bᵀ) 2·2·1·(4 + 4) + 2·2·1·(4 + 2) = 56; head 2·N·V·d = 160.
    Forward 480 + 2·32 + 56 + 160; backward 480 + 4·32 + 2·56 + 160."""
    m = dict(layers=1, d=4, heads=2, kv_heads=1, I=6, V=10)
    assert real_model.step_flops(m, 1, 2, 1) == (480 + 64 + 56 + 160) + (480 + 128 + 112 + 160)
