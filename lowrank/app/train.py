"""``lowrank train``: fine-tune one method on a toy task, on one process or data-parallel over
the ranks of ``mpiexec`` (``--distributed``, lowrank.training.distributed), with the same flags.

    lowrank train --method lora --r 8 --out runs/lora
    mpiexec -n 4 lowrank train --distributed --method lora --r 8 --out runs/lora

The base is pretrained here (``lowrank.app.experiment.pretrain``; over the ranks when distributed)
and saved as ``OUT/base.safetensors``, or read from ``--base FILE`` (``lowrank.io.model_files``).
The downstream task is derived from the base's task, the model is fine-tuned by ``--method``,
and a summary (test accuracy, trainable parameters, seconds per epoch; ranks and bytes
all-reduced per step when distributed) is printed and written to ``OUT/summary.json``; LoRA
also writes its adapter as PEFT files to ``OUT/adapter``. Only rank 0 prints or writes.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..training.data import make_task
from .experiment import (METHODS, DemoConfig, downstream, finetune, prepare, pretrain, task_spec,
                         test_accuracy)
from ..nn.layers import MLP, Dense
from ..tuners.lora.config import LoraConfig
from ..nn.losses import BCEWithLogitsLoss
from ..nn.optim import Adam
from ..nn.nf4_dense import NF4Dense


LORA_METHODS = ("lora", "qlora")       # these write OUT/adapter (PEFT's files)


def _ints(text: str) -> tuple:
    """'200,2000,200' -> (200, 2000, 200)."""
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--hidden must be comma-separated integers such as 200,2000,200, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--hidden widths must be >= 1, got {text!r}")
    return sizes


def add_arguments(parser):
    d = DemoConfig()
    parser.add_argument("--dataset", default=d.dataset, help="moons | circles | xor | spirals (default moons)")
    parser.add_argument("--n-features", type=int, default=None, help=f"input width (default {d.n_features}, "
                        "or the --base model's)")
    parser.add_argument("--n-samples", type=int, default=d.n_samples, help=f"rows of each task (default {d.n_samples})")
    parser.add_argument("--hidden", default=",".join(map(str, d.hidden)), help="hidden widths (default 200,2000,200)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    parser.add_argument("--method", choices=METHODS, default="lora")
    parser.add_argument("--r", type=int, default=d.r, help=f"LoRA rank (default {d.r})")
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2r: scaling 2)")
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout (default 0)")
    parser.add_argument("--target-modules", default=None,
                        help="comma-separated layer names or 'all-linear' (default: every hidden Dense layer)")
    parser.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    parser.add_argument("--epochs", type=int, default=d.finetune_epochs, help="fine-tuning epochs")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="global minibatch rows")
    parser.add_argument("--lr", type=float, default=None, help=f"default {d.lr} for full, {d.peft_lr} otherwise")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--base", default=None, help="a base model file written by lowrank.io.model_files.save_model")
    parser.add_argument("--out", default="lowrank-train", help="output directory (default lowrank-train)")
    parser.add_argument("--quiet", action="store_true", help="print nothing (files are still written)")
    parser.add_argument("--distributed", action="store_true", help="data-parallel over the ranks of mpiexec")


def check_flags(args):
    """Refuse bad flags before anything is trained (a zero is an error, never "the default")."""
    for flag in ("n_features", "n_samples", "pretrain_epochs", "epochs", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.method in LORA_METHODS:                  # LoraConfig's own rules for --r, --alpha, --dropout
        LoraConfig(r=args.r, lora_alpha=2 * args.r if args.alpha is None else args.alpha, lora_dropout=args.dropout)
    check_out(args.out)


def check_out(out, outputs=(), overwrite: bool = True):
    """--out must be a directory or creatable as one: not a file, not under a file, writable. ``outputs``
    names what the run writes in it ("adapter/" a folder, "summary.json" a file): one already there must be
    of that kind and writable, and is refused unless ``overwrite`` (--overwrite)."""
    path = Path(out)
    existing = next(p for p in (path, *path.parents) if p.exists())     # "." exists at worst
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, a file"
        raise ValueError(f"--out {out} {where}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")
    for name in outputs:
        target, folder = path / name.rstrip("/"), name.endswith("/")
        if not (target.exists() or target.is_symlink()):
            continue
        if not overwrite:
            raise ValueError(f"--out {out} holds {target} from an earlier run; pass --overwrite to replace it")
        if folder != target.is_dir():
            raise ValueError(f"--out {out}: {target} is {'a file' if folder else 'a folder'}; the run writes a "
                             f"{'folder' if folder else 'file'} there")
        if folder and not os.access(target, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out}: {target} is not writable")


def config_from(args, n_features: int | None = None, dtype: str | None = None) -> DemoConfig:
    """The DemoConfig the flags describe (input width and dtype from the base model when given)."""
    if n_features is not None and args.n_features not in (None, n_features):
        raise ValueError(f"--n-features {args.n_features} does not match the --base model's input width {n_features}")
    if n_features is None:
        n_features = DemoConfig.n_features if args.n_features is None else args.n_features
    return DemoConfig(dataset=args.dataset, n_features=n_features,
                      hidden=_ints(args.hidden), n_samples=args.n_samples, pretrain_epochs=args.pretrain_epochs,
                      finetune_epochs=args.epochs, batch_size=args.batch_size, r=args.r, seed=args.seed,
                      dtype=args.dtype if dtype is None else dtype)


def _base(args, comm):
    """(base model, its task, config): loaded from --base, or pretrained (over the ranks when distributed)."""
    if args.base:
        from ..io.model_files import load_model
        base = load_model(args.base)
        first = _first_layer(base, args.base)           # a Dense or a 4-bit NF4Dense
        dtype = first.weight.dtype if isinstance(first, Dense) else first.dtype
        cfg = config_from(args, n_features=first.in_features, dtype=str(dtype))
        return base, make_task(task_spec(cfg)), cfg
    cfg = config_from(args)
    if comm is None:
        base, ds, _ = pretrain(cfg)
        return base, ds, cfg
    ds = make_task(task_spec(cfg))
    base = MLP(cfg.sizes, dtype=cfg.dtype, seed=cfg.seed)
    _data_parallel(base, Adam(base.parameters(), lr=cfg.lr), comm).fit(
        ds.X_train, ds.y_train, epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size, seed=cfg.seed)
    return base, ds, cfg


def _first_layer(base, path):
    """The first Dense or NF4Dense layer: its input width is the model's."""
    for _, m in base.named_modules():
        if isinstance(m, (Dense, NF4Dense)):
            return m
    raise ValueError(f"--base {path}: the model has no Dense or NF4Dense layer to take its input width from")


