"""``lowrank analyze``: why so few parameters suffice, measured on the demo's downstream task.

Sections of lowrank-out/analysis/report.md (``analyze`` returns the same numbers):
    1. truncated SVD of the widest pretrained weight: storage against error, per rank
    2. the spectrum of ΔW for full fine-tuning and of s·B·A for LoRA: stable and effective
       rank, and the share of full fine-tuning's ΔW that a rank-r truncation keeps
    3. the LoRA paper's subspace similarity between the adapters of two ranks (Figure 3)
    4. intrinsic dimension: accuracy against d for θ = θ₀ + P z, and d90
"""
from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import numpy as np

from .experiment import (DemoConfig, dense_names, downstream, finetune, lora_config, prepare, pretrain,
                          test_accuracy)
from ..nn.losses import BCEWithLogitsLoss
from ..nn.optim import Adam
from ..tuners.lora.model import get_lora_model
from .plots import _plt, save
from ..training.loop import fit
from ..analysis.intrinsic import d90, intrinsic_sweep
from ..analysis.similarity import similarity_grid
from ..analysis.spectrum import full_deltas, lora_deltas, singular_values, spectrum_rows
from ..analysis.svd import choose_rank, truncated_svd

D_VALUES = (10, 100, 1000, 3000, 10000, 30000)
QUICK_D_VALUES = (2, 5, 10, 20, 50)
SVD_RANKS = (1, 2, 4, 8, 16, 32, 64)
CAPTURE_RANKS = (1, 2, 4, 8)
INTRINSIC_LR_SCALE = 5.0      # Adam on z with lr = scale/√d: ‖Δθ‖ per step about the same at every d
INTRINSIC_BATCH = 256         # few steps: each one costs two projections (4 Walsh–Hadamard transforms)


