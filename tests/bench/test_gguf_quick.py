"""``python -m benchmarks.gguf --quick``: every format and N measured against the float32 base product, the
JSON written, bytes per weight counted from the real blocks (llama.cpp's block sizes), 1 thread by default."""
import json
import math

import pytest


def test_quick_gguf_benchmark_measures_every_format_against_the_float_product(tmp_path):
    from benchmarks import gguf
    out = tmp_path / "gguf_quick.json"
    data = gguf.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["targets"] == data["targets"]
    assert data["machine"]["threads"] == 1 and data["command"] == "python -m benchmarks.gguf --quick"
    rows = {(r["qtype"], r["N"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {(q, N, v) for q in ("Q8_0", "Q4_0", "Q4_1", "Q4_K") for N in gguf.QUICK["Ns"]
                         for v in ("base", "numba")}
    bytes_per_block = {"Q8_0": 34 / 32, "Q4_0": 18 / 32, "Q4_1": 20 / 32, "Q4_K": 144 / 256}   # ggml's blocks
    for (qtype, N, variant), row in rows.items():
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0
        assert row["bytes_per_weight"] == pytest.approx(4.0 if variant == "base" else bytes_per_block[qtype])
        assert variant != "base" or row["ratio"] == 1.0
    assert len(data["targets"]) == 4 * len(gguf.QUICK["Ns"])
