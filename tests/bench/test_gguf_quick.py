"""``python -m benchmarks.gguf --quick``: every format and N measured against the float32 base product, the
JSON written, bytes per weight counted from the real blocks (llama.cpp's block sizes), 1 thread by default."""
import json
import math
import sys

import pytest


def test_quick_gguf_benchmark_measures_every_format_against_the_float_product(tmp_path):
    from benchmarks import gguf
    out = tmp_path / "gguf_quick.json"
    data = gguf.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["targets"] == data["targets"]
    assert data["machine"]["threads"] == 1 and data["command"] == "python -m benchmarks.gguf --quick"
    rows = {(r["qtype"], r["N"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {(q, N, v) for q in ("Q8_0", "Q4_0", "Q4_1", "Q4_K") for N in gguf.QUICK["Ns"]
                         for v in ("base", "numba")} | {(q, 1, "q8") for q in ("Q4_0", "Q4_1")}
    bytes_per_block = {"Q8_0": 34 / 32, "Q4_0": 18 / 32, "Q4_1": 20 / 32, "Q4_K": 144 / 256}   # ggml's blocks
    for (qtype, N, variant), row in rows.items():
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0
        assert row["bytes_per_weight"] == pytest.approx(4.0 if variant == "base" else bytes_per_block[qtype])
        assert variant != "base" or row["ratio"] == 1.0
    assert len(data["targets"]) == 4 * len(gguf.QUICK["Ns"]) + 2


def test_quick_decode_benchmark_times_greedy_decode_from_f32_and_q4_0_ggufs(tmp_path):
    """``--decode --quick``: both files hold the same random model, the Q4_0 model
    multiplies the file's blocks (every matrix, the embedding, and the tied head through it), and each row's
    floor is its tensor bytes at the run's copy bandwidth."""
    from benchmarks import gguf
    out = tmp_path / "gguf_decode_quick.json"
    data = gguf.main(["--decode", "--quick", "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == data["rows"]
    assert data["machine"]["threads"] == 1 and data["command"] == "python -m benchmarks.gguf --decode --quick"
    rows = {r["qtype"]: r for r in data["rows"]}
    m = gguf.DECODE_QUICK["model"]
    matrices = m["layers"] * (2 * m["d"] ** 2 + 2 * m["d"] * m["d"] // m["heads"] * m["kv_heads"] + 3 * m["d"] * m["I"])
    norms = (2 * m["layers"] + 1) * m["d"] * 4
    assert rows["F32"]["tensor_bytes"] == (matrices + m["V"] * m["d"]) * 4 + norms
    assert rows["Q4_0"]["tensor_bytes"] == (matrices + m["V"] * m["d"]) // 32 * 18 + norms    # ggml's 18-byte blocks
    assert rows["F32"]["weights_as_blocks"] == 0 and rows["Q4_0"]["weights_as_blocks"] == 7 * m["layers"] + 1
    assert rows["F32"]["same_tokens_as_first"] == 1.0                   # a second greedy run gives the same tokens
    for row in rows.values():
        assert math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["floor_step_s"] == pytest.approx(row["tensor_bytes"] / (data["machine"]["copy_gbs"] * 1e9))


def test_decode_benchmark_runs_llama_bench_on_the_same_files(tmp_path):
    """``--llama-bench BIN``: BIN runs on each file before and after lowrank's rounds, with the run's threads and
    the decode's shape, on a file llama.cpp can load (no vocabulary, V dummy tokens); its samples' median is
    reported beside lowrank's decode figure. A stand-in BIN records its arguments and what the file holds."""
    from benchmarks import gguf
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "llama-bench"
    fake.write_text(f"""#!{sys.executable}
import json, sys
import gguf
args = sys.argv[1:]
r = gguf.GGUFReader(args[args.index("-m") + 1])
kv = {{k: r.fields[k].contents() for k in ("tokenizer.ggml.model", "llama.vocab_size")}}
open({str(log)!r}, "a").write(json.dumps(dict(args=args, kv=kv)) + "\\n")
ts = 100.0 if "F32" in args[args.index("-m") + 1] else 300.0
print(json.dumps([dict(samples_ts=[ts, ts + 2, ts - 2])]))
""")
    fake.chmod(0o755)
    data = gguf.main(["--decode", "--quick", "--out", str(tmp_path / "d.json"), "--llama-bench", str(fake)])
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    cfg = gguf.DECODE_QUICK
    assert [c["args"][1].endswith(f"model-{q}.gguf") for c, q in zip(calls, ["F32", "Q4_0"] * 2)] == [True] * 4
    for c in calls:
        a = c["args"]
        assert dict(zip(a[2::2], a[3::2])) == {"-t": "1", "-p": "0", "-n": str(cfg["new"]), "-d": str(cfg["prompt"]),
                                               "-r": str(cfg["rounds"]), "-o": "json"}
        assert c["kv"] == {"tokenizer.ggml.model": "no_vocab", "llama.vocab_size": cfg["model"]["V"]}
    rows = {r["qtype"]: r for r in data["rows"]}
    for qtype, ts in (("F32", 100.0), ("Q4_0", 300.0)):
        assert rows[qtype]["llama_cpp_tokens_per_s"] == ts
        assert rows[qtype]["of_llama_cpp"] == pytest.approx(rows[qtype]["decode_tokens_per_s"] / ts)
