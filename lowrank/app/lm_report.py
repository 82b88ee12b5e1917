"""Markdown report, figures and terminal summary of ``lowrank lm demo`` results (``lm_demo.run_demo``)."""
from __future__ import annotations

from pathlib import Path

from . import plots
from .report import _kb, _table

# The LoRA paper's Table 5 (GPT-3 175B, 18M trainable parameters), by the demo's Table-5 labels.
PAPER_TABLE5 = {"W_q": (70.4, 91.0), "W_v": (73.0, 91.0), "W_q, W_v": (73.7, 91.3), "W_q, W_k, W_v, W_o": (73.7, 91.7)}


def spread(results: dict) -> tuple[float, float]:
    """(lowest, highest) validation perplexity of the seed runs."""
    ppl = [row["val_ppl"] for row in results["seeds"]]
    return min(ppl), max(ppl)


def _versus(value: float, reference: float, width: float) -> str:
    """Δ perplexity against ``reference`` and whether it exceeds the seed range ``width``."""
    delta = value - reference
    return f"{delta:+.3f}" + (" (beyond spread)" if abs(delta) > width else " (within spread)")


def methods_table(results: dict, width: float, reference_label: str) -> str:
    """Perplexity, parameters, bytes per task, memory of one step and speed of each run."""
    ref = next(r for r in results["methods"] if r["label"] == reference_label)["val_ppl"]
    pre = results["pretrained"]
    body = [["pretrained (no fine-tuning)", f"{pre['val_ppl']:.3f}", _versus(pre["val_ppl"], ref, width), "0", "0.00",
             "0", "", "", "", "", "", ""]]
    for r in results["methods"]:
        m = r["memory"]
        body.append([r["label"], f"{r['val_ppl']:.3f}", "—" if r["label"] == reference_label else
                     _versus(r["val_ppl"], ref, width), f"{r['trainable_params']:,}",
                     f"{100 * r['trainable_params'] / r['all_params']:.2f}", _kb(r["stored_bytes"]),
                     _kb(m["weights"]), _kb(m["gradients"]), _kb(m["optimizer"]), _kb(m["activations"]),
                     _kb(m["total"]), f"{r['seconds_per_step']:.3f}"])
    return _table(["method", "val ppl", f"vs {reference_label}", "trainable params", "trainable %",
                   "stored per task (KB)", "weights (KB)", "grads (KB)", "optimizer (KB)", "activations (KB)",
                   "total (KB)", "s / step"], body)


