"""The demo's figures (matplotlib, imported lazily with the Agg backend; PNG files)."""
from __future__ import annotations

import numpy as np

from ..training.data import Dataset, lift
from ..training.loop import predict


def save(fig, path, tight: bool = True, **savefig_kw) -> str:
    """Lay out (tight_layout unless ``tight`` is False), write as PNG, close; returns the path."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, **savefig_kw)
    _plt().close(fig)
    return str(path)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def loss_curves(histories: dict, path) -> str:
    """Training loss and validation accuracy per epoch for each method."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, h in histories.items():
        ax1.plot(h.epoch, h.train_loss, label=name)
        if h.val_acc:
            ax2.plot(h.epoch, h.val_acc, label=name)
    ax1.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
    ax2.set(xlabel="epoch", ylabel="validation accuracy", title="accuracy")
    ax2.legend(fontsize=8)
    return save(fig, path)


def decision_boundaries(models: dict, ds: Dataset, path, resolution: int = 150) -> str:
    """Each model's decision regions over the task's 2-D plane, with the test points."""
    plt = _plt()
    pts = ds.points["test"]
    lo, hi = pts.min(axis=0) - 0.3, pts.max(axis=0) + 0.3
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], resolution), np.linspace(lo[1], hi[1], resolution))
    grid = lift(np.stack([gx.ravel(), gy.ravel()], axis=1), ds.spec)
    fig, axes = plt.subplots(1, len(models), figsize=(3.6 * len(models), 3.4), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items()):
        regions = predict(model, grid).reshape(gx.shape)
        ax.contourf(gx, gy, regions, levels=[-0.5, 0.5, 1.5], colors=["#cfe0f5", "#f7d4c8"])
        ax.scatter(pts[:, 0], pts[:, 1], c=ds.y_test, cmap="coolwarm", s=5)
        ax.set(title=name, xticks=[], yticks=[])
    return save(fig, path)


def rank_tradeoff(rows: list, full_acc: float, full_bytes: int, path) -> str:
    """Accuracy and stored bytes against the LoRA rank, full fine-tuning as reference lines."""
    plt = _plt()
    r = [row["r"] for row in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(r, [row["test_acc"] for row in rows], "o-", label="LoRA")
    ax1.axhline(full_acc, color="gray", ls="--", label="full fine-tuning")
    ax1.set(xscale="log", xlabel="rank r", ylabel="test accuracy", title="accuracy vs rank")
    ax1.legend()
    ax2.plot(r, [row["stored_bytes"] for row in rows], "o-", label="LoRA adapter + head")
    ax2.axhline(full_bytes, color="gray", ls="--", label="full model copy")
    ax2.set(xscale="log", yscale="log", xlabel="rank r", ylabel="bytes stored per task", title="storage vs rank")
    ax2.legend()
    return save(fig, path)


def singular_values(spectra: dict, path) -> str:
    """Singular values (normalised by the largest) of each learned update ΔW."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, s in spectra.items():
        s = np.asarray(s)
        ax.semilogy(np.arange(1, len(s) + 1), s / s[0], ".-", label=name)
    ax.set(xlabel="index", ylabel="σ_i / σ_1", title="singular values of ΔW", xlim=(0.5, 40.5), ylim=(1e-8, 2))
    ax.legend(fontsize=8)
    return save(fig, path)


def lm_curves(histories: dict, path) -> str:
    """Training loss (mean over each stage) and validation loss against the step, per run of ``lowrank lm demo``."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    colors = plt.get_cmap("tab20").colors
    for i, (name, h) in enumerate(histories.items()):
        style = dict(color=colors[i % len(colors)], ls="-" if i < 10 else "--", marker=".", label=name)
        ax1.plot(h["step"], h["train_loss"], **style)
        ax2.plot(h["step"], h["val_loss"], **style)
    ax1.set(xlabel="step", ylabel="training loss (nats / token)", title="training loss (mean over each stage)")
    ax2.set(xlabel="step", ylabel="validation loss (nats / token)", title="validation loss (curve windows)")
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return save(fig, path)


def perplexity_bars(rows: list, reference: float, spread: tuple, path) -> str:
    """Validation perplexity per run (its ``mean_ppl`` over seeds where it has one) as horizontal bars;
    ``reference`` (the pretrained model) as a dashed line, ``spread`` (low, high) of the seed runs as a band."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 0.32 * len(rows) + 1.2))
    labels = [r["label"] for r in rows]
    ppl = [r.get("mean_ppl", r["val_ppl"]) for r in rows]
    ax.barh(range(len(rows)), ppl, color="#7da7d9")
    ax.axvline(reference, color="gray", ls="--", label="pretrained, not fine-tuned")
    ax.axvspan(*spread, color="#f2b880", alpha=0.6, label="seed-to-seed range (LoRA)")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    low = min(min(ppl), spread[0])
    ax.set(xlabel="validation perplexity on stdlib code", xlim=(0.95 * low, 1.02 * reference))
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)
