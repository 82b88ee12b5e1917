"""``python -m benchmarks.decode --quick`` and ``--stream --quick``: every shape and row count timed against
NumPy with the kernel dense_forward would run named, and the streamed pass's bytes counted from the weights."""
import json
import math

import numpy as np
import pytest

from benchmarks import decode


def test_quick_decode_benchmark_times_every_shape_and_row_count(tmp_path):
    out = tmp_path / "decode_quick.json"
    decode.main(["--quick", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    cells = {(r["D_out"], r["D_in"], r["M"]) for r in data["rows"]}
    assert cells == {(o, i, M) for o, i in decode.QUICK["shapes"] for M in decode.QUICK["Ms"]}
    for r in data["rows"]:
        assert r["dense_forward_runs"] == ("gemv" if r["M"] <= data["numba_small_m"] else "numba_blas")
        assert ("gemv" in r["us"]) == (r["M"] <= data["numba_small_m"])
        assert all(math.isfinite(t) and t > 0 for t in r["us"].values())


def test_stream_counts_every_weight_of_each_decoder_copy(tmp_path):
    out = tmp_path / "stream.json"
    result = decode.main(["--stream", "--quick", "--threads", "1", "--out", str(out)])
    cfg = decode.STREAM_QUICK
    per_decoder = 4 * (cfg["layers"] * sum(o * i for o, i in cfg["layer"]) + cfg["head"][0] * cfg["head"][1])
    assert result["working_set_bytes"] == cfg["copies"] * per_decoder
    for name in ("numpy", "small_m", "gemv", "gemv_one_block"):
        r = result[name]
        assert r["gb_s"] * 1e9 * np.median(r["samples_s"]) == pytest.approx(result["working_set_bytes"])
        assert len(r["samples_s"]) == cfg["rounds"]
    assert json.loads(out.read_text())["result"]["working_set_bytes"] == result["working_set_bytes"]