def table5(results: dict, width: float) -> tuple[str, str]:
    """The Table-5 comparison (means over the seeds) side by side with the paper, and the verdict in a sentence."""
    rows = results["table5"]
    best = min(rows, key=lambda r: r["mean_ppl"])
    body = []
    for r in rows:
        paper = PAPER_TABLE5.get(r["label"], ("—", "—"))
        body.append([r["label"], r["r"], f"{r['trainable_params']:,}", " / ".join(f"{p:.3f}" for p in r["seed_ppl"]),
                     f"{r['mean_ppl']:.3f}", "best" if r is best else _versus(r["mean_ppl"], best["mean_ppl"], width),
                     *paper])
    table = _table(["weights adapted", "r", "trainable params", "val ppl by seed", "mean", "vs best",
                    "paper WikiSQL acc", "paper MultiNLI acc"], body)
    single = min((r for r in rows if r["label"] in ("W_q", "W_v")), key=lambda r: r["mean_ppl"])
    multi = min((r for r in rows if r["label"] in ("W_q, W_v", "W_q, W_k, W_v, W_o")), key=lambda r: r["mean_ppl"])
    gap, s_ppl, m_ppl = single["mean_ppl"] - multi["mean_ppl"], single["mean_ppl"], multi["mean_ppl"]
    if gap > width:
        verdict = (f"**This model agrees with the paper**: the best multi-matrix setting ({multi['label']}, "
                   f"r = {multi['r']}, ppl {m_ppl:.3f}) beats the best single matrix ({single['label']}, r = 8, "
                   f"ppl {s_ppl:.3f}) by {gap:.3f}, more than the seed range {width:.3f}.")
    elif gap < -width:
        verdict = (f"**This model disagrees with the paper**: the best single matrix ({single['label']}, r = 8, ppl "
                   f"{s_ppl:.3f}) beats the best multi-matrix setting ({multi['label']}, r = {multi['r']}, "
                   f"ppl {m_ppl:.3f}) by {-gap:.3f}, more than the seed range {width:.3f}.")
    else:
        verdict = (f"**Undecided on this model**: the best multi-matrix setting ({multi['label']}, ppl {m_ppl:.3f}) "
                   f"and the best single matrix ({single['label']}, ppl {s_ppl:.3f}) differ by {abs(gap):.3f}, "
                   f"within the seed range {width:.3f}.")
    paired = [a - b for a, b in zip(single["seed_ppl"], multi["seed_ppl"])]
    if len(paired) > 1:
        verdict += (f" Paired by seed (the same batch order), {multi['label']} minus {single['label']} is "
                    + ", ".join(f"{-d:+.3f}" for d in paired) + " perplexity"
                    + (", the same sign in every seed." if all(d > 0 for d in paired) or all(d < 0 for d in paired)
                       else ", changing sign between seeds."))
    by = {r["label"]: r["mean_ppl"] for r in rows}
    verdict += (f" W_q alone vs W_v alone: {by['W_q']:.3f} vs {by['W_v']:.3f} "
                f"({'beyond' if abs(by['W_q'] - by['W_v']) > width else 'within'} the spread; the paper finds "
                f"W_q alone clearly worse). W_q, W_v at r = 4 vs W_v alone at r = 8: {by['W_q, W_v']:.3f} vs "
                f"{by['W_v']:.3f} ({'beyond' if abs(by['W_q, W_v'] - by['W_v']) > width else 'within'} the spread). "
                f"All seven linear layers at r = 1 (1.25× the budget): {by['all linear']:.3f}.")
    return table, verdict


def reading(results: dict, width: float) -> str:
    """What the main table says, each comparison read against the seed range ``width``."""
    rows = {r["label"]: r for r in results["methods"]}
    pre, full, head = results["pretrained"]["val_ppl"], rows["full"], rows["head"]
    r = results["config"]["r"]
    lora = rows[f"lora r={r}"]

    def against(a, b):
        return "beyond" if abs(a["val_ppl"] - b["val_ppl"]) > width else "within"
    ranks = [rows[f"lora r={k}"] for k in results["config"]["ranks"]]
    steps = [a["val_ppl"] - b["val_ppl"] for a, b in zip(ranks, ranks[1:])]
    qlora, dora = rows[f"qlora r={r}"], rows[f"dora r={r}"]
    text = (f"Full fine-tuning takes the code perplexity from {pre:.3f} to {full['val_ppl']:.3f}; LoRA r = {r} on "
            f"q/v ({100 * lora['trainable_params'] / lora['all_params']:.2f}% of the parameters, "
            f"{_kb(lora['stored_bytes'])} KB per task against {_kb(full['stored_bytes'])} KB) to "
            f"{lora['val_ppl']:.3f}, {100 * (pre - lora['val_ppl']) / (pre - full['val_ppl']):.0f}% of full "
            f"fine-tuning's gain in the same steps. Each doubling of the rank lowers the perplexity by "
            + ", ".join(f"{d:.3f}" for d in steps) +
            f" ({sum(abs(d) > width for d in steps)} of {len(steps)} beyond the seed range {width:.3f}). "
            f"QLoRA (4-bit base) vs LoRA: {qlora['val_ppl']:.3f} vs {lora['val_ppl']:.3f} ({against(qlora, lora)} "
            f"the spread); DoRA vs LoRA: {dora['val_ppl']:.3f} vs {lora['val_ppl']:.3f} ({against(dora, lora)}). "
            f"The head alone ({head['trainable_params']:,} parameters) reaches {head['val_ppl']:.3f}")
    top = ranks[-1]
    if head["val_ppl"] < top["val_ppl"] - width:
        text += (f", better than LoRA r = {top['r']} with about as many parameters ({top['trainable_params']:,}); "
                 "plausibly because on a byte-level model much of the English-to-code shift is in which bytes "
                 "come next, which the output layer alone can learn (not tested here)")
    return text + "."


