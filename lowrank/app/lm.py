"""``lowrank lm``: a small Llama on text every Python ships, pretrained once and fine-tuned to code.

    lowrank lm pretrain --out DIR                      a byte-level decoder on pydoc's English (lm_pretrain)
    lowrank lm finetune --method lora --r 8 --out DIR  the shipped checkpoint adapted to stdlib code (lm_finetune)
    mpiexec -n 2 lowrank lm finetune --distributed ...  the same, data-parallel over the ranks

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``, listed in
SUBCOMMANDS (pretrain, finetune, demo). What the subcommands share lives here: the training loop
over step-numbered global batches (one process, or ``DataParallel`` over MPI, as ``lowrank train``),
the validation loss, the stage lines, and the provenance recorded beside a checkpoint.

The shipped checkpoint, ``lowrank/models/checkpoints/pydoc-byte-4x128/``, is what
``lowrank lm pretrain`` wrote with its defaults; its ``training_args.json`` holds the command.
"""
from __future__ import annotations

import math
import subprocess
import sys
import time
from contextlib import nullcontext
from importlib import import_module
from pathlib import Path

import numpy as np

SUBCOMMANDS = {
    "pretrain": ("lowrank.app.lm_pretrain", "train a small byte-level Llama from scratch on pydoc's English"),
    "finetune": ("lowrank.app.lm_finetune", "fine-tune a checkpoint on stdlib code or your --data: lora, qlora, dora, full, head"),
    "demo": ("lowrank.app.lm_demo", "the language-model report: methods, ranks, Table 5, spectra, samples"),
}
SHIPPED = "pydoc-byte-4x128"


def shipped_checkpoint() -> Path:
    """The folder of the checkpoint shipped in the package (config.json + model.safetensors)."""
    from .. import models
    return Path(models.__file__).parent / "checkpoints" / SHIPPED


def add_arguments(parser):
    sub = parser.add_subparsers(dest="lm_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_lm_module=module)
        import_module(module).add_arguments(p)


def run(args) -> int:
    with limit_threads(args.threads):
        return import_module(args._lm_module).run(args)


# -- flags shared by the subcommands -------------------------------------------------------
def add_training_arguments(parser, defaults: dict):
    """--steps --batch-size --seq-len --lr --warmup --eval-every --eval-windows --seed --dtype
    --gradient-checkpointing --threads --out --quiet."""
    d = defaults
    parser.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d['steps']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"global windows per step (default {d['batch_size']})")
    parser.add_argument("--seq-len", type=int, default=None, help=f"T, tokens predicted per window (default {d['seq_len']})")
    parser.add_argument("--lr", type=float, default=None, help=f"peak Adam learning rate (default {d['lr']})")
    parser.add_argument("--warmup", type=int, default=None, help="linear warm-up steps, then cosine decay to 10%% "
                        f"(default {d['warmup']})")
    parser.add_argument("--eval-every", type=int, default=None, help=f"steps between validation stage lines "
                        f"(default {d['eval_every']})")
    parser.add_argument("--eval-windows", type=int, default=None, help=f"validation windows, evenly spaced over the "
                        f"split (default {d['eval_windows']})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits, the init and the batch order (default 0)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="keep only each decoder layer's "
                        "input and redo its forward during backward: less memory, one more forward's time")
    parser.add_argument("--threads", type=int, default=None, help="BLAS and kernel threads (default: all cores; 1 is "
                        "much faster on a machine other jobs load)")
    parser.add_argument("--out", default=d["out"], help=f"output directory (default {d['out']})")
    parser.add_argument("--quiet", action="store_true", help="print nothing (files are still written)")


TRAINING_FLAGS = ("steps", "batch_size", "seq_len", "lr", "warmup", "eval_every", "eval_windows")


def limit_threads(threads: int | None):
    """A context limiting the kernels' thread pools (BLAS, Numba's) to ``threads``; no limit when None."""
    if threads is None:
        return nullcontext()
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    from ..kernels.numba_cpu import pool
    return pool.limit(threads)


def resolve(args, defaults: dict, names=TRAINING_FLAGS):
    """Fill the flags left at None from ``defaults``; refuse zeros, negatives and non-finite numbers."""
    for name in names:
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        low = 0 if name == "warmup" else 1
        if name == "lr":
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{flag} must be a finite number > 0, got {value}")
        elif value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")


