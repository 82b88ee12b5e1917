"""The ``lowrank`` command. Each subcommand lives in its own module, which defines
``add_arguments(parser)`` and ``run(args) -> int`` (heavy imports such as matplotlib happen
inside ``run``, so building the parser stays cheap).
"""
from __future__ import annotations

import argparse
import signal
import sys
from importlib import import_module

from . import allocator

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("lowrank.app.demo", "pretrain an MLP, fine-tune it every way, write lowrank-out/report.md"),
    "train": ("lowrank.app.train", "fine-tune one method (full, head, adapter, lora, qlora) on a toy task; --distributed under mpiexec"),
    "inspect": ("lowrank.app.inspect", "show what an adapter directory or a model file holds"),
    "analyze": ("lowrank.app.analyze", "SVD, ranks of ΔW, subspace similarity, intrinsic dimension d90"),
    "generate": ("lowrank.app.generate", "continue text with a decoder (KV cache), through LoRA adapters: one mixed batch"),
    "serve": ("lowrank.app.serve", "an OpenAI-compatible HTTP server: continuous batching of mixed adapters"),
    "lm": ("lowrank.app.lm", "a small Llama on pydoc's English: pretrain, then finetune to stdlib code"),
    "export-gguf": ("lowrank.app.export_gguf", "a PEFT LoRA adapter as llama.cpp's LoRA GGUF (--merge: the merged model)"),
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
    if argv is None:                                     # the command itself, not a call from Python
        if hasattr(signal, "SIGPIPE"):                   # `lowrank inspect ... | head` ends quietly
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        allocator.keep_freed_memory()                    # steps reuse freed memory (app/allocator.py)
    args = build_parser().parse_args(argv)
    try:
        return int(import_module(args._module).run(args) or 0)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as e:   # bad usage or bad input
        return _fail(args.command, e, 2)
    except OSError as e:                                           # a file the command can't read or write
        return _fail(args.command, e, 1)
    except RecursionError as e:                                    # e.g. JSON nested 100,000 deep
        return _fail(args.command, f"input nested too deeply to read ({e})", 2)
    except MemoryError as e:
        return _fail(args.command, f"out of memory{f': {e}' if str(e) else ''}", 1)


def printable(text, keep: str = "") -> str:
    """``text`` with control characters escaped (ESC -> \\x1b, newline -> \\n) except those in ``keep``, other
    characters kept: names read from a file can't move the cursor, recolour the terminal or fake an output line."""
    return "".join(c if c.isprintable() or c in keep else c.encode("unicode_escape").decode("ascii") for c in str(text))


def _fail(command: str, error, code: int) -> int:
    """One line on stderr (never a traceback); ``code`` is the exit status."""
    text = printable(" ".join(str(error).split()) or type(error).__name__)    # multi-line messages too
    print(f"lowrank {command}: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