def seeds_section(results: dict, width: float) -> list:
    import numpy as np
    rows = results["seeds"]
    ppl = np.array([r["val_ppl"] for r in rows])
    return [_table(["run", "seed", "val ppl"], [[r["label"], r["seed"], f"{r['val_ppl']:.3f}"] for r in rows]),
            f"{len(rows)} seeds of {rows[0]['label']} on q/v: range (max − min) **{width:.3f}** perplexity, standard "
            f"deviation {ppl.std(ddof=1) if len(ppl) > 1 else 0:.3f}. A seed changes the LoRA initialisation (the "
            "adapter name seeds injection) and the batch order; the splits and validation windows stay fixed, so "
            "every comparison is paired. A difference is called *beyond spread* when it exceeds this range; with "
            "this few seeds the range is itself a rough estimate."]


def spectrum_section(results: dict) -> list:
    d = results["delta"]
    ranks = (1, 2, 4, 8, 16)
    shape = " × ".join(map(str, d["rows"][0]["shape"]))
    return [f"ΔW = W_finetuned − W_pretrained under full fine-tuning, s·B·A under LoRA, for q_proj and v_proj of "
            f"decoder layer {d['layer']} ({shape}). Stable rank ‖ΔW‖_F²/‖ΔW‖₂², entropy effective rank, and "
            "the share of ‖ΔW‖_F² kept by the best rank-k approximation (`lowrank.analysis.spectrum`).",
            _table(["ΔW of", "layer", "‖ΔW‖_F", "stable rank", "effective rank", *[f"top {k}" for k in ranks]],
                   [[r["method"], r["layer"].rsplit(".", 1)[1], f"{r['fro_norm']:.3f}", f"{r['stable_rank']:.2f}",
                     f"{r['effective_rank']:.2f}", *[f"{r[f'captured@{k}']:.2f}" for k in ranks]] for r in d["rows"]])]


def samples_section(results: dict) -> list:
    parts = [f"Greedy decoding, {results['config']['max_new_tokens']} new bytes, the same prompts for every model "
             "(`model.generate(ids, max_new_tokens=..., do_sample=False)`). A byte-level model of under a million "
             "parameters after a few hundred steps: read these for the shift in style, not for working code."]
    for s in results["samples"]:
        parts.append(f"Prompt: `{s['prompt']!r}`")
        for label, text in s.items():
            if label != "prompt":
                parts.append(f"*{label}*:\n\n```python\n{s['prompt']}{text}\n```")
    return parts


def figures(results: dict, out: Path) -> dict:
    """The PNGs: loss curves, perplexity bars, ΔW singular values."""
    runs = results["methods"] + [{**r, "label": f"{r['label']} r={r['r']}"} for r in results["table5"]
                                 if not r.get("reused")]
    return {"curves": plots.lm_curves({r["label"]: r["history"] for r in runs}, out / "lm_loss_curves.png"),
            "perplexity": plots.perplexity_bars(runs, results["pretrained"]["val_ppl"], spread(results),
                                                out / "lm_perplexity.png"),
            "spectra": plots.singular_values(results["delta"]["spectra"], out / "lm_delta_singular_values.png")}


