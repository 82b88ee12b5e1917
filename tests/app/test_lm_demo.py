"""``lowrank lm demo --quick``: every section of the report, the figures, and numbers that add up.

Trainable counts are checked against closed forms computed here from the shipped config (LoRA:
r·(D_in + D_out) per adapted matrix; DoRA adds D_out magnitudes; head V·d; full every weight),
stored bytes against 4 bytes per float32 parameter, one step's gradients and Adam state against
the trainable count, and every fine-tuned perplexity against the pretrained model's.
"""
import json
import math

import pytest

from lowrank.app.cli import main
from lowrank.app.lm import shipped_checkpoint
from lowrank.app.lm_demo import PROMPTS, LMDemoConfig

PNG = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("## Validation perplexity on the code domain", "## Seed-to-seed spread",
            "## Which weight matrices to adapt (the LoRA paper's Table 5)", "## Loss curves",
            "## The rank of what fine-tuning learned", "## Sample generations")
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_demo")
    assert main(["lm", "demo", "--quick", "--threads", "1", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def shapes():
    """{projection: (D_out, D_in)} and the sizes of the shipped config."""
    config = json.loads((shipped_checkpoint() / "config.json").read_text())
    d, inter = config["hidden_size"], config["intermediate_size"]
    V, L = config["vocab_size"], config["num_hidden_layers"]
    hd = config.get("head_dim") or d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config.get("num_key_value_heads", config["num_attention_heads"]) * hd
    proj = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
            "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    return proj, dict(d=d, V=V, L=L)


def lora_count(proj, L, targets, r):
    return L * sum(r * (proj[t][0] + proj[t][1]) for t in targets)


def test_report_has_every_section_and_real_figures(demo):
    out, results = demo
    report = (out / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    assert any(word in report for word in ("agrees with the paper", "disagrees with the paper", "Undecided"))
    assert f"Python {results['python']}" in report and ("beyond spread" in report or "within spread" in report)
    assert set(results["figures"]) == {"curves", "perplexity", "spectra"}
    for path in results["figures"].values():
        data = (out / path.rsplit("/", 1)[-1]).read_bytes()
        assert data[:8] == PNG and data[12:16] == b"IHDR" and len(data) > 2000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 100 and height > 100
        assert f"]({path.rsplit('/', 1)[-1]})" in report


def test_trainable_counts_and_bytes_match_the_closed_forms(demo, shapes):
    _, results = demo
    proj, s = shapes
    d, V, L = s["d"], s["V"], s["L"]
    per_layer = sum(o * i for o, i in proj.values()) + 2 * d                     # seven matrices, two RMSNorms
    assert results["pretrained"]["all_params"] == 2 * V * d + L * per_layer + d     # embed, head, layers, final norm
    qv = ("q_proj", "v_proj")
    expected = {"full": results["pretrained"]["all_params"], "head": V * d,
                **{f"lora r={r}": lora_count(proj, L, qv, r) for r in LMDemoConfig().ranks},
                "qlora r=8": lora_count(proj, L, qv, 8),
                "dora r=8": lora_count(proj, L, qv, 8) + L * (proj["q_proj"][0] + proj["v_proj"][0])}
    rows = {r["label"]: r for r in results["methods"]}
    assert set(rows) == set(expected)
    for label, count in expected.items():
        row = rows[label]
        assert row["trainable_params"] == count, label
        assert row["stored_bytes"] == 4 * count, label                           # float32 trainable parameters
        assert row["memory"]["gradients"] == 4 * count, label                   # a gradient per trainable weight only
        assert row["memory"]["optimizer"] == 8 * count, label                   # Adam: m and v
        assert row["memory"]["activations"] > 0 and row["seconds_per_step"] > 0
    assert rows["qlora r=8"]["memory"]["weights"] < rows["lora r=8"]["memory"]["weights"] / 2   # the 4-bit base
    budget = {"W_q": (("q_proj",), 8), "W_v": (("v_proj",), 8), "W_q, W_v": (qv, 4),
              "W_q, W_k, W_v, W_o": (("q_proj", "k_proj", "v_proj", "o_proj"), 2), "all linear": (tuple(proj), 1)}
    table5 = {r["label"]: r for r in results["table5"]}
    assert set(table5) == set(budget)
    for label, (targets, r) in budget.items():
        assert table5[label]["r"] == r and table5[label]["trainable_params"] == lora_count(proj, L, targets, r)
    assert table5["W_q, W_v"]["val_ppl"] == rows["lora r=4"]["val_ppl"]       # the same run, reused
    for row in table5.values():
        assert len(row["seed_ppl"]) == LMDemoConfig.quick().table5_seeds
        assert row["mean_ppl"] == pytest.approx(sum(row["seed_ppl"]) / len(row["seed_ppl"]))


def test_fine_tuning_lowers_the_code_perplexity_and_seeds_are_reported(demo):
    _, results = demo
    before = results["pretrained"]["val_ppl"]
    assert math.isfinite(before) and 1 < before < 259
    for row in results["methods"] + results["table5"] + results["seeds"]:
        assert math.isfinite(row["val_ppl"]) and row["val_ppl"] < before, row["label"]
        assert math.isclose(row["val_ppl"], math.exp(row["val_loss"]))
    seeds = results["seeds"]
    assert len(seeds) == LMDemoConfig.quick().seeds and len({r["seed"] for r in seeds}) == len(seeds)
    assert len({r["val_ppl"] for r in seeds}) == len(seeds)                    # different seeds, different runs


def test_spectra_samples_provenance_and_the_log(demo):
    out, results = demo
    methods = {r["method"] for r in results["delta"]["rows"]}
    assert methods == {"full", "lora r=8", "lora r=16"}
    for r in results["delta"]["rows"]:
        assert r["stable_rank"] >= 1 - 1e-9 and r["effective_rank"] >= 1 - 1e-9
        if r["method"].startswith("lora r="):
            k = int(r["method"].split("=")[1])
            assert r[f"captured@{k}"] == pytest.approx(1.0, abs=1e-9)            # s·B·A has rank <= r
    assert [s["prompt"] for s in results["samples"]] == list(PROMPTS)
    for s in results["samples"]:
        assert set(s) == {"prompt", "pretrained", "lora r=8", "full"}
    info = results["corpus_info"]
    assert info["python"] == results["python"] and info["stdlib"]["validation"]["bytes"] > 0
    log = (out / "demo.log").read_text().splitlines()
    labels = [r["label"] for r in results["methods"]] + [f"{r['label']} r={r['r']} seed 1" for r in results["table5"]]
    for label in labels + ["spectra", "samples", "report"]:
        assert any(f"] {label} " in line for line in log), label
