"""The --quick peers benchmark runs in-process, times every row on both sides, and both sides
computed the same numbers (a check of the comparison itself, not a timing assertion)."""
import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from benchmarks import peers  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def promised(cfg):
    """(row, mode, N, variant) for every timed case under ``cfg``."""
    rows = {("layer", mode, N, v) for N in cfg["layer"]["Ns"] for mode in ("eval", "train") for v in ("torch", "lowrank")}
    rows |= {("mlp", "adam_step", None, v) for v in ("torch", "lowrank")}
    rows |= {("decoder", "train_step", None, v) for v in ("torch_sdpa", "torch_eager", "lowrank")}
    return rows


def test_quick_peers_times_every_row_and_both_sides_agree(tmp_path):
    out = tmp_path / "peers_quick.json"
    peers.main(["--quick", "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    m = data["machine"]
    assert m["threads"] == 1 and m["torch_threads"] == [1] and m["numba_threads"] == 1   # torch too, while timed
    assert all(lib["threads"] == 1 for lib in m["blas"])
    got = [(r["row"], r["mode"], r.get("N"), r["variant"]) for r in data["rows"]]
    assert set(got) == promised(peers.QUICK) and len(got) == len(set(got))
    for row in data["rows"]:
        for key in ("median_ms", "min_ms", "ratio_to_torch"):
            assert math.isfinite(row[key]) and row[key] > 0, (row, key)
        assert row["min_ms"] <= row["median_ms"]
    assert len(data["summary"]) == 2 * 2 + 1 + 2           # layer (2 N × eval/train), mlp, decoder vs sdpa and eager
    assert all(t["ratio"] > 0 for t in data["summary"])
    checks = data["checks"]
    assert set(checks) == {f"layer N={N}" for N in peers.QUICK["layer"]["Ns"]} | {"mlp", "decoder"}
    for name, errs in checks.items():                      # max relative differences, float32 on both sides
        assert errs and all(0 <= e <= 1e-4 for e in errs.values()), (name, errs)


def test_rows_select_what_runs(tmp_path):
    out = tmp_path / "peers_mlp.json"
    data = peers.main(["--quick", "--threads", "1", "--rows", "mlp", "--out", str(out)])
    assert {r["row"] for r in data["rows"]} == {"mlp"} and set(data["checks"]) == {"mlp"}


def test_parameter_names_map_to_peft():
    assert peers._torch_name("model.0.lora_A.default") == "base_model.model.0.lora_A.default.weight"
    assert peers._torch_name("model.0.base_layer.weight") == "base_model.model.0.base_layer.weight"
    assert (peers._torch_name("model.model.layers.3.self_attn.v_proj.lora_B.default")
            == "base_model.model.model.layers.3.self_attn.v_proj.lora_B.default.weight")


def test_without_torch_it_says_so_and_exits_cleanly(monkeypatch, capsys):
    import builtins
    real = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert peers.main(["--quick"]) is None
    assert "needs torch" in capsys.readouterr().out


def test_ratios_to_each_torch_variant_are_taken_round_by_round():
    """lowrank / eager is the median over rounds of the two times from the same round, not a ratio of
    each side's ratio to sdpa (here those differ: 1.5 against 1.0)."""
    def row(variant, samples):
        return dict(row="decoder", mode="train_step", variant=variant, samples_ms=samples,
                    median_ms=sorted(samples)[1], ratio_to_torch=float(sorted(samples)[1]))
    rows = [row("torch_sdpa", [1.0, 1.0, 1.0]), row("torch_eager", [3.0, 1.0, 2.0]), row("lowrank", [1.0, 2.0, 3.0])]
    table = {t["torch"]: t for t in peers.summary(rows)}
    assert table["torch_eager"]["ratio"] == 1.5
    assert (table["torch_eager"]["ratio_min"], table["torch_eager"]["ratio_max"]) == (1 / 3, 2.0)
    assert table["torch_sdpa"]["ratio"] == 2.0