def write_report(path, results: dict) -> str:
    cfg, info, pre = results["config"], results["corpus_info"], results["pretrained"]
    lo, hi = spread(results)
    width, reference = hi - lo, f"lora r={cfg['r']}"
    t5, verdict = table5(results, width)
    per_layer = {r["label"]: r["trainable_params"] // pre["layers"] for r in results["table5"]}
    budget, every = per_layer["W_q"], per_layer["all linear"]
    figs = results.get("figures", {})
    sizes = "; ".join(f"{c}: " + ", ".join(f"{s} {v['documents']} docs / {v['bytes']:,} B" for s, v in info[c].items())
                      for c in ("pydoc", "stdlib"))
    lr = ", ".join(f"{k} {v:g}" for k, v in cfg["lr"].items())
    parts = [
        "# lowrank lm demo report",
        f"The shipped checkpoint (`pydoc-byte-4x128`: 4 layers, d = 128, byte vocabulary, {pre['all_params']:,} "
        f"parameters, pretrained on pydoc's English) fine-tuned on Python code from the standard library. Every run: "
        f"{cfg['steps']} Adam steps of {cfg['batch_size']} windows × T = {cfg['seq_len']} tokens "
        f"({results['training_windows']:,} training windows), warm-up {cfg['warmup']} then cosine decay, peak lr {lr} "
        f"(each picked by a three-point probe, recorded in `lowrank/app/lm_demo.py`); "
        f"LoRA alpha = 2r. Validation perplexity on {cfg['eval_windows']} fixed windows of held-out stdlib files.",
        f"Python {results['python']}, commit `{results['commit']}`, corpus sizes (split seed {info['split_seed']}): "
        f"{sizes}. The corpus changes slightly across Python versions.",
        "## Validation perplexity on the code domain", methods_table(results, width, reference),
        reading(results, width),
        "Stored per task = the trainable parameters in float32 (4 bytes each): what a task keeps beyond the shared "
        "frozen base. Memory: the arrays of one training step (`measure_step`), weights (QLoRA: 4-bit base), "
        "gradients, Adam state and the activations the modules cache. s / step: median over the run, "
        f"BLAS threads {results.get('threads')}; measured on a shared, loaded 2-core machine.",
    ]
    if "perplexity" in figs:
        parts.append(f"![perplexity]({Path(figs['perplexity']).name})")
    parts += ["## Seed-to-seed spread", *seeds_section(results, width)]
    parts += ["## Which weight matrices to adapt (the LoRA paper's Table 5)",
              f"A fixed budget of {budget:,} parameters per layer (r · (D_in + D_out) per matrix): one matrix at "
              f"r = 8, two at r = 4, four at r = 2. All seven linear layers (q, k, v, o, gate, up, down) at the "
              f"smallest rank r = 1 take {every:,} per layer ({every / budget:.2f}× the budget): no integer ranks "
              "over all seven match it exactly. W_q, W_v at r = 4 is "
              "the main table's `lora r=4` run for the first seed. Each setting is trained with "
              f"{results['config']['table5_seeds']} seeds (the first of them the main table's seed) and compared by "
              "the mean. The paper's accuracies are GPT-3 175B at 18M parameters.",
              t5, "The paper's reading: at a fixed budget, adapting more matrices at a lower rank beats one matrix "
              "at a higher rank. " + verdict]
    if "curves" in figs:
        parts += ["## Loss curves", f"![loss curves]({Path(figs['curves']).name})"]
    parts += ["## The rank of what fine-tuning learned", *spectrum_section(results)]
    if "spectra" in figs:
        parts.append(f"![singular values]({Path(figs['spectra']).name})")
    parts += ["## Sample generations", *samples_section(results)]
    parts.append(f"_Generated by `lowrank lm demo{' --quick' if cfg['steps'] < 10 else ''}` in "
                 f"{results.get('seconds', 0):.0f} s (wall time)._")
    text = "\n\n".join(parts) + "\n"
    Path(path).write_text(text)
    return text


def summary(results: dict) -> str:
    """A few lines for the terminal."""
    lo, hi = spread(results)
    lines = [f"pretrained: val ppl {results['pretrained']['val_ppl']:.3f} on stdlib code"]
    for r in results["methods"] + results["table5"]:
        lines.append(f"  {r['label']:<20} ppl {r.get('mean_ppl', r['val_ppl']):.3f}  "
                     f"trainable {r['trainable_params']:>9,}")
    lines.append(f"seed range {lo:.3f}..{hi:.3f} ({hi - lo:.3f}); {results.get('seconds', 0):.0f} s")
    return "\n".join(lines)
