"""The --quick server benchmark starts ``lowrank serve`` in a subprocess, drives it over HTTP and reports
every cell's figures (finite and positive; no timing target is asserted on a shared machine)."""
import json
import math

from benchmarks import server


def test_quick_server_benchmark_reports_every_cell(tmp_path):
    out = tmp_path / "server_quick.json"
    server.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    cells = {(r["clients"], r["adapters"]) for r in data["rows"]}
    assert cells == {(N, A) for N in server.QUICK["clients"] for A in server.QUICK["adapters"]}
    for row in data["rows"]:
        assert 0 < row["tokens"] <= row["requests"] * server.QUICK["M"]
        for key in ("tok_s", "serial_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (row, key)
        assert row["ttft_p50_ms"] <= row["ttft_p99_ms"] and row["itl_p50_ms"] <= row["itl_p99_ms"]
    assert (tmp_path / "server_quick.png").stat().st_size > 0
