"""The --quick server benchmark starts ``lowrank serve`` in a subprocess, drives it over HTTP and reports
every cell's figures (finite and positive; no timing target is asserted on a shared machine); its
inter-token latency counts each token of a chunk that carries several (the server's usage on every chunk)."""
import json
import math

import pytest

from benchmarks import server


def test_a_chunk_of_coalesced_tokens_gives_each_token_its_share_of_the_gap():
    # tokens so far per chunk: 1 at 0.1 s, none (a usage-only repeat), 4 at 0.4 s (3 coalesced), 5 at 0.5 s
    chunks, ttft, gaps = server.token_gaps([(0.1, 1), (0.2, 1), (0.4, 4), (0.5, 5)])
    assert (chunks, ttft) == (3, 0.1)
    assert gaps == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert server.token_gaps([(0.3, 0)]) == (0, None, [])


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
        # every token after a request's first chunk is one inter-token sample, coalesced or not
        assert 0 < row["itl_samples"] <= row["tokens"] - row["requests"] and row["tokens_per_chunk"] >= 1
    assert (tmp_path / "server_quick.png").stat().st_size > 0


def test_the_three_targets_are_computed_from_the_16_client_cells_with_their_bounds():
    row = lambda A, tok_s, serial, p50, p99: {"clients": 16, "adapters": A, "tok_s": tok_s, "serial_tok_s": serial,
                                              "itl_p50_ms": p50, "itl_p99_ms": p99}
    t = server.targets([row(8, 90.0, 15.0, 10.0, 40.0), row(1, 100.0, 20.0, 10.0, 20.0)])
    assert {k: (round(v["value"], 6), v["met"]) for k, v in t.items()} == {
        "speedup_16x8_vs_serial": (6.0, True), "ratio_8_vs_1_adapter_at_16": (0.9, True),
        "itl_p99_over_p50_16x8": (4.0, False)}
    assert server.targets([row(8, 90.0, 15.0, 10.0, 40.0)]) == {}
