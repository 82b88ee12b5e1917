"""`lowrank analyze`: the command writes the report and figures; analyze() reuses the models it
is given, and its tables agree with the definitions computed here from the weights."""
import copy

import numpy as np
import pytest

from lowrank.app import cli
from lowrank.app.analyze import analyze
from lowrank.app.experiment import DemoConfig, downstream, finetune, prepare, pretrain


def test_analyze_command_writes_report_and_figures(tmp_path, capsys):
    out = tmp_path / "analysis"
    assert cli.COMMANDS["analyze"][0] == "lowrank.app.analyze"
    assert cli.main(["analyze", "--quick", "--out", str(out), "--d-values", "2,40"]) == 0
    printed = capsys.readouterr().out
    assert "d90 = " in printed and "stable rank" in printed and "report.md" in printed
    text = (out / "report.md").read_text()
    for heading in ("## 1. Truncated SVD", "## 2. The rank of what fine-tuning learns", "## 3. Subspace similarity",
                    "## 4. Intrinsic dimension"):
        assert heading in text
    for png in ("delta_spectrum.png", "subspace_similarity.png", "intrinsic_dimension.png"):
        assert f"]({png})" in text
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run():
    cfg = DemoConfig.quick(hidden=(12, 16, 12), n_samples=300, pretrain_epochs=3, finetune_epochs=2, r=2)
    pretrained, ds_pre, _ = pretrain(cfg)
    ds = downstream(cfg, ds_pre)
    full = prepare("full", pretrained, cfg)
    finetune(full, ds, cfg, lr=cfg.lr)
    loras = {}
    for r in (2, 3):
        loras[r] = prepare("lora", pretrained, cfg, r=r)
        finetune(loras[r], ds, cfg)
    return cfg, pretrained, ds_pre, ds, full, loras


def test_analyze_reuses_the_given_models_and_matches_the_definitions(tiny_run, tmp_path):
    cfg, pretrained, ds_pre, ds, full, loras = tiny_run
    messages = []
    result = analyze(cfg, pretrained, ds_pre, ds, tmp_path, lora_models=loras, full_model=full, d_values=[1, 3],
                     intrinsic_epochs=1, plots_on=False, log=messages.append)
    assert messages == ["analyze: intrinsic dimension, d in [1, 3]"]            # nothing retrained
    assert result["figures"] == {} and (tmp_path / "report.md").exists()
    s, tables = result["summary"], result["tables"]
    assert s["layer"] == "2" and s["D"] == pretrained.num_parameters()
    rows = {(r["method"], r["layer"]): r for r in tables["spectrum"]}
    assert set(rows) == {(m, n) for m in ("full", "LoRA r=2", "LoRA r=3") for n in ("0", "2", "4")}
    dW = full.get_submodule("2").weight.data.astype(np.float64) - pretrained.get_submodule("2").weight.data
    sigma = np.linalg.svd(dW, compute_uv=False)
    assert rows[("full", "2")]["stable_rank"] == pytest.approx((sigma ** 2).sum() / sigma[0] ** 2, rel=1e-6)
    assert rows[("full", "2")]["captured@2"] == pytest.approx((sigma[:2] ** 2).sum() / (sigma ** 2).sum(), rel=1e-6)
    layer = dict(loras[3].lora_layers())["2"]
    sigma_lora = np.linalg.svd(layer.delta_weight("default").astype(np.float64), compute_uv=False)
    assert rows[("LoRA r=3", "2")]["effective_rank"] <= 3 + 1e-6
    assert rows[("LoRA r=3", "2")]["stable_rank"] == pytest.approx(
        (sigma_lora ** 2).sum() / sigma_lora[0] ** 2, rel=1e-4)
    assert [r["d"] for r in tables["intrinsic"]] == [1, 3]
    full_acc = s["accuracy"]["full fine-tuning"]
    reached = [r["d"] for r in tables["intrinsic"] if r["accuracy"] >= 0.9 * full_acc]
    assert s["d90"] == (min(reached) if reached else None)
    for row in tables["similarity"]:
        assert 0 <= row["φ(1, 1)"] <= 1 and row["i_max × j_max"] == "2 × 3"
    W = pretrained.get_submodule("2").weight.data
    assert [r["storage"] for r in tables["svd"]] == [r * (W.shape[0] + W.shape[1]) for r in (1, 2, 4, 8)]


def test_analyze_trains_what_it_is_not_given(tiny_run, tmp_path):
    cfg, pretrained, ds_pre, ds, _, _ = tiny_run
    messages = []
    result = analyze(cfg, pretrained, ds_pre, ds, tmp_path, d_values=[2], intrinsic_epochs=1, plots_on=False,
                     log=messages.append)
    assert messages[:3] == ["analyze: full fine-tuning", "analyze: LoRA r=2", "analyze: LoRA r=4"]
    assert {r["method"] for r in result["tables"]["spectrum"]} == {"full", "LoRA r=2", "LoRA r=4"}