def _nf4_layers(model) -> list[str]:
    """Names of the 4-bit (NF4Dense) layers of a base model."""
    return [n for n, m in model.named_modules() if isinstance(m, NF4Dense)]


def _data_parallel(model, optimizer, comm):
    from ..training.distributed import DataParallel
    dp = DataParallel(model, optimizer, BCEWithLogitsLoss(), comm)
    dp.broadcast_parameters()                        # every rank starts from rank 0's numbers
    return dp


def build_model(args, base, cfg: DemoConfig):
    """A copy of ``base`` set up for ``args.method`` (LoRA and QLoRA with the --r/--alpha/--dropout/
    --target-modules flags)."""
    nf4 = _nf4_layers(base)
    if nf4 and args.method not in (*LORA_METHODS, "head"):
        raise ValueError(f"--method {args.method} trains float weights, but --base {args.base} holds 4-bit NF4 "
                         f"layers {nf4}; use --method lora, qlora or head")
    if args.method not in LORA_METHODS:
        return prepare(args.method, base, cfg)
    overrides = {"lora_alpha": 2 * args.r if args.alpha is None else args.alpha, "lora_dropout": args.dropout}
    if args.target_modules:
        t = args.target_modules
        overrides["target_modules"] = t if t == "all-linear" else t.split(",")
    elif nf4:                                        # a 4-bit base: LoRA on its 4-bit layers is QLoRA
        overrides["target_modules"] = nf4
    return prepare(args.method, base, cfg, args.r, **overrides)