def command_line(args, subcommand: str, names) -> str:
    """The command that repeats this run: every setting spelled out."""
    parts = [f"lowrank lm {subcommand}"]
    for name in names:
        value = getattr(args, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts += [flag] if value else []
        elif value is not None:
            parts.append(f"{flag} {value}")
    return " ".join(parts)


def provenance() -> dict:
    """The Python version and the lowrank commit (``-dirty`` with uncommitted changes; 'unknown' outside git)."""
    root = Path(__file__).resolve().parents[2]

    def git(*cmd):
        return subprocess.run(["git", "-C", str(root), *cmd], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or "unknown"
        if commit != "unknown" and git("status", "--porcelain", "--untracked-files=no"):
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"python": sys.version.split()[0], "commit": commit}


# -- training and evaluation ------------------------------------------------------------------
def evaluate_loss(model, windows, batch_size: int = 16) -> float:
    """Mean next-token loss (nats per token) of ``model`` over ``windows`` (n, T+1), in eval mode; or over
    a list of padded ``training.sft.Batch`` es, each weighted by the tokens it predicts. The loss comes from
    the model's ``labels`` path: no (B, T, V) logits."""
    from ..training.sft import IGNORE_INDEX
    model.eval()
    total = 0.0
    if isinstance(windows, list):
        counted = [int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in windows]
        for b, n in zip(windows, counted):
            total += model.forward(b.input_ids, attention_mask=b.attention_mask, labels=b.labels) * n
        return total / sum(counted)
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        total += model.forward(batch, labels=batch) * len(batch)                # every window counts T tokens
    return total / len(windows)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to 0.1 at ``steps``."""
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_steps(model, batcher, val_windows, *, steps: int, lr: float, warmup: int, eval_every: int,
                comm=None, say=None, optimizer=None, start: int = 0, on_step=None, log_every=None) -> dict:
    """``steps`` Adam steps on ``batcher``'s global batches (B, T+1), each window its own labels, or padded
    ``training.sft.Batch`` es (ids, labels, attention mask); the validation loss (``evaluate_loss`` of
    ``val_windows``) every ``eval_every`` steps and at the end, and a progress line (loss, tokens/s, ETA)
    every ``log_every``. With ``comm``, data-parallel: each rank takes its ``shard_bounds`` rows of every
    global batch and ``DataParallel.step`` all-reduces the gradients. A resumed run passes its restored
    ``optimizer`` and the ``start`` step it stopped after; ``on_step(i, optimizer)`` runs after step i.
    Returns the history: steps, mean training loss since the last stage, validation loss, seconds per step."""
    from ..nn.optim import Adam
    if optimizer is None:
        optimizer = Adam(model.parameters(trainable_only=True), lr=lr)
    if comm is None:
        def step(batch):
            if not isinstance(batch, np.ndarray):
                return lm_step(model, optimizer, batch.input_ids, batch.labels, batch.attention_mask)
            return lm_step(model, optimizer, batch, batch)
    else:
        from ..nn.losses_lm import CausalLMLoss
        from ..training.distributed import DataParallel, shard_bounds
        dp = DataParallel(model, optimizer, CausalLMLoss(), comm)
        dp.broadcast_parameters()                        # every rank starts from rank 0's numbers

        def step(batch):
            lo, hi = shard_bounds(len(batch), dp.rank, dp.size)
            return dp.step(batch[lo:hi], batch[lo:hi], len(batch))
    history = {"step": [], "train_loss": [], "val_loss": [], "seconds_per_step": []}
    losses, seconds, tokens, started_all = [], [], 0, time.perf_counter()
    for i in range(start + 1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(i, steps, warmup)
        model.train()
        batch = batcher.next()
        started = time.perf_counter()
        loss = step(batch)
        seconds.append(time.perf_counter() - started)
        if not math.isfinite(loss):
            raise ValueError(f"training diverged at step {i}: loss {loss}; try a lower --lr")
        losses.append(loss)
        tokens += batch.size if isinstance(batch, np.ndarray) else int(batch.attention_mask.sum())
        elapsed = time.perf_counter() - started_all
        speed = f"{tokens / elapsed:,.0f} tok/s  ETA {elapsed / (i - start) * (steps - i):.0f} s"
        if on_step is not None:
            on_step(i, optimizer)
        if i % eval_every == 0 or i == steps:
            history["step"].append(i)
            history["train_loss"].append(float(np.mean(losses)))
            history["val_loss"].append(evaluate_loss(model, val_windows))
            history["seconds_per_step"].append(float(np.median(seconds)))
            losses = []
            if say is not None:
                say(f"step {i}/{steps}  train loss {history['train_loss'][-1]:.4f}  val loss "
                    f"{history['val_loss'][-1]:.4f}  ppl {math.exp(history['val_loss'][-1]):.3f}  "
                    f"{history['seconds_per_step'][-1]:.3f} s/step  {speed}")
        elif log_every and i % log_every == 0 and say is not None:
            say(f"step {i}/{steps}  loss {loss:.4f}  {speed}")
    history["seconds_per_step_median"] = float(np.median(seconds))
    model.eval()
    return history


def lm_step(model, optimizer, input_ids, labels, attention_mask=None) -> float:
    """One Adam step from the model's ``labels`` path (the head and the loss fused: no (B, T, V) logits);
    −100 labels and padding are skipped. Returns the mean loss."""
    optimizer.zero_grad()
    loss = model.forward(input_ids, attention_mask=attention_mask, labels=labels)
    model.backward()
    optimizer.step()
    return loss


def stage_printer(command: str, quiet: bool, root: bool = True):
    """``say(text)``: one timed stage line on stdout (``lowrank lm pretrain [  12.3 s] ...``), or nothing."""
    started = time.perf_counter()

    def say(text):
        if root and not quiet:
            print(f"lowrank lm {command} [{time.perf_counter() - started:7.1f} s] {text}", flush=True)
    return say
