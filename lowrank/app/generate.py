"""``lowrank generate``: continue text with a decoder, optionally through LoRA adapters.

    lowrank generate --model DIR --prompt "def " --prompt "The "            one batch on the base model
    lowrank generate --model DIR --adapter A --prompt "def "                 every prompt through adapter A
    lowrank generate --model DIR --adapter A --adapter B --adapter __base__ \\
                     --prompt "def " --prompt "import " --prompt "The "      one mixed batch: prompt i, adapter i

Byte-level tokens (``io.tokenizer.ByteTokenizer``: BOS first, stop at EOS); prompts of different
lengths are left-padded into one batch; greedy unless --temperature, --top-k or --top-p asks for
sampling (seeded by --seed). The model's ``generate`` does the work (a KV cache: prefill once,
then one token per step). Bad input (an adapter for another base, a prompt longer than the
context, an empty prompt, --max-new-tokens <= 0, --top-p outside (0, 1], a folder without
config.json) is one line on stderr and exit status 2; nothing is written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..tuners.lora.mixed import BASE


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a model folder (config.json + model.safetensors), "
                        "as transformers' or `lowrank lm pretrain` writes it")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="a PEFT adapter folder; several: one per --prompt, run as one mixed batch "
                             f"({BASE} for a row on the base model)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="text to continue (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature (> 0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens whose "
                        "probability reaches p, in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def run(args) -> int:
    _check_args(args)
    from ..models.llama import LlamaForCausalLM
    from ..io.tokenizer import ByteTokenizer
    tok = ByteTokenizer()
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    model.eval()
    ids, mask = _left_padded([tok.encode(p) for p in args.prompt], tok.pad_token_id)
    context = model.config.max_position_embeddings
    if ids.shape[1] > context:
        raise ValueError(f"a prompt of {ids.shape[1]} tokens (BOS included) is longer than the model's context of "
                         f"{context} positions")
    if ids.shape[1] + args.max_new_tokens > context:
        raise ValueError(f"a prompt of {ids.shape[1]} tokens (BOS included) + --max-new-tokens {args.max_new_tokens} "
                         f"exceeds the model's context of {context} positions; ask for at most "
                         f"{context - ids.shape[1]} new tokens")
    runner, adapter_names = _with_adapters(model, args.adapter)
    sampling = dict(do_sample=any(v is not None for v in (args.temperature, args.top_k, args.top_p)),
                    temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    out = runner.generate(ids, max_new_tokens=args.max_new_tokens, attention_mask=mask,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sampling, **extra)
    out = np.asarray(out)
    for i, prompt in enumerate(args.prompt):
        where = "base model" if not args.adapter else args.adapter[i if len(args.adapter) > 1 else 0]
        print(f"--- prompt {i + 1} ({_shown(where)}) ---")
        print(_shown(prompt + tok.decode(out[i, ids.shape[1]:])))
    return 0


def _check_args(args):
    """The checks that need no model: ValueError (exit 2) naming the flag."""
    if not args.prompt:
        raise ValueError("give at least one --prompt")
    empty = [i + 1 for i, p in enumerate(args.prompt) if not p]
    if empty:
        raise ValueError(f"empty prompt (--prompt number {', '.join(map(str, empty))}); give at least one character")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if len(args.adapter) > 1 and len(args.adapter) != len(args.prompt):
        raise ValueError(f"{len(args.adapter)} --adapter folders need one --prompt each (a mixed batch), "
                         f"got {len(args.prompt)} prompts")
    if args.adapter and all(a == BASE for a in args.adapter):
        raise ValueError(f"every --adapter is {BASE}: leave --adapter out to run the base model")


def _with_adapters(model, folders):
    """(what to call generate on, per-row adapter names or None) for the --adapter folders."""
    if not folders:
        return model, None
    from ..tuners.lora.model import LoraModel
    names = [BASE if f == BASE else f"adapter{i}" for i, f in enumerate(folders)]
    loaded = [(n, f) for n, f in zip(names, folders) if f != BASE]
    for name, folder in loaded:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--adapter {folder}: no such folder")
    runner = LoraModel.from_pretrained(model, loaded[0][1], adapter_name=loaded[0][0])
    for name, folder in loaded[1:]:
        runner.load_adapter(folder, name)
    runner.eval()
    return runner, (names if len(folders) > 1 else None)


def _left_padded(rows, pad_id):
    """Token lists -> ids (B, T) left-padded with ``pad_id`` and attention_mask (B, T), 0 on the padding."""
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


def _shown(text: str) -> str:
    """``text`` with control characters other than newline and tab escaped (model output can hold any byte)."""
    from .cli import printable
    return printable(text, keep="\n\t")
