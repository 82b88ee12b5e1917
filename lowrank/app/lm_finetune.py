"""``lowrank lm finetune``: adapt a pretrained byte-level Llama to Python code from the standard library.

    lowrank lm finetune --method lora --target q_proj,v_proj --r 8 --out runs/lora
    lowrank lm finetune --method full --model runs/pydoc --out runs/full
    mpiexec -n 2 lowrank lm finetune --distributed --method lora --out runs/lora

The base is the shipped checkpoint (``lowrank.app.lm.shipped_checkpoint``) or ``--model DIR`` (a
transformers folder over the byte vocabulary). Methods:

    lora    LoRA on --target (PEFT's names; "all-linear" for every projection)
    dora    the same with DoRA's magnitude vector (use_dora)
    qlora   every projection frozen in 4-bit NF4 (lm_head stays float), LoRA on --target
    full    every weight trained
    head    lm_head alone. A tied head (tie_word_embeddings) is untied first, into its own copy of the
            embedding matrix: trained in place, the shared matrix would move the input embedding too,
            so it would not be "the head alone". The shipped checkpoint is untied already.

OUT gets ``adapter/`` (PEFT's files: lora, dora, qlora) or ``model/`` (a transformers folder: full,
head) and ``summary.json`` (validation perplexity before and after, trainable parameters, seconds
per step, the Python version and corpus sizes), committed as one. Every flag, the model folder and
--out are checked before training (an earlier run's outputs are replaced only with --overwrite);
nothing is written before training ends. ``--distributed`` trains data-parallel over the
ranks of ``mpiexec`` as ``lowrank train --distributed`` does (the same global batches, each split by
``shard_bounds``; rank 0 writes and prints).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .lm import add_training_arguments, command_line, evaluate_loss, resolve, shipped_checkpoint, stage_printer, \
    train_steps

METHODS = ("lora", "qlora", "dora", "full", "head")
ADAPTER_METHODS = ("lora", "qlora", "dora")
DEFAULTS = dict(steps=200, batch_size=16, seq_len=128, warmup=20, eval_every=50, eval_windows=64,
                out="lowrank-lm-finetune")
LR = {"lora": 2e-3, "qlora": 2e-3, "dora": 2e-3, "full": 3e-4, "head": 2e-3}
CORPUS = "stdlib"
OUTPUTS = ("adapter/", "model/", "summary.json")          # what a run writes in OUT (--overwrite replaces it)


def add_arguments(parser):
    parser.add_argument("--model", default=None, help="a transformers Llama folder over bytes (default: the "
                        "shipped pydoc checkpoint)")
    parser.add_argument("--method", default="lora", help=f"{' | '.join(METHODS)} (default lora)")
    parser.add_argument("--target", default="q_proj,v_proj", help="comma-separated projections to adapt, or "
                        "all-linear (default q_proj,v_proj)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2r: scaling 2)")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    add_training_arguments(parser, {**DEFAULTS, "lr": "by method: " + ", ".join(f"{k} {v:g}" for k, v in LR.items())})
    parser.add_argument("--distributed", action="store_true", help="data-parallel over the ranks of mpiexec")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")


def lora_config(method: str, target: str, r: int, alpha=None, dropout: float = 0.0, model="shipped"):
    """The LoraConfig of ``--method --target --r --alpha --dropout --model`` (its own checks refuse a
    bad r, alpha or dropout); ``target`` is "all-linear" or comma-separated module names."""
    from ..tuners.lora.config import LoraConfig
    modules = target if target == "all-linear" else [t for t in target.split(",") if t]
    if not modules:
        raise ValueError(f"--target names no module: {target!r}")
    return LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
                      target_modules=modules, use_dora=method == "dora", base_model_name_or_path=str(model),
                      task_type="CAUSAL_LM")


def flags_lora_config(args):
    """``lora_config`` of the parsed flags."""
    return lora_config(args.method, args.target, args.r, args.alpha, args.dropout, args.model)


def check_flags(args):
    """Refuse a bad method, flag, model folder or --out before anything is loaded or trained."""
    if args.method not in METHODS:
        raise ValueError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    resolve(args, {**DEFAULTS, "lr": LR[args.method]})
    args.model = str(shipped_checkpoint() if args.model is None else args.model)
    if args.method in ADAPTER_METHODS:
        flags_lora_config(args)
    from ..models.llama.configuration import LlamaConfig
    from ..io.tokenizer import ByteTokenizer
    config_file = Path(args.model) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model {args.model}: no config.json there (expected a folder written by "
                         f"save_pretrained or lowrank lm pretrain)")
    config = LlamaConfig.from_json_file(config_file)
    if config.vocab_size < ByteTokenizer.vocab_size:
        raise ValueError(f"--model {args.model}: vocab_size {config.vocab_size} is smaller than the byte "
                         f"tokenizer's {ByteTokenizer.vocab_size}")
    if args.seq_len + 1 > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len}: windows of {args.seq_len + 1} tokens exceed the model's "
                         f"max_position_embeddings {config.max_position_embeddings}")
    from .train import check_out
    check_out(args.out, OUTPUTS, args.overwrite)


def build_model(base, method: str, config=None, adapter_name: str = "default"):
    """``base`` (modified in place) set up for ``method``: a LoraModel of LoraConfig ``config`` (its adapter
    named ``adapter_name``) for lora, qlora and dora, or the Llama with the right weights trainable."""
    from ..tuners.lora.model import get_lora_model
    from ..tuners.lora.qlora import quantize_model
    if method in ("lora", "dora"):
        return get_lora_model(base, config, adapter_name=adapter_name)
    if method == "qlora":
        return get_lora_model(quantize_model(base), config, adapter_name=adapter_name)
    if method == "full":
        return base.requires_grad_(True)
    untie_head(base)
    base.requires_grad_(False)
    base.lm_head.requires_grad_(True)
    return base


def untie_head(model):
    """Give a tied model its own lm_head (V, d), a copy of the embedding; the config says untied from now on."""
    from ..nn.layers import Dense
    if not model.config.tie_word_embeddings:
        return
    V, d = model.model.embed_tokens.weight.shape
    head = Dense(d, V, bias=False, dtype=model.dtype)
    head.weight.data = model.model.embed_tokens.weight.data.copy()
    model.lm_head = head
    model.config.tie_word_embeddings = False


def run(args) -> int:
    from ..training.distributed import abort_on_error, world
    comm = world() if args.distributed else None
    root = comm is None or comm.Get_rank() == 0
    check_flags(args)                              # every rank refuses the same bad flags, before any collective
    say = stage_printer("finetune", args.quiet, root)
    with abort_on_error(comm):
        summary, model = finetune(args, comm, say)
        if root:
            write_outputs(args, summary, model)
    if root:
        say(f"validation perplexity {summary['val_perplexity_before']:.3f} before, {summary['val_perplexity']:.3f} "
            f"after; wrote {', '.join(summary['files'].values())}")
    return 0


def finetune(args, comm, say) -> tuple[dict, object]:
    """Load, evaluate, adapt, train; returns (summary, the fine-tuned model)."""
    from ..models.llama import LlamaForCausalLM
    from ..training.text import Batcher, corpus_info, load_splits, windows
    splits = load_splits(CORPUS, args.seed)
    train = windows(splits.train, args.seq_len)
    val = windows(splits.validation, args.seq_len, args.eval_windows)
    base = LlamaForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    before = evaluate_loss(base, val)
    say(f"{args.model}: validation loss {before:.4f} (perplexity {math.exp(before):.3f}) on {CORPUS} code "
        f"before fine-tuning; {len(train)} training windows")
    model = build_model(base, args.method, flags_lora_config(args) if args.method in ADAPTER_METHODS else None)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    say(f"--method {args.method}: {trainable:,d} of {total:,d} parameters trainable "
        f"({100 * trainable / total:.3f}%)" + (f", {comm.Get_size()} ranks" if comm is not None else ""))
    summary = {"method": args.method, "model": args.model, "lr": args.lr, "seed": args.seed,
               "ranks": 1 if comm is None else comm.Get_size(), "trainable_params": trainable, "all_params": total,
               "val_loss_before": before, "val_perplexity_before": math.exp(before)}
    if args.method == "qlora":
        summary["val_loss_quantized_before"] = evaluate_loss(model, val)      # B = 0: the 4-bit base alone
    history = train_steps(model, Batcher(train, args.batch_size, args.seed + 1), val, steps=args.steps, lr=args.lr,
                          warmup=args.warmup, eval_every=args.eval_every, comm=comm, say=say)
    summary.update(val_loss=history["val_loss"][-1], val_perplexity=math.exp(history["val_loss"][-1]),
                   seconds_per_step=history["seconds_per_step_median"], history=history,
                   command=command_line(args, "finetune", ("model", "method", "target", "r", "alpha", "dropout",
                                                           "steps", "batch_size", "seq_len", "lr", "warmup",
                                                           "eval_every", "eval_windows", "seed", "dtype",
                                                           "distributed")),
                   corpus_info=corpus_info(args.seed))
    if args.method in ADAPTER_METHODS:
        c = model.peft_config["default"]
        summary["lora"] = {"r": c.r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
                           "target_modules": c.target_modules, "use_dora": c.use_dora}
    return summary, model


def write_outputs(args, summary: dict, model):
    """OUT/adapter (PEFT files) or OUT/model (a transformers folder), and OUT/summary.json, as one commit:
    a run killed while writing leaves the earlier run's files, its own, or files a load refuses."""
    from ..io.atomic import commit_files, one_commit
    out, name = Path(args.out), "adapter" if args.method in ADAPTER_METHODS else "model"
    summary["files"] = {name: str(out / name), "summary": str(out / "summary.json")}
    with one_commit(out, overwrite=args.overwrite):
        model.save_pretrained(out / name, overwrite=args.overwrite)
        commit_files(out, {"summary.json": (json.dumps(summary, indent=1) + "\n").encode()}, overwrite=args.overwrite)
