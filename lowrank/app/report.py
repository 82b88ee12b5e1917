"""Markdown report and terminal summary of ``lowrank demo`` results."""
from __future__ import annotations

from pathlib import Path


def _kb(n) -> str:
    return f"{n / 1024:,.1f}"


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def methods_table(rows: list) -> str:
    """Accuracy, parameters, stored bytes and the memory split of one training step."""
    header = ["method", "test acc", "trainable params", "all params", "trainable %", "stored per task (KB)",
              "frozen base (KB)", "weights (KB)", "grads (KB)", "optimizer (KB)", "activations (KB)", "tracemalloc peak (KB)",
              "s / epoch"]
    body = []
    for r in rows:
        m = r["memory"]
        body.append([r["method"], f"{r['test_acc']:.3f}", f"{r['trainable_params']:,}", f"{r['all_params']:,}",
                     f"{100 * r['trainable_params'] / r['all_params']:.2f}", _kb(r["stored_bytes"]),
                     _kb(r["frozen_bytes"]), _kb(m["weights"]), _kb(m["gradients"]), _kb(m["optimizer"]), _kb(m["activations"]),
                     _kb(m["tracemalloc_peak"]), f"{r['seconds_per_epoch']:.3f}"])
    return _table(header, body)


def write_report(path, results: dict) -> str:
    cfg, pre, down = results["config"], results["pretrain"], results["downstream"]
    two, merge, figs = results["two_tasks"], results["merge"], results.get("figures", {})
    full = next(r for r in results["methods"] if r["method"] == "full")
    parts = [
        "# lowrank demo report",
        f"MLP {cfg['n_features']} → {' → '.join(map(str, cfg['hidden']))} → 1 ({pre['params']:,} parameters), "
        f"pretrained on `{cfg['dataset']}` with {cfg['n_features'] - 2} noise dimensions: test accuracy "
        f"{pre['test_acc']:.3f}. Downstream task: the same problem, `{down['kind']}`; the pretrained model scores "
        f"{down['base_test_acc']:.3f} on it before fine-tuning. Every method starts from the same pretrained weights, "
        f"trains {cfg['finetune_epochs']} epochs with Adam, batch {cfg['batch_size']}.",
        "## Methods", methods_table(results["methods"]),
        "Stored per task = the trainable parameters, i.e. what a task must keep beyond the shared frozen base. "
        "Memory is counted from the arrays of one training step (batch "
        f"{cfg['batch_size']}); the tracemalloc peak is NumPy's own allocation peak during that step.",
        "## Rank trade-off",
        _table(["r", "test acc", "trainable params", "stored (KB)", "vs full copy"],
               [[r["r"], f"{r['test_acc']:.3f}", f"{r['trainable_params']:,}", _kb(r["stored_bytes"]),
                 f"{r['stored_bytes'] / full['stored_bytes']:.2%}"] for r in results["ranks"]]),
        "## Two tasks on one frozen base",
        _table(["adapter", "base acc", "acc (alone)", "acc (mixed batch)", "max |Δlogit| mixed vs alone",
                "adapter params"],
               [[n, f"{v['base_acc']:.3f}", f"{v['acc_alone']:.3f}", f"{v['acc_mixed']:.3f}",
                 f"{v['max_abs_diff']:.2e}", f"{two['adapter_params'][n]:,}"]
                for n, v in two.items() if isinstance(v, dict) and "acc_alone" in v]),
        f"One mixed batch serves both tasks: the base product x·Wᵀ is computed once for all rows and each row "
        f"adds its own adapter's low-rank term. The base holds {two['base_params']:,} parameters, shared.",
        "## Merge for inference",
        f"merge_and_unload folds s·B·A into W: over {merge['rows']} rows the outputs differ by at most "
        f"{merge['max_abs_diff']:.2e} (largest |output| {merge['max_abs_output']:.2f}; float32 rounding), the merged "
        f"model has {merge['lora_layers_left']} LoRA layers left, and a forward takes {merge['merged_ms']:.2f} ms "
        f"merged vs {merge['unmerged_ms']:.2f} ms unmerged (median).",
    ]
    if "files" in results:
        f = results["files"]
        parts += ["## Sharing the adapter as files",
                  f"`{f['adapter_dir']}/` ({', '.join(f['files'])}) holds the task in {f['adapter_bytes']:,} bytes in "
                  f"Hugging Face PEFT's format; the frozen base `{f['base_file']}` takes {f['base_bytes']:,} bytes and is "
                  f"shared by every task. Reloading base + adapter from disk reproduces the outputs exactly "
                  f"(max |Δ| = {f['reload_max_abs_diff']:.1e})."]
    if "rows" in results.get("delta", {}):
        d = results["delta"]
        parts += ["## What fine-tuning learned is low-rank",
                  f"Singular values of ΔW in layer `{d['layer']}` {tuple(d['shape'])}: ΔW = W_finetuned − W_pretrained for "
                  "full fine-tuning, s·B·A for LoRA. Stable rank ‖ΔW‖_F²/‖ΔW‖₂², entropy effective rank, and the "
                  "share of ‖ΔW‖_F² kept by the best rank-r approximation. `lowrank analyze` adds the subspace "
                  "similarity of adapters and the intrinsic dimension d90 (its own report).",
                  _table(["ΔW of", "‖ΔW‖_F", "stable rank", "effective rank", "r=1", "r=2", "r=4", "r=8"],
                         [[r["method"], f"{r['fro_norm']:.3f}", f"{r['stable_rank']:.2f}", f"{r['effective_rank']:.2f}",
                           *[f"{r[f'captured@{k}']:.2f}" for k in (1, 2, 4, 8)]] for r in d["rows"]])]
    for title, key in (("Loss curves", "loss"), ("Decision boundaries", "boundaries"),
                       ("Accuracy and storage vs rank", "ranks"), ("Singular values of the learned ΔW", "spectra")):
        if key in figs:
            parts += [f"## {title}", f"![{title}]({Path(figs[key]).name})"]
    for section in results.get("extra_sections", []):
        parts.append(section)
    parts.append(f"_Generated by `lowrank demo` in {results.get('seconds', 0):.0f} s._")
    text = "\n\n".join(parts) + "\n"
    Path(path).write_text(text)
    return text


def summary(results: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"pretrained: test acc {results['pretrain']['test_acc']:.3f}; on the downstream task before "
             f"fine-tuning: {results['downstream']['base_test_acc']:.3f}"]
    for r in results["methods"]:
        lines.append(f"  {r['method']:<12} acc {r['test_acc']:.3f}  trainable {r['trainable_params']:>9,}  "
                     f"stored {_kb(r['stored_bytes']):>8} KB")
    m = results["merge"]
    lines.append(f"merge: max |Δy| {m['max_abs_diff']:.1e}, {m['unmerged_ms']:.2f} ms → {m['merged_ms']:.2f} ms")
    return "\n".join(lines)
