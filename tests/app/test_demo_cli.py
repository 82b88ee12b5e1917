"""`lowrank demo --quick` runs end to end and writes the report and the plots."""
import json
import re
import subprocess
import sys

import pytest

from lowrank.app.cli import main


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    return out


def test_demo_writes_report_and_plots(demo_out):
    report = (demo_out / "report.md").read_text()
    for section in ("## Methods", "## Rank trade-off", "## Two tasks on one frozen base", "## Merge for inference"):
        assert section in report
    for png in ("loss_curves.png", "decision_boundaries.png", "rank_tradeoff.png", "delta_singular_values.png"):
        data = (demo_out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in report


def test_demo_numbers_hang_together(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    rows = {r["method"]: r for r in results["methods"]}
    assert {"full", "head", "adapter"} <= set(rows) and any(m.startswith("lora r=") for m in rows)
    full = rows["full"]
    for r in rows.values():
        assert r["trainable_params"] <= full["trainable_params"] == full["all_params"]
        assert r["stored_bytes"] == 4 * r["trainable_params"]               # float32 parameters
        assert r["memory"]["gradients"] == r["stored_bytes"]                 # a gradient per trainable value
        assert r["memory"]["optimizer"] == 2 * r["stored_bytes"]             # Adam's two moments
    ranks = results["ranks"]
    assert [r["trainable_params"] for r in ranks] == sorted(r["trainable_params"] for r in ranks)
    assert {"rotate", "shift"} <= set(results["two_tasks"])
    for name in ("rotate", "shift"):
        task = results["two_tasks"][name]
        assert task["acc_mixed"] == task["acc_alone"] and task["max_abs_diff"] < 1e-5
    merge = results["merge"]
    assert merge["lora_layers_left"] == 0 and merge["max_abs_diff"] < 1e-4


def test_cli_reports_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--seed", "x"])
    assert "invalid int value" in capsys.readouterr().err


def test_demo_adapter_files_reload_exactly(demo_out):
    results = json.loads((demo_out / "results.json").read_text())
    files = results["files"]
    assert files["reload_max_abs_diff"] == 0.0
    assert (demo_out / "adapter" / "adapter_config.json").exists()
    assert files["adapter_bytes"] < files["base_bytes"]


def test_a_log_gets_one_timed_line_per_stage(tmp_path):
    """Not a terminal (a pipe, as in CI or a log file): no tqdm bars, but a line per stage."""
    run = subprocess.run([sys.executable, "-m", "lowrank.app.cli", "demo", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    stage = re.compile(r"^\[demo +(\d+\.\d) s\] (.+?) +(\d+\.\d) s")
    seen = [stage.match(line) for line in lines]
    assert all(seen), [line for line, m in zip(lines, seen) if not m]          # nothing else, no bars
    names = [m.group(2) for m in seen]
    assert names[0] == "pretrain" and names[-1] == "report"
    for expected in ("full", "head", "adapter", "lora r=1", "qlora r=4", "dora r=4", "lora+ r=4", "vera r=256",
                     "two tasks", "merge", "files", "plots"):
        assert expected in names
    elapsed = [float(m.group(1)) for m in seen]
    assert elapsed == sorted(elapsed)