def run(args) -> int:
    from ..training.distributed import abort_on_error, world
    comm = world() if args.distributed else None
    root = comm is None or comm.Get_rank() == 0
    check_flags(args)
    with abort_on_error(comm):
        summary, model, base = train(args, comm)
        if root:
            write_outputs(args, summary, model, base if args.base is None else None)
    if root and not args.quiet:
        print(format_summary(summary))
    return 0


def train(args, comm) -> tuple[dict, object, object]:
    """Base, downstream task, fine-tuning; returns (summary, the fine-tuned model, the base)."""
    started = time.perf_counter()
    base, ds_pre, cfg = _base(args, comm)
    ds = downstream(cfg, ds_pre)
    model = build_model(args, base, cfg)
    if args.lr is not None:
        lr = args.lr
    else:
        lr = cfg.lr if args.method == "full" else cfg.peft_lr
    summary = {"method": args.method, "config": cfg.to_dict(), "lr": lr, "base_file": args.base,
               "base_test_acc": test_accuracy(base, ds), "ranks": 1}
    if comm is None:
        history = finetune(model, ds, cfg, lr=lr)
    else:
        dp = _data_parallel(model, Adam(model.parameters(trainable_only=True), lr=lr), comm)
        history = dp.fit(ds.X_train, ds.y_train, X_val=ds.X_val, y_val=ds.y_val, epochs=cfg.finetune_epochs,
                         batch_size=cfg.batch_size, seed=cfg.seed + 1)
        summary.update(ranks=dp.size, allreduce_bytes_per_step=dp.stats.allreduce_bytes // dp.stats.steps,
                       comm=dp.stats.to_dict(), in_sync=dp.in_sync())
    trainable, total = model.num_parameters(trainable_only=True), model.num_parameters()
    summary.update(test_acc=test_accuracy(model, ds), trainable_params=trainable, all_params=total,
                   seconds_per_epoch=history.seconds_per_epoch, val_acc=history.val_acc,
                   train_loss=history.train_loss, seconds=time.perf_counter() - started)
    if args.method in LORA_METHODS:
        summary["lora"] = {"r": args.r, "lora_alpha": model.peft_config["default"].lora_alpha,
                           "lora_dropout": args.dropout, "target_modules": model.peft_config["default"].target_modules}
    return summary, model, base


def write_outputs(args, summary: dict, model, base=None):
    """OUT/summary.json, OUT/base.safetensors (``base``, when pretrained here), OUT/adapter/ (LoRA)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = {"summary": str(out / "summary.json")}
    if base is not None:
        from ..io.model_files import save_model
        save_model(base, out / "base.safetensors", overwrite=True)
        files["base"] = str(out / "base.safetensors")
    if args.method in LORA_METHODS:
        model.save_pretrained(out / "adapter", overwrite=True)
        files["adapter"] = str(out / "adapter")
    summary["files"] = files
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def format_summary(s: dict) -> str:
    """A few lines for the terminal."""
    extra = f" (r={s['lora']['r']}, alpha={s['lora']['lora_alpha']:g})" if "lora" in s else ""
    lines = [f"lowrank train: {s['method']}{extra} on {s['config']['dataset']}, {s['ranks']} rank(s)",
             f"  test accuracy  {s['test_acc']:.4f}  (base model {s['base_test_acc']:.4f})",
             f"  trainable      {s['trainable_params']:,d} of {s['all_params']:,d} params "
             f"({100 * s['trainable_params'] / s['all_params']:.2f}%)",
             f"  time           {s['seconds_per_epoch']:.3f} s/epoch"]
    if "comm" in s:
        c = s["comm"]
        lines.append(f"  all-reduce     {s['allreduce_bytes_per_step']:,d} bytes/step, "
                     f"{c['comm_seconds']:.3f} s in communication vs {c['compute_seconds']:.3f} s compute")
    lines.append(f"  files          {', '.join(s['files'].values())}")
    return "\n".join(lines)
