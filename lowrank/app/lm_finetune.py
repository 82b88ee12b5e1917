"""``lowrank lm finetune``: adapt a pretrained Llama to Python code from the standard library, or to your data.

    lowrank lm finetune --method lora --target q_proj,v_proj --r 8 --out runs/lora
    lowrank lm finetune --method full --model runs/pydoc --out runs/full
    mpiexec -n 2 lowrank lm finetune --distributed --method lora --out runs/lora

    lowrank lm finetune --model DIR --data train.jsonl --val-fraction 0.1 --save-every 50 --out runs/sft
    lowrank lm finetune --model DIR --data train.jsonl --val-fraction 0.1 --save-every 50 --out runs/sft --resume

The base is the shipped checkpoint (``lowrank.app.lm.shipped_checkpoint``) or ``--model DIR`` (a
transformers folder). Without ``--data`` the run trains on windows of the built-in stdlib code corpus
(byte tokens, so the model must cover the byte vocabulary). With ``--data FILE`` it trains on the user's
.txt or .jsonl file (``training.sft``: text, prompt/completion with loss on the completion only, or
chat messages through the model's chat template with loss on the assistant turns only), tokenized by the
model folder's tokenizer (``io.tokenizer.load_tokenizer``, checked against the embedding), each example
at most ``--max-seq-len`` tokens (default: the model's context), padded per batch with an attention mask;
documents are not packed. Validation is ``--val-data FILE`` or a ``--val-fraction`` of the examples.

``--save-every N`` writes OUT/checkpoint (``training.checkpoints``: the adapter or model, the optimizer
state, the step, the data position and the generators' states) every N steps, as one commit; ``--resume``
continues from it exactly: the final weights equal an uninterrupted run's bit for bit. Methods:

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
--out are checked, and --data read, before training (an earlier run's outputs are replaced only with
--overwrite); nothing but OUT/checkpoint is written before training ends. ``--distributed`` trains data-parallel over the
ranks of ``mpiexec`` as ``lowrank train --distributed`` does (the same global batches, each split by
``shard_bounds``; rank 0 writes and prints).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .lm import add_training_arguments, command_line, evaluate_loss, resolve, shipped_checkpoint, stage_printer, \
    train_steps

METHODS = ("lora", "qlora", "dora", "full", "head")
ADAPTER_METHODS = ("lora", "qlora", "dora")
DEFAULTS = dict(steps=200, batch_size=16, seq_len=128, warmup=20, eval_every=50, eval_windows=64,
                out="lowrank-lm-finetune")
LR = {"lora": 2e-3, "qlora": 2e-3, "dora": 2e-3, "full": 3e-4, "head": 2e-3}
CORPUS = "stdlib"
OUTPUTS = ("adapter/", "model/", "summary.json")          # what a run writes in OUT (--overwrite replaces it)
CHECKPOINT = "checkpoint"                                  # OUT/checkpoint, written every --save-every steps
LOG_EVERY = 10
# the flags a checkpoint must share with the run that resumes it (the rest change only what is printed)
RUN_SETTINGS = ("model", "method", "target", "r", "alpha", "dropout", "steps", "batch_size", "seq_len", "lr",
                "warmup", "seed", "dtype", "data", "val_data", "val_fraction", "max_seq_len")


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
    parser.add_argument("--data", default=None, help="a .txt or .jsonl file to train on (text, prompt/completion "
                        "or messages records), tokenized by the model's tokenizer (default: the stdlib corpus)")
    parser.add_argument("--val-data", default=None, help="a validation file in the same formats (with --data)")
    parser.add_argument("--val-fraction", type=float, default=None, help="the share of --data's examples held out "
                        "for validation (default 0.1 without --val-data)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="the most tokens of one example (with --data; "
                        "default the model's max_position_embeddings)")
    parser.add_argument("--log-every", type=int, default=LOG_EVERY, help=f"steps between progress lines: loss, "
                        f"tokens/s, ETA (default {LOG_EVERY})")
    parser.add_argument("--save-every", type=int, default=None, help="steps between checkpoints in OUT/checkpoint "
                        "(default: none)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
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
    """Refuse a bad method, flag, model folder, data file or --out before anything is loaded or trained;
    sets ``args.data_sets`` (train, validation examples) and ``args.tokenizer`` with --data."""
    if args.method not in METHODS:
        raise ValueError(f"unknown --method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    check_data_flags(args)
    resolve(args, {**DEFAULTS, "lr": LR[args.method]})
    args.model = str(shipped_checkpoint() if args.model is None else args.model)
    if args.method in ADAPTER_METHODS:
        flags_lora_config(args)
    config_file, config = model_config(args.model)
    args.config_file = config_file                 # what --resume and --save-every compare runs by
    if args.data is None:
        from ..io.tokenizer import ByteTokenizer
        if config.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"--model {args.model}: vocab_size {config.vocab_size} is smaller than the byte "
                             f"tokenizer's {ByteTokenizer.vocab_size}")
        if args.seq_len + 1 > config.max_position_embeddings:
            raise ValueError(f"--seq-len {args.seq_len}: windows of {args.seq_len + 1} tokens exceed the model's "
                             f"max_position_embeddings {config.max_position_embeddings}")
    else:
        load_data(args, config, config_file)
    from .train import check_out
    check_out(args.out, OUTPUTS + (() if args.resume else (CHECKPOINT + "/",)), args.overwrite)
    if args.resume:
        from ..training.checkpoints import read_trainer_state
        args.resumed = read_trainer_state(Path(args.out) / CHECKPOINT, run_settings(args, config_file))


def model_config(model: str) -> tuple:
    """(the file that holds --model's config, its LlamaConfig), checked against the tensor headers only: a
    transformers folder's config.json, or a GGUF file's metadata (``models.llama.gguf``; from_gguf checks the
    tensors' shapes before anything is allocated)."""
    from ..models.llama.checkpoint import check_claims, read_shapes
    from ..models.llama.configuration import LlamaConfig
    if model.endswith(".gguf"):
        from ..models.llama.gguf import load_config
        if not Path(model).is_file():
            raise ValueError(f"--model {model}: no such GGUF file")
        return Path(model), load_config(model)
    config_file = Path(model) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"--model {model}: no config.json there (expected a folder written by "
                         f"save_pretrained or lowrank lm pretrain, or a .gguf file)")
    config = LlamaConfig.from_json_file(config_file)
    check_claims(config_file, config, read_shapes(model))           # the tensor headers only: nothing allocated
    return config_file, config


def check_data_flags(args):
    """The flags that go with --data (and only with it), and the checkpoint flags."""
    if args.data is None:
        given = [f for f in ("val_data", "val_fraction", "max_seq_len") if getattr(args, f) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} goes with --data")
    else:
        if args.seq_len is not None:
            raise ValueError("--seq-len cuts the built-in corpus; with --data use --max-seq-len")
        if args.val_data is not None and args.val_fraction is not None:
            raise ValueError("give --val-data or --val-fraction, not both")
        if args.distributed:
            raise ValueError("--distributed trains on the built-in corpus only; drop --data or --distributed")
    for name in ("log_every", "save_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.distributed and (args.save_every is not None or args.resume):
        raise ValueError("--save-every and --resume run in one process; drop --distributed")


def load_data(args, config, config_file: Path):
    """The model's tokenizer (checked against its embedding) and --data's examples, split for validation."""
    from ..io.tokenizer import check_vocab, load_tokenizer
    from ..training.sft import load_examples, split_validation
    limit = None
    if args.max_seq_len is None:
        args.max_seq_len = config.max_position_embeddings
        limit = f"the model's context ({config_file}: max_position_embeddings {args.max_seq_len})"
    if args.max_seq_len > config.max_position_embeddings:
        raise ValueError(f"--max-seq-len {args.max_seq_len} exceeds {config_file}'s max_position_embeddings "
                         f"{config.max_position_embeddings}")
    args.tokenizer = load_tokenizer(args.model)
    check_vocab(args.tokenizer, config.vocab_size, str(config_file))
    train = load_examples(args.data, args.tokenizer, args.max_seq_len, limit)
    if args.val_data is not None:
        val = load_examples(args.val_data, args.tokenizer, args.max_seq_len, limit)
    else:
        args.val_fraction = 0.1 if args.val_fraction is None else args.val_fraction
        train, val = split_validation(train, args.val_fraction, args.seed)
    if len(train) < args.batch_size:
        raise ValueError(f"{args.data}: {len(train)} training examples (validation held out) can't fill a "
                         f"--batch-size of {args.batch_size}")
    args.data_sets = train, val


def run_settings(args, config_file: Path) -> dict:
    """The flags a checkpoint must share with the run resuming it, with the digests of the model's config
    and the data files (another base, or other data, is another run)."""
    import hashlib
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    settings.update({k: str(Path(settings[k]).resolve()) for k in ("model", "data", "val_data") if settings[k]})
    files = {"data": args.data, "val_data": args.val_data}
    if config_file.suffix == ".gguf":            # the config it holds (hashing a whole GGUF would read gigabytes)
        from ..models.llama.gguf import load_config
        settings["config of the GGUF"] = load_config(config_file).to_dict()
    else:
        files["config.json"] = config_file
    settings.update({f"sha256 of {k}": hashlib.sha256(Path(v).read_bytes()).hexdigest()
                     for k, v in files.items() if v is not None})
    return settings


def build_model(base, method: str, config=None, adapter_name: str = "default"):
    """``base`` (modified in place) set up for ``method``: a LoraModel of LoraConfig ``config`` (its adapter
    named ``adapter_name``) for lora, qlora and dora, or the Llama with the right weights trainable. qlora on a
    base read from a GGUF keeps the file's quantized matrices as their blocks (``keep_gguf_blocks``), else NF4."""
    from ..models.llama.gguf import keep_gguf_blocks
    from ..tuners.lora.model import get_lora_model
    from ..tuners.lora.qlora import quantize_model
    if method in ("lora", "dora"):
        return get_lora_model(base, config, adapter_name=adapter_name)
    if method == "qlora" and getattr(base, "gguf_path", None) is not None:
        keep_gguf_blocks(base, base.gguf_path)
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
    """Load, evaluate, adapt, train (from OUT/checkpoint with --resume); returns (summary, the fine-tuned model)."""
    from ..models.llama import LlamaForCausalLM
    from ..nn.optim import Adam
    train, val, batcher, data_info = training_data(args)
    base = LlamaForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    before = evaluate_loss(base, val)
    say(f"{args.model}: validation loss {before:.4f} (perplexity {math.exp(before):.3f}) on {data_info['name']} "
        f"before fine-tuning; {len(train)} training {data_info['unit']}")
    model = build_model(base, args.method, flags_lora_config(args) if args.method in ADAPTER_METHODS else None)
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    say(f"--method {args.method}: {trainable:,d} of {total:,d} parameters trainable "
        f"({100 * trainable / total:.3f}%)" + (f", {comm.Get_size()} ranks" if comm is not None else ""))
    summary = {"method": args.method, "model": args.model, "lr": args.lr, "seed": args.seed,
               "ranks": 1 if comm is None else comm.Get_size(), "trainable_params": trainable, "all_params": total,
               "val_loss_before": before, "val_perplexity_before": math.exp(before)}
    if args.method == "qlora":
        summary["val_loss_quantized_before"] = evaluate_loss(model, val)      # B = 0: the 4-bit base alone
    optimizer = Adam(model.parameters(trainable_only=True), lr=args.lr)
    start, on_step = checkpointing(args, model, optimizer, batcher, say)
    history = train_steps(model, batcher, val, steps=args.steps, lr=args.lr, warmup=args.warmup,
                          eval_every=args.eval_every, comm=comm, say=say, optimizer=optimizer, start=start,
                          on_step=on_step, log_every=args.log_every)
    summary.update(val_loss=history["val_loss"][-1], val_perplexity=math.exp(history["val_loss"][-1]),
                   seconds_per_step=history["seconds_per_step_median"], history=history, resumed_from_step=start,
                   command=command_line(args, "finetune", ("model", "data", "val_data", "val_fraction", "max_seq_len",
                                                           "method", "target", "r", "alpha", "dropout",
                                                           "steps", "batch_size", "seq_len", "lr", "warmup",
                                                           "eval_every", "eval_windows", "save_every", "seed",
                                                           "dtype", "gradient_checkpointing", "distributed")),
                   **{"corpus_info" if args.data is None else "data_info": data_info["info"]})
    if args.method in ADAPTER_METHODS:
        c = model.peft_config["default"]
        summary["lora"] = {"r": c.r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
                           "target_modules": c.target_modules, "use_dora": c.use_dora}
    return summary, model


def training_data(args) -> tuple:
    """(train, validation, batcher, info): the stdlib corpus's windows, or --data's examples (padded batches)."""
    if args.data is None:
        from ..training.text import Batcher, corpus_info, load_splits, windows
        splits = load_splits(CORPUS, args.seed)
        train = windows(splits.train, args.seq_len)
        val = windows(splits.validation, args.seq_len, args.eval_windows)
        info = {"name": f"{CORPUS} code", "unit": "windows", "info": corpus_info(args.seed)}
        return train, val, Batcher(train, args.batch_size, args.seed + 1), info
    from ..training.sft import ExampleBatcher, batches
    train, val = args.data_sets
    tok = args.tokenizer
    pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    if len(val) > args.eval_windows:                                   # evenly spaced, as the corpus's windows
        val = [val[round(i)] for i in np.linspace(0, len(val) - 1, args.eval_windows)]
    info = {"name": args.data, "unit": "examples",
            "info": {"train_examples": len(train), "val_examples": len(val), "max_seq_len": args.max_seq_len,
                     "train_tokens": int(sum(len(e.input_ids) for e in train))}}
    return (train, batches(val, args.batch_size, pad_id), ExampleBatcher(train, args.batch_size, args.seed + 1, pad_id),
            info)


def checkpointing(args, model, optimizer, batcher, say) -> tuple:
    """(the step to start after, ``on_step``): OUT/checkpoint restored with --resume, and saved every
    --save-every steps (not after the last: the run's outputs follow it)."""
    from ..training.checkpoints import load_checkpoint, save_checkpoint
    folder, start = Path(args.out) / CHECKPOINT, 0
    if getattr(args, "resumed", None) is not None:
        start = load_checkpoint(folder, model, optimizer, batcher, args.resumed)
        say(f"resumed from {folder} after step {start}")
    if args.save_every is None:
        return start, None
    settings = run_settings(args, args.config_file)
    name = "adapter" if args.method in ADAPTER_METHODS else "model"

    def on_step(i, optimizer):
        if i % args.save_every == 0 and i < args.steps:
            save_checkpoint(folder, model, optimizer, batcher, i, settings, name)
            say(f"step {i}: checkpoint saved in {folder}")
    return start, on_step


def write_outputs(args, summary: dict, model):
    """OUT/adapter (PEFT files) or OUT/model (a transformers folder), and OUT/summary.json, as one commit:
    a run killed while writing leaves the earlier run's files, its own, or files a load refuses."""
    from ..io.atomic import commit_files, one_commit
    out, name = Path(args.out), "adapter" if args.method in ADAPTER_METHODS else "model"
    summary["files"] = {name: str(out / name), "summary": str(out / "summary.json")}
    with one_commit(out, overwrite=args.overwrite):
        model.save_pretrained(out / name, overwrite=args.overwrite)
        commit_files(out, {"summary.json": (json.dumps(summary, indent=1) + "\n").encode()}, overwrite=args.overwrite)
