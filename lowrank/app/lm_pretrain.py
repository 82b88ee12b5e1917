"""``lowrank lm pretrain``: a byte-level Llama trained from scratch on pydoc's English.

    lowrank lm pretrain --out runs/pydoc                 the shipped checkpoint's recipe (minutes on 2 cores)
    lowrank lm pretrain --quick --out runs/quick         a tiny model in seconds (tests, CI)

The corpus is ``pydoc_data.topics`` split by document (``lowrank.training.text``); the tokenizer is
``ByteTokenizer`` (vocab 259). Adam with warm-up and cosine decay on ``CausalLMLoss``; a stage line
per ``--eval-every`` steps with the validation loss, perplexity and seconds per step.

OUT holds a transformers folder: ``config.json`` + ``model.safetensors`` (``--save-dtype``, bfloat16
by default: half the bytes; lowrank and transformers upcast it on loading), whose metadata records
the command, seed, Python version and commit, and ``training_args.json`` with the same plus the corpus
sizes, the history and the final validation loss; the three are committed as one, and the tensors
record the other two files' hashes, so a folder mixing two runs is refused at load. --out is checked
before training: an earlier checkpoint there is replaced only with --overwrite. The untied head
(``tie_word_embeddings`` false) lets ``lowrank lm finetune --method head`` train the head alone.
"""
from __future__ import annotations

import json
import math

from .lm import add_training_arguments, command_line, provenance, resolve, stage_printer, train_steps

FULL = dict(layers=4, hidden=128, heads=4, intermediate=384, steps=1000, batch_size=16, seq_len=128, lr=3e-3,
            warmup=50, eval_every=100, eval_windows=64, out="lowrank-lm-pretrain")
QUICK = dict(FULL, layers=2, hidden=64, heads=4, intermediate=128, steps=300, batch_size=8, seq_len=64, lr=5e-3,
             warmup=20, eval_every=100, eval_windows=32)
ARCH_FLAGS = ("layers", "hidden", "heads", "intermediate")
MAX_POSITIONS = 256                 # the context the checkpoint accepts (windows are T + 1 <= 256 tokens)
CORPUS = "pydoc"
OUTPUTS = ("config.json", "model.safetensors", "training_args.json")     # --overwrite replaces them


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="a tiny model and few steps (seconds; for tests)")
    parser.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {FULL['layers']})")
    parser.add_argument("--hidden", type=int, default=None, help=f"d, the residual width (default {FULL['hidden']})")
    parser.add_argument("--heads", type=int, default=None, help=f"attention heads (default {FULL['heads']})")
    parser.add_argument("--intermediate", type=int, default=None, help=f"SwiGLU width (default {FULL['intermediate']})")
    parser.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="dtype of the tensors in model.safetensors (default bfloat16)")
    add_training_arguments(parser, FULL)
    parser.add_argument("--overwrite", action="store_true", help="replace the checkpoint of an earlier run in --out")


def check_flags(args):
    """Every size and setting resolved and checked before anything is trained."""
    preset = QUICK if args.quick else FULL
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    resolve(args, preset, ARCH_FLAGS)
    resolve(args, preset)
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        raise ValueError(f"--hidden {args.hidden} must split into --heads {args.heads} heads of an even width "
                         f"(RoPE rotates pairs)")
    if args.seq_len + 1 > MAX_POSITIONS:
        raise ValueError(f"--seq-len must be at most {MAX_POSITIONS - 1} (windows of T + 1 tokens), got {args.seq_len}")
    from .train import check_out
    check_out(args.out, OUTPUTS, args.overwrite)


def build_model(args):
    """A fresh LlamaForCausalLM of the flags' size over the byte vocabulary."""
    from ..models.llama import LlamaConfig, LlamaForCausalLM
    from ..io.tokenizer import ByteTokenizer
    config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config, dtype=args.dtype, seed=args.seed)


def run(args) -> int:
    check_flags(args)
    from ..training.text import Batcher, corpus_info, load_splits, windows
    say = stage_printer("pretrain", args.quiet)
    splits = load_splits(CORPUS, args.seed)
    train = windows(splits.train, args.seq_len)
    val = windows(splits.validation, args.seq_len, args.eval_windows)
    model = build_model(args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    say(f"{args.layers} layers, d={args.hidden}, {args.heads} heads, {model.num_parameters():,d} parameters; "
        f"{len(train)} training windows of {args.seq_len + 1} tokens, {len(val)} validation windows")
    history = train_steps(model, Batcher(train, args.batch_size, args.seed), val, steps=args.steps, lr=args.lr,
                          warmup=args.warmup, eval_every=args.eval_every, say=say)
    record = {"command": command_line(args, "pretrain", ("quick", *ARCH_FLAGS, "steps", "batch_size", "seq_len", "lr",
                                                         "warmup", "eval_every", "eval_windows", "seed", "dtype",
                                                         "gradient_checkpointing", "save_dtype")),
              "seed": args.seed, **provenance(), "corpus": CORPUS, "corpus_info": corpus_info(args.seed),
              "val_loss": history["val_loss"][-1], "val_perplexity": math.exp(history["val_loss"][-1]),
              "parameters": model.num_parameters(), "history": history}
    write_checkpoint(model, args.out, args.save_dtype, record, overwrite=args.overwrite)
    say(f"validation perplexity {record['val_perplexity']:.3f}; wrote {args.out}")
    return 0


def write_checkpoint(model, folder, dtype: str, record: dict, overwrite: bool = False):
    """config.json + model.safetensors (``dtype``, the provenance in its metadata; bound to the other
    files) + training_args.json + byte_tokenizer.json (the folder's model reads bytes), all or nothing."""
    from ..io.tokenizer import BYTE_TOKENIZER_FILE
    from .lm import shipped_checkpoint
    metadata = {f"lowrank.{k}": str(record[k]) for k in ("command", "seed", "python", "commit")}
    model.save_pretrained(folder, overwrite=overwrite, dtype=dtype, metadata=metadata,
                          extra_files={"training_args.json": (json.dumps(record, indent=1) + "\n").encode(),
                                       BYTE_TOKENIZER_FILE: (shipped_checkpoint() / BYTE_TOKENIZER_FILE).read_bytes()})
