"""``lowrank lm demo``: the LoRA article's claims, measured on a small language model.

    lowrank lm demo --threads 1                 the report in lowrank-out/lm (~5 min on a loaded 2-core machine)
    lowrank lm demo --quick --out /tmp/lm       every section at toy sizes, in seconds (CI)

Every run starts from the shipped checkpoint (pretrained on pydoc's English, ``lm.shipped_checkpoint``)
and fine-tunes it on the stdlib-code domain with the same batches (``Batcher`` seeded by the run's
seed), the same learning-rate schedule (``lm.train_steps``) and the same validation windows:

    methods   the pretrained model as it is; full fine-tuning; the head alone; LoRA r = 1..16 on q/v;
              QLoRA and DoRA at r = 8 on q/v                                  (the main table)
    table 5   which matrices at a fixed budget of 8·(128 + 128) = 2,048 parameters per layer:
              W_q r = 8, W_v r = 8, W_q + W_v r = 4, W_q..W_o r = 2, all seven linear layers r = 1
              (2,560 per layer, 1.25x: no integer ranks over all seven match exactly); each setting
              run with two seeds and averaged
    seeds     LoRA r = 8 on q/v again with other seeds (the adapter name seeds A's init; the seed
              also orders the batches): the seed-to-seed spread every difference is read against
    spectrum  the singular values of ΔW for q/v of one layer, full fine-tuning vs LoRA (``analysis``)
    samples   greedy continuations of a few code prompts by the base, LoRA and full models

OUT gets ``report.md`` (``lm_report``), the PNGs, ``results.json`` and ``demo.log`` (a stage line per run).
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .demo import jsonable
from .progress import StageLog

QV = "q_proj,v_proj"
# Each method's peak learning rate (LMDemoConfig.lr) is the best validation perplexity of a sweep over
# three rates; QLoRA and DoRA take LoRA's.
PROMPTS = ("import os\nimport ", "class Stack:\n    def __init__(self, items):\n        self.",
           "    for key, value in ")


@dataclass
class LMDemoConfig:
    """Sizes of one demo run (``quick()``: the same sections at toy sizes)."""

    steps: int = 120                # Adam steps per run
    batch_size: int = 16            # windows per step (16 halves the spread over seeds that 8 gives)
    seq_len: int = 64               # T, predicted tokens per window
    eval_windows: int = 96          # validation windows behind every reported perplexity
    curve_windows: int = 16         # validation windows behind the loss-curve points
    curve_points: int = 5           # validation points per curve (steps divisible by it: even stages)
    warmup: int = 10
    lr: dict = field(default_factory=lambda: {"lora": 1e-2, "qlora": 1e-2, "dora": 1e-2, "full": 2e-3,
                                              "head": 1e-2})       # the sweep above
    ranks: tuple = (1, 2, 4, 8, 16)
    r: int = 8                      # the rank of QLoRA, DoRA, the seed runs and the samples
    seeds: int = 3                  # runs of LoRA r on q/v for the spread (the first is the main table's)
    table5_seeds: int = 2           # runs per Table-5 setting, averaged (W_q, W_v r=4's first is the main table's)
    spectrum_layer: int = 1         # the decoder layer whose q/v ΔW spectra are shown
    max_new_tokens: int = 64
    seed: int = 0                   # splits and the first run's seed

    @classmethod
    def quick(cls, seed: int = 0) -> "LMDemoConfig":
        return cls(steps=6, batch_size=4, seq_len=32, eval_windows=8, curve_windows=4, curve_points=2, warmup=1,
                   lr={"lora": 1e-2, "qlora": 1e-2, "dora": 1e-2, "full": 1e-3, "head": 1e-2}, seeds=2, table5_seeds=2,
                   max_new_tokens=8, seed=seed)

    def to_dict(self) -> dict:
        return asdict(self)


def main_runs(cfg: LMDemoConfig) -> list:
    """(label, method, target, r) of the main table."""
    return ([("full", "full", None, None), ("head", "head", None, None)]
            + [(f"lora r={r}", "lora", QV, r) for r in cfg.ranks]
            + [(f"qlora r={cfg.r}", "qlora", QV, cfg.r), (f"dora r={cfg.r}", "dora", QV, cfg.r)])


TABLE5 = (("W_q", "q_proj", 8), ("W_v", "v_proj", 8), ("W_q, W_v", QV, 4),
          ("W_q, W_k, W_v, W_o", "q_proj,k_proj,v_proj,o_proj", 2), ("all linear", "all-linear", 1))


class Data:
    """The code domain's windows: training (n, T+1), the fixed validation and curve sets."""

    def __init__(self, cfg: LMDemoConfig):
        from ..training.text import corpus_info, load_splits, spaced_windows, windows
        from .lm_finetune import CORPUS
        splits = load_splits(CORPUS, cfg.seed)
        self.train = windows(splits.train, cfg.seq_len)
        all_val = windows(splits.validation, cfg.seq_len)
        self.val = spaced_windows(all_val, cfg.eval_windows)
        self.curve = spaced_windows(all_val, cfg.curve_windows)
        self.info = corpus_info(cfg.seed)


