"""The --quick serving benchmark runs in-process, times every variant, and the mixed batch's tokens
equal the per-adapter loop's (a check of the comparison itself, not a timing assertion)."""
import json
import math

from benchmarks import serving


def test_quick_serving_times_every_variant_and_mixed_tokens_equal_the_loop(tmp_path):
    out = tmp_path / "serving_quick.json"
    serving.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    Ks = serving.QUICK["Ks"]
    expected = {"single", "merged", "base"} | {f"{kind}_{K}" for kind in ("mixed", "loop") for K in Ks}
    got = [r["variant"] for r in data["rows"]]
    assert set(got) == expected and len(got) == len(expected)
    for row in data["rows"]:
        for key in ("prefill_ms", "decode_ms", "decode_tok_s", "decode_tok_s_cpu", "e2e_tok_s", "decode_vs_single",
                    "decode_vs_single_cpu"):
            assert math.isfinite(row[key]) and row[key] > 0, (row, key)
        assert row["rounds"] == serving.QUICK["rounds"]
        for clock in ("", "_cpu"):
            lo, hi = row[f"decode_vs_single{clock}_range"]
            assert lo <= row[f"decode_vs_single{clock}"] <= hi
    assert data["checks"] == {**{f"mixed_{K}_equals_loop_{K}": True for K in Ks}, "merged_equals_single": True}
    assert data["machine"]["threads"] == 1 and data["targets"]["adapters"] == max(Ks)
    assert set(data["targets"]["wall"]) == set(data["targets"]["cpu"]) == {
        "mixed_vs_single", "mixed_vs_loop", "mixed_vs_single_ok", "mixed_vs_loop_ok"}
    assert (tmp_path / "serving_quick.png").stat().st_size > 0
