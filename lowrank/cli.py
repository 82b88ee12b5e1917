"""The ``lowrank`` command. Each subcommand lives in its own module, which defines
``add_arguments(parser)`` and ``run(args) -> int`` (heavy imports such as matplotlib happen
inside ``run``, so building the parser stays cheap).
"""
from __future__ import annotations

import argparse
import signal
import sys
from importlib import import_module

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("lowrank.demo", "pretrain an MLP, fine-tune it every way, write lowrank-out/report.md"),
    "train": ("lowrank.train_cli", "fine-tune one method (full, head, adapter, lora, qlora) on a toy task; --distributed under mpiexec"),
    "inspect": ("lowrank.inspect_cli", "show what an adapter directory or a model file holds"),
    "analyze": ("lowrank.analysis.report", "SVD, ranks of ΔW, subspace similarity, intrinsic dimension d90"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank", description="LoRA from scratch: demo, training, files, analysis")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        import_module(module).add_arguments(p)
    return parser


def main(argv=None) -> int:
    if hasattr(signal, "SIGPIPE") and argv is None:     # `lowrank inspect ... | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        return int(import_module(args._module).run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"lowrank {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