def load_base(dtype: str = "float32"):
    """A fresh copy of the shipped checkpoint (runs modify their base in place)."""
    from ..models.llama import LlamaForCausalLM
    from .lm import shipped_checkpoint
    return LlamaForCausalLM.from_pretrained(shipped_checkpoint(), dtype=dtype)


def build(method: str, target, r, adapter_name: str = "default"):
    """The shipped base set up for ``method`` (``lm_finetune.build_model``; adapters under ``adapter_name``)."""
    from .lm_finetune import ADAPTER_METHODS, build_model, lora_config
    config = lora_config(method, target, r) if method in ADAPTER_METHODS else None
    return build_model(load_base(), method, config, adapter_name)


def memory(model, batch) -> dict:
    """``measure_step`` on a copy (its optimizer step must not move the run's weights): bytes by kind."""
    from ..nn.losses_lm import CausalLMLoss
    from ..nn.optim import Adam
    from ..training.accounting import measure_step
    probe = copy.deepcopy(model)
    return measure_step(probe, Adam(probe.parameters(trainable_only=True), lr=1e-3), batch, batch,
                        loss_fn=CausalLMLoss()).to_dict()


def run_one(label, method, target, r, data: Data, cfg: LMDemoConfig, seed: int | None = None):
    """Build, measure one step's memory, train ``cfg.steps`` steps, evaluate: (row, model)."""
    from ..training.accounting import stored_bytes
    from ..training.text import Batcher
    from .lm import evaluate_loss, train_steps
    seed = cfg.seed if seed is None else seed
    model = build(method, target, r, "default" if seed == cfg.seed else f"seed{seed}")
    batcher = Batcher(data.train, cfg.batch_size, seed + 1)
    mem = memory(model, data.train[:cfg.batch_size])
    history = train_steps(model, batcher, data.curve, steps=cfg.steps, lr=cfg.lr[method], warmup=cfg.warmup,
                          eval_every=max(1, cfg.steps // cfg.curve_points))
    val_loss = evaluate_loss(model, data.val)
    row = {"label": label, "method": method, "target": target, "r": r, "seed": seed, "lr": cfg.lr[method],
           "trainable_params": model.num_parameters(trainable_only=True), "all_params": model.num_parameters(),
           "stored_bytes": stored_bytes(model), "memory": mem,
           "seconds_per_step": history["seconds_per_step_median"], "val_loss": val_loss,
           "val_ppl": math.exp(val_loss), "history": history}
    return row, model


def delta_spectra(models: dict, pretrained, layer: int) -> dict:
    """Singular values and spectrum rows of ΔW for q/v of ``layer``: full fine-tuning and the LoRA models."""
    from ..analysis.spectrum import full_deltas, lora_deltas, singular_values, spectrum_rows
    names = [f"model.layers.{layer}.self_attn.{p}" for p in ("q_proj", "v_proj")]
    spectra, rows = {}, []
    for label, model in models.items():
        deltas = full_deltas(model, pretrained, names) if label == "full" else \
            {n: d for n, d in lora_deltas(model).items() if n in names}
        for name, d in deltas.items():
            key = f"{label}, {name.rsplit('.', 1)[1]}"
            spectra[key] = singular_values(d)
            rows += spectrum_rows({name: d}, label, ranks=(1, 2, 4, 8, 16))
    return {"layer": layer, "spectra": spectra, "rows": rows}


def samples(models: dict, cfg: LMDemoConfig) -> list:
    """Greedy continuations (``max_new_tokens``) of each prompt by each model: [{prompt, model: text}]."""
    import numpy as np
    from ..io.tokenizer import ByteTokenizer
    tok, out = ByteTokenizer(), []
    for prompt in PROMPTS:
        ids = np.asarray(tok.encode(prompt))[None]                                  # (1, T), BOS first
        row = {"prompt": prompt}
        for label, model in models.items():
            model.eval()
            new = np.asarray(model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                            eos_token_id=tok.eos_token_id))[0, ids.shape[1]:]
            row[label] = tok.decode(new)
        out.append(row)
    return out


def run_demo(cfg: LMDemoConfig, stage) -> dict:
    """Every section; returns the numbers the report prints (``stage``: one line per run)."""
    from .lm import evaluate_loss, provenance
    with stage("data") as note:
        data = Data(cfg)
        pretrained = load_base()
        before = evaluate_loss(pretrained, data.val)
        note["result"] = f"{len(data.train)} training windows; pretrained val ppl {math.exp(before):.3f}"
    results = {"config": cfg.to_dict(), **provenance(), "corpus_info": data.info,
               "training_windows": len(data.train), "pretrained": {"val_loss": before, "val_ppl": math.exp(before),
                                                                   "all_params": pretrained.num_parameters(),
                                                                   "layers": pretrained.config.num_hidden_layers},
               "methods": [], "table5": [], "seeds": []}
    models = {}
    for label, method, target, r in main_runs(cfg):
        with stage(label) as note:
            row, models[label] = run_one(label, method, target, r, data, cfg)
            results["methods"].append(row)
            note["result"] = f"val ppl {row['val_ppl']:.3f}  {row['seconds_per_step']:.3f} s/step"
    by_label = {row["label"]: row for row in results["methods"]}
    for label, target, r in TABLE5:
        runs = []
        for seed in range(cfg.seed, cfg.seed + cfg.table5_seeds):
            reuse = by_label.get(f"lora r={r}") if target == QV and seed == cfg.seed else None
            with stage(f"{label} r={r} seed {seed}") as note:
                runs.append(dict(reuse) if reuse else run_one(label, "lora", target, r, data, cfg, seed)[0])
                note["result"] = f"val ppl {runs[-1]['val_ppl']:.3f}  {runs[-1]['trainable_params']:,} params" + \
                    (f" (the run '{reuse['label']}')" if reuse else "")
        results["table5"].append({**runs[0], "label": label, "reused": runs[0]["label"] if target == QV else None,
                                  "seed_ppl": [x["val_ppl"] for x in runs],
                                  "mean_ppl": sum(x["val_ppl"] for x in runs) / len(runs)})
    results["seeds"].append(by_label[f"lora r={cfg.r}"])
    for seed in range(cfg.seed + 1, cfg.seed + cfg.seeds):
        with stage(f"lora r={cfg.r} seed {seed}") as note:
            row = run_one(f"lora r={cfg.r}", "lora", QV, cfg.r, data, cfg, seed=seed)[0]
            results["seeds"].append(row)
            note["result"] = f"val ppl {row['val_ppl']:.3f}"
    with stage("spectra") as note:
        lora_label = f"lora r={cfg.r}"
        results["delta"] = delta_spectra({"full": models["full"], lora_label: models[lora_label],
                                          f"lora r={cfg.ranks[-1]}": models[f"lora r={cfg.ranks[-1]}"]},
                                         pretrained, min(cfg.spectrum_layer, pretrained.config.num_hidden_layers - 1))
    with stage("samples"):
        results["samples"] = samples({"pretrained": pretrained, lora_label: models[lora_label],
                                      "full": models["full"]}, cfg)
    return results


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="every section at toy sizes, in seconds (CI)")
    parser.add_argument("--out", default="lowrank-out/lm", help="output directory (default lowrank-out/lm)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and the first run (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: the library's own; 1 is "
                        "much faster on a machine other jobs load)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")


class _Tee:
    """A stream writing to stderr and to a log file."""

    def __init__(self, path: Path):
        self.file = open(path, "w")

    def write(self, text):
        sys.stderr.write(text)
        self.file.write(text)

    def flush(self):
        sys.stderr.flush()
        self.file.flush()


def run(args) -> int:
    cfg = LMDemoConfig.quick(seed=args.seed) if args.quick else LMDemoConfig(seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tee = _Tee(out / "demo.log")
    log = StageLog("lm demo", stream=tee)
    try:
        results = run_demo(cfg, log.stage)
        results["threads"] = args.threads
        from .lm_report import figures, summary, write_report
        with log.stage("report") as note:
            results["figures"] = {} if args.no_plots else figures(results, out)
            results["seconds"] = time.perf_counter() - started
            (out / "results.json").write_text(json.dumps(results, indent=1, default=jsonable) + "\n")
            write_report(out / "report.md", results)
            note["result"] = str(out / "report.md")
    finally:
        tee.file.close()
    print(summary(results))
    print(f"report: {out / 'report.md'}")
    return 0