def analyze(cfg: DemoConfig, pretrained, ds_pre, ds_down, out_dir, *, lora_models: dict | None = None,
            full_model=None, d_values=None, intrinsic_epochs: int | None = None, plots_on: bool = True,
            log=print) -> dict:
    """Run every analysis; write report.md and PNGs in ``out_dir``; return figures, tables, summary.

    lora_models: {rank: trained LoraModel} to reuse (the demo's); the ranks cfg.r and 2·cfg.r
    (or the largest given rank above cfg.r) are trained here when missing. full_model: a
    fully fine-tuned copy of ``pretrained`` to reuse. ``ds_pre`` is only reported on.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = dense_names(pretrained)[:-1]                      # the hidden layers (LoRA's targets)
    widest = max(names, key=lambda n: pretrained.get_submodule(n).weight.size)
    full_model, loras, (r_lo, r_hi) = _models(cfg, pretrained, ds_down, widest, full_model, lora_models, log)
    acc = {"pretrained (downstream)": test_accuracy(pretrained, ds_down), "pretrained (original task)":
           test_accuracy(pretrained, ds_pre), "full fine-tuning": test_accuracy(full_model, ds_down),
           **{f"LoRA r={r}": test_accuracy(loras[r], ds_down) for r in sorted(loras)}}
    W = pretrained.get_submodule(widest).weight.data
    deltas = {"full": full_deltas(full_model, pretrained, names),
              **{f"LoRA r={r}": lora_deltas(loras[r]) for r in (r_lo, r_hi)}}
    grids = _grids(loras, deltas, widest, r_lo, r_hi)
    intrinsic_epochs = intrinsic_epochs or cfg.finetune_epochs
    id_rows = _intrinsic(cfg, pretrained, ds_down, d_values, intrinsic_epochs, log)
    for row in id_rows:
        row["fraction of full"] = row["accuracy"] / acc["full fine-tuning"]
    summary = {"d90": d90(id_rows, acc["full fine-tuning"]), "D": pretrained.num_parameters(), "layer": widest,
               "D_in": W.shape[1], "accuracy": acc, "rank for 10% relative error": choose_rank(W, rel_error=0.1),
               "rank for 90% energy": choose_rank(W, energy=0.9), "intrinsic_epochs": intrinsic_epochs}
    tables = {"accuracy": [{"model": k, "test accuracy": v} for k, v in acc.items()],
              "svd": [_svd_row(truncated_svd(W, r)) for r in SVD_RANKS if r <= min(W.shape)],
              "spectrum": [row for method, d in deltas.items() for row in spectrum_rows(d, method, CAPTURE_RANKS)],
              "similarity": [{"pair": k, "i_max × j_max": f"{g.shape[0]} × {g.shape[1]}", "φ(1, 1)": float(g[0, 0]),
                              "φ(i_max, j_max)": float(g[-1, -1]), "mean φ": float(g.mean()),
                              "random: max(i_max, j_max)/D_in": max(g.shape) / W.shape[1]} for k, g in grids.items()],
              "intrinsic": id_rows}
    figures = {}
    if plots_on:
        spectra = {method: singular_values(d[widest]) for method, d in deltas.items()}
        figures["spectrum"] = _plot_spectra(spectra, widest, out / "delta_spectrum.png")
        figures["similarity"] = _plot_grids(grids, widest, out / "subspace_similarity.png")
        figures["intrinsic"] = _plot_intrinsic(id_rows, acc, out / "intrinsic_dimension.png")
    report = out / "report.md"
    report.write_text(_markdown(cfg, summary, tables, figures, out))
    return {"figures": figures, "tables": tables, "summary": summary, "report": str(report)}


def _models(cfg, pretrained, ds, widest, full_model, lora_models, log):
    """Full fine-tuning and LoRA at ranks r_lo = cfg.r and r_hi > r_lo: given ones reused, others trained."""
    if full_model is None:
        log("analyze: full fine-tuning")
        full_model = prepare("full", pretrained, cfg)
        finetune(full_model, ds, cfg, lr=cfg.lr)
    loras = dict(lora_models or {})
    r_lo = cfg.r
    r_hi = max([r for r in loras if r > r_lo], default=min(2 * r_lo, *pretrained.get_submodule(widest).weight.shape))
    for r in dict.fromkeys((r_lo, r_hi)):
        if r not in loras:
            log(f"analyze: LoRA r={r}")
            model = copy.deepcopy(pretrained)          # a distinct adapter name per rank: distinct initial A
            loras[r] = get_lora_model(model, lora_config(cfg, model, r), adapter_name=f"r{r}")
            finetune(loras[r], ds, cfg)
    return full_model, loras, (r_lo, r_hi)


def _grids(loras, deltas, layer, r_lo, r_hi) -> dict:
    """φ grids on ``layer``: lora_A of the two ranks (the paper's), their ΔW, and ΔW against full's."""
    A_lo = dict(loras[r_lo].lora_layers())[layer].lora_A[loras[r_lo].active_adapter].data     # (r_lo, D_in)
    A_hi = dict(loras[r_hi].lora_layers())[layer].lora_A[loras[r_hi].active_adapter].data     # (r_hi, D_in)
    lo, hi = deltas[f"LoRA r={r_lo}"][layer], deltas[f"LoRA r={r_hi}"][layer]
    return {f"lora_A, r={r_lo} vs r={r_hi}": similarity_grid(A_lo, A_hi),
            f"ΔW, LoRA r={r_lo} vs r={r_hi}": similarity_grid(lo, hi, r_lo, r_hi),
            f"ΔW, LoRA r={r_lo} vs full": similarity_grid(lo, deltas["full"][layer], r_lo, r_hi)}


def _intrinsic(cfg, pretrained, ds, d_values, epochs, log) -> list:
    """Accuracy of θ₀ + P z on the downstream test split for each d."""
    d_values = [d for d in (d_values or D_VALUES) if d <= pretrained.num_parameters()]
    log(f"analyze: intrinsic dimension, d in {d_values}")
    return intrinsic_sweep(lambda: copy.deepcopy(pretrained),
                           lambda sub: _train_subspace(sub, ds, cfg, epochs),
                           lambda sub: test_accuracy(sub, ds), d_values, seed=cfg.seed)


def _train_subspace(sub, ds, cfg, epochs):
    lr = INTRINSIC_LR_SCALE / math.sqrt(sub.z.size)
    fit(sub, Adam(sub.parameters(trainable_only=True), lr=lr), BCEWithLogitsLoss(), ds.X_train, ds.y_train,
        epochs=epochs, batch_size=INTRINSIC_BATCH, seed=cfg.seed + 1, desc="intrinsic")


def _svd_row(a) -> dict:
    return {"r": a.r, "storage": a.storage, "dense": a.dense_storage, "compression": a.compression,
            "spectral error σ_{r+1}": a.spectral_error, "relative Frobenius error": a.relative_error,
            "energy kept": a.energy}


# -- figures (matplotlib imported lazily with the Agg backend, by lowrank.app.plots._plt) ---------
def _plot_spectra(spectra: dict, layer: str, path) -> str:
    """σ_i of each ΔW (log scale) and the energy a rank-r truncation keeps."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, sigma in spectra.items():
        sigma = np.asarray(sigma)
        shown = sigma[:64][sigma[:64] > 1e-9 * sigma[0]]          # rounding noise past a LoRA's rank left out
        ax1.semilogy(np.arange(1, len(shown) + 1), shown, ".-", label=label)
        ax2.plot(np.arange(1, min(64, len(sigma)) + 1), np.cumsum(sigma[:64] ** 2) / (sigma ** 2).sum(), ".-",
                 label=label)
    ax1.set(xlabel="index i", ylabel="σ_i", title=f"singular values of ΔW, layer {layer}")
    ax2.set(xlabel="rank r", ylabel="share of ‖ΔW‖_F² kept", title="captured by a rank-r truncation",
            ylim=(0, 1.02))
    ax1.legend(fontsize=8)
    return save(fig, path)


def _plot_grids(grids: dict, layer: str, path) -> str:
    """The LoRA paper's Figure 3: φ(i, j) as heat maps, rows i of the first, columns j of the second."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 3.6), squeeze=False)
    for ax, (title, g) in zip(axes[0], grids.items()):
        im = ax.imshow(g, vmin=0, vmax=1, cmap="viridis", origin="upper", aspect="auto",
                       extent=(0.5, g.shape[1] + 0.5, g.shape[0] + 0.5, 0.5))
        ax.set(xlabel="j", ylabel="i", title=title)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85, label="φ(i, j)")
    fig.suptitle(f"subspace similarity, layer {layer}", fontsize=10)
    return save(fig, path, tight=False, bbox_inches="tight")


def _plot_intrinsic(rows: list, acc: dict, path) -> str:
    """Test accuracy against d, with full fine-tuning, its 90% and the pretrained model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.semilogx([r["d"] for r in rows], [r["accuracy"] for r in rows], "o-", label="θ₀ + P z, z ∈ ℝᵈ")
    full = acc["full fine-tuning"]
    ax.axhline(full, color="gray", ls="--", label="full fine-tuning")
    ax.axhline(0.9 * full, color="gray", ls=":", label="90% of full (d90)")
    ax.axhline(acc["pretrained (downstream)"], color="tab:red", ls=":", label="pretrained, not tuned")
    ax.set(xlabel="subspace dimension d", ylabel="test accuracy", title="intrinsic dimension")
    ax.legend(fontsize=8)
    return save(fig, path)


# -- report ------------------------------------------------------------------------------
def _table(rows: list) -> str:
    keys = list(rows[0])
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _markdown(cfg, summary, tables, figures, out: Path) -> str:
    fig = lambda k: f"\n![{k}]({Path(figures[k]).relative_to(out)})\n" if k in figures else ""
    d90_text = summary["d90"] if summary["d90"] is not None else "not reached in the sweep"
    return f"""# Low-rank analysis of the demo task

Config: hidden {cfg.hidden}, {cfg.n_features} features, downstream "{cfg.downstream}", seed {cfg.seed};
D = {summary['D']:,} parameters. Widest layer: `{summary['layer']}`.

{_table(tables['accuracy'])}
## 1. Truncated SVD of the pretrained weight of layer {summary['layer']}

W ≈ B·C stores p·r + r·q numbers instead of p·q; by Eckart–Young the error is the tail of
the singular values. {summary['rank for 10% relative error']} directions keep the relative Frobenius
error under 10%; {summary['rank for 90% energy']} keep 90% of ‖W‖_F².

{_table(tables['svd'])}
## 2. The rank of what fine-tuning learns

ΔW = W_finetuned − W_pretrained for full fine-tuning, s·B·A for LoRA. Stable rank
‖ΔW‖_F²/‖ΔW‖₂², effective rank exp(entropy of σ/Σσ); captured@r = share of ‖ΔW‖_F² kept by
the best rank-r approximation.

{_table(tables['spectrum'])}{fig('spectrum')}
## 3. Subspace similarity (LoRA paper, Figure 3)

φ(i, j) = ‖U_iᵀU_j‖_F² / min(i, j) over the top singular directions (input side). Two
random subspaces of those sizes in ℝ^{summary['D_in']} would score about max(i, j)/D_in. The
adapters start from independent random A (the init seed depends on adapter name, layer and rank).

{_table(tables['similarity'])}{fig('similarity')}
## 4. Intrinsic dimension

Only z ∈ ℝᵈ trains, θ = θ₀ + P z over all D parameters (dense P with unit-norm columns while
D·d ≤ 2²⁴, Fastfood beyond), z = 0 at the start; Adam with lr = {INTRINSIC_LR_SCALE}/√d (so θ moves
about as far per step at every d), batch {INTRINSIC_BATCH}, {summary['intrinsic_epochs']} epochs.
**d90 = {d90_text}** (90% of full fine-tuning's test accuracy).

{_table(tables['intrinsic'])}{fig('intrinsic')}"""


# -- the subcommand -------------------------------------------------------------------------
def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (CI)")
    parser.add_argument("--out", default="lowrank-out/analysis", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--d-values", default=None, help="comma-separated subspace dimensions d to sweep")
    parser.add_argument("--intrinsic-epochs", type=int, default=None,
                        help="epochs per d of the intrinsic-dimension sweep (default: the fine-tuning epochs)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


def run(args) -> int:
    cfg = DemoConfig.quick(seed=args.seed) if args.quick else DemoConfig(seed=args.seed)
    d_values = [int(v) for v in args.d_values.split(",")] if args.d_values else (
        QUICK_D_VALUES if args.quick else D_VALUES)
    started = time.perf_counter()
    pretrained, ds_pre, _ = pretrain(cfg)
    result = analyze(cfg, pretrained, ds_pre, downstream(cfg, ds_pre), args.out, d_values=d_values,
                     intrinsic_epochs=args.intrinsic_epochs, plots_on=not args.no_plots)
    s = result["summary"]
    print(f"d90 = {s['d90']} of D = {s['D']:,}; full fine-tuning test accuracy "
          f"{s['accuracy']['full fine-tuning']:.3f} ({time.perf_counter() - started:.1f} s)")
    for row in result["tables"]["spectrum"]:
        print(f"  {row['method']:>10} layer {row['layer']}: stable rank {row['stable_rank']:.2f}, "
              f"effective rank {row['effective_rank']:.2f}, captured@1,2,4,8 "
              + ", ".join(f"{row[f'captured@{r}']:.2f}" for r in CAPTURE_RANKS))
    print(f"report: {result['report']}")
    return 0
