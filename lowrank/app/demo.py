"""``lowrank demo``: the seed article, run end to end on a toy task.

Pretrain an MLP, derive a downstream task, fine-tune it by every method on the same
frozen start, sweep the LoRA rank, train two tasks as two adapters on one base and
serve a mixed batch, merge an adapter, and write ``lowrank-out/report.md`` with plots.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

from . import plots
from .progress import StageLog, no_stage
from .experiment import (DemoConfig, dense_names, downstream, finetune, lora_config, method_row, prepare,
                         pretrain, test_accuracy)
from ..io.model_files import load_model, save_model
from ..analysis.spectrum import full_deltas, lora_deltas, singular_values, spectrum_rows
from ..tuners.lora.model import LoraModel
from .variants import variant_rows


def run_methods(cfg: DemoConfig, pretrained, ds, stage=no_stage):
    """Full, head-only, bottleneck adapter, LoRA at every rank (the rank sweep), QLoRA and the
    variants, on the same start; one ``stage`` line each."""
    rows, models, histories = [], {}, {}
    runs = [(m, m, {}) for m in ("full", "head", "adapter")]
    runs += [(f"lora r={r}", "lora", {"r": r}) for r in cfg.ranks] + [(f"qlora r={cfg.r}", "qlora", {})]
    for label, method, kw in runs:
        with stage(label) as note:
            model = prepare(method, pretrained, cfg, **kw)
            h = finetune(model, ds, cfg, lr=cfg.lr if method == "full" else None)
            rows.append(method_row(label, model, ds, cfg, h, **({"r": kw.get("r", cfg.r)} if "lora" in label else {})))
            note["result"] = f"test acc {rows[-1]['test_acc']:.3f}"
        models[label], histories[label] = model, h
    rows.extend(variant_rows(cfg, pretrained, ds, stage))
    ranks = [row for row in rows if row["method"].startswith("lora r=")]
    return rows, ranks, models, histories


def run_two_tasks(cfg: DemoConfig, pretrained, ds_pre) -> dict:
    """Two downstream tasks as two adapters on one frozen base, then one mixed batch."""
    tasks = {"rotate": downstream(cfg, ds_pre, "rotate"), "shift": downstream(cfg, ds_pre, "shift")}
    base = prepare("full", pretrained, cfg).requires_grad_(False)
    config, model = lora_config(cfg, base), None
    for name, ds in tasks.items():
        if model is None:
            model = LoraModel(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
            model.set_adapter(name)
        finetune(model, ds, cfg)
    alone = {}
    for name, ds in tasks.items():
        model.set_adapter(name)
        alone[name] = (model.forward(ds.X_test), test_accuracy(model, ds))
    X = np.concatenate([ds.X_test for ds in tasks.values()])
    names = [n for n, ds in tasks.items() for _ in range(len(ds.y_test))]
    model.eval()
    mixed = model.forward(X, adapter_names=names)
    out, start = {}, 0
    for name, ds in tasks.items():
        n = len(ds.y_test)
        logits = mixed[start:start + n]
        out[name] = {"acc_alone": alone[name][1], "acc_mixed": float(((logits[:, 0] > 0) == ds.y_test).mean()),
                     "max_abs_diff": float(np.abs(logits - alone[name][0]).max()),
                     "base_acc": test_accuracy(pretrained, ds)}
        start += n
    out["adapter_params"] = {n: sum(p.numel for k, p in model.named_parameters()
                                    if k.endswith((f".lora_A.{n}", f".lora_B.{n}")) or f".modules_to_save.{n}." in k)
                             for n in tasks}
    out["base_params"] = pretrained.num_parameters()
    return out


def _median_ms(fn, repeats: int = 15) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def run_merge(model: LoraModel, ds) -> dict:
    """Outputs and latency before and after merge_and_unload (zero added inference latency)."""
    model.eval()
    X = np.concatenate([ds.X_test] * max(1, 1024 // len(ds.X_test) + 1))[:1024]
    before = model.forward(X)
    unmerged_ms = _median_ms(lambda: model.forward(X))
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    after = merged.forward(X)
    merged_ms = _median_ms(lambda: merged.forward(X))
    return {"rows": len(X), "max_abs_diff": float(np.abs(after - before).max()),
            "max_abs_output": float(np.abs(before).max()), "unmerged_ms": unmerged_ms, "merged_ms": merged_ms,
            "lora_layers_left": sum(1 for _, m in merged.named_modules() if type(m).__name__ == "LoraLinear")}


def run_files(model: LoraModel, pretrained, ds, out: Path) -> dict:
    """Save the base and the adapter as files (PEFT's format), reload both, compare outputs."""
    base_path, adapter_dir = out / "base.safetensors", out / "adapter"
    save_model(pretrained, base_path, overwrite=True)
    model.save_pretrained(adapter_dir, overwrite=True)
    reloaded = LoraModel.from_pretrained(load_model(base_path), adapter_dir)
    model.eval()
    diff = float(np.abs(reloaded.forward(ds.X_test) - model.forward(ds.X_test)).max())
    adapter_bytes = sum(f.stat().st_size for f in adapter_dir.iterdir() if f.is_file())
    return {"base_file": base_path.name, "base_bytes": base_path.stat().st_size, "adapter_dir": adapter_dir.name,
            "adapter_bytes": adapter_bytes, "reload_max_abs_diff": diff,
            "files": sorted(f.name for f in adapter_dir.iterdir())}


def delta_spectra(models: dict, pretrained) -> dict:
    """What fine-tuning learned in the widest hidden layer: the singular values of ΔW for full
    fine-tuning and each LoRA rank, with stable/effective rank and the share of ‖ΔW‖_F² that a
    rank-r truncation keeps (``lowrank analyze`` goes further: subspace similarity, d90)."""
    names = dense_names(pretrained)[:-1]
    target = max(names, key=lambda n: pretrained.get_submodule(n).weight.size)
    deltas = {"full": full_deltas(models["full"], pretrained, [target])[target],
              **{label: lora_deltas(m)[target] for label, m in models.items() if label.startswith("lora")}}
    return {"layer": target, "shape": list(deltas["full"].shape),
            "spectra": {label: singular_values(d) for label, d in deltas.items()},
            "rows": [row for label, d in deltas.items() for row in spectrum_rows({target: d}, label)]}


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--out", default="lowrank-out", help="output directory (default lowrank-out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def run(args) -> int:
    cfg = DemoConfig.quick(seed=args.seed) if args.quick else DemoConfig(seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log = StageLog("demo")
    results = run_demo(cfg, out, plots_on=not args.no_plots, stage=log.stage)
    with log.stage("report") as note:
        results["seconds"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=1, default=jsonable))
        from .report import summary, write_report
        write_report(out / "report.md", results)
        note["result"] = str(out / "report.md")
    print(summary(results))
    print(f"report: {out / 'report.md'}")
    return 0


def run_demo(cfg: DemoConfig, out: Path, plots_on: bool = True, stage=no_stage) -> dict:
    """Every section of the demo; returns the numbers the report prints. ``stage`` (a
    ``StageLog.stage``) gets one line per stage: pretrain, each method, two tasks, merge, ..."""
    with stage("pretrain") as note:
        pretrained, ds_pre, h_pre = pretrain(cfg)
        ds = downstream(cfg, ds_pre)
        note["result"] = f"val acc {h_pre.val_acc[-1]:.3f}"
    rows, ranks, models, histories = run_methods(cfg, pretrained, ds, stage)
    headline = models[f"lora r={cfg.r}"] if f"lora r={cfg.r}" in models else models[f"lora r={cfg.ranks[-1]}"]
    results = {
        "config": cfg.to_dict(),
        "pretrain": {"val_acc": h_pre.val_acc[-1], "test_acc": test_accuracy(pretrained, ds_pre),
                     "params": pretrained.num_parameters()},
        "downstream": {"kind": cfg.downstream, "base_test_acc": test_accuracy(pretrained, ds)},
        "methods": rows, "ranks": ranks, "figures": {},
    }
    with stage("two tasks") as note:
        results["two_tasks"] = two = run_two_tasks(cfg, pretrained, ds_pre)
        note["result"] = "mixed batch max |Δ| " + ", ".join(f"{two[n]['max_abs_diff']:.1e}" for n in ("rotate", "shift"))
    with stage("merge") as note:
        results["merge"] = merge = run_merge(headline, ds)
        note["result"] = f"max |Δy| {merge['max_abs_diff']:.1e}"
    with stage("files") as note:
        results["files"] = run_files(headline, pretrained, ds, out)
        note["result"] = f"reload max |Δ| {results['files']['reload_max_abs_diff']:.1e}"
    with stage("ΔW spectra"):
        results["delta"] = delta_spectra({k: m for k, m in models.items() if k == "full" or k.startswith("lora")},
                                         pretrained)
    if plots_on:
        with stage("plots"):
            figs = results["figures"]
            figs["loss"] = plots.loss_curves(histories, out / "loss_curves.png")
            figs["boundaries"] = plots.decision_boundaries(
                {"pretrained base": pretrained, f"LoRA r={cfg.r}": headline, "full fine-tuning": models["full"]},
                ds, out / "decision_boundaries.png")
            full = next(r for r in rows if r["method"] == "full")
            figs["ranks"] = plots.rank_tradeoff(ranks, full["test_acc"], full["stored_bytes"], out / "rank_tradeoff.png")
            figs["spectra"] = plots.singular_values(results["delta"]["spectra"], out / "delta_singular_values.png")
    return results


def jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)
