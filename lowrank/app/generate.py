"""``lowrank generate``: continue text, or answer a chat, with a decoder, optionally through LoRA adapters.

    lowrank generate --model DIR --prompt "def "                             streamed as tokens arrive
    lowrank generate --model DIR --chat "Hi!" --system "Be brief."           the chat template's prompt, the reply
    lowrank generate --model DIR --adapter code=A --prompt "def "            every prompt through adapter A
    lowrank generate --model m.gguf --keep-quantized --prompt "def "         the GGUF's blocks, llama.cpp's arithmetic
    lowrank generate --model DIR --adapter A --adapter B --adapter __base__ \\
                     --prompt "def " --prompt "import " --prompt "The "      one mixed batch: prompt i, adapter i

The model folder's tokenizer (``io.tokenizer.load_tokenizer``: tokenizer.json, or the byte
tokenizer of a folder with byte_tokenizer.json), checked against the embedding before anything
runs. ``--prompt`` text is encoded with the tokenizer's special tokens (BOS) and printed with its
continuation; ``--chat`` renders [system, user] through the chat template with the generation
prompt (an adapter folder's chat template wins over the base's) and prints the reply. One prompt
is streamed to stdout as its tokens arrive (``io.tokenizer.DecodeStream``: a character split over
tokens appears once complete); several are left-padded into one batch and printed when done.
Generation stops at the tokenizer's stop ids (generation_config.json's ``eos_token_id``, an id or
a list).

Settings come from generation_config.json as transformers' GenerationConfig applies them
(``do_sample``, ``temperature``, ``top_k`` (default 50), ``top_p``, ``max_new_tokens`` or
``max_length``); flags override: --temperature, --top-k or --top-p turn sampling on, --greedy
turns it off. Without the file, or without a length in it: greedy, 64 new tokens at most, cut to
the context when not asked for by --max-new-tokens. Bad input (an adapter for another base, a
prompt longer than the context, an empty prompt, absurd settings, a tokenizer larger than the
embedding) is one line on stderr and exit status 2; nothing is written.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from ..tuners.lora.mixed import BASE

DEFAULT_MAX_NEW_TOKENS = 64          # without --max-new-tokens and without a length in generation_config.json
UNAPPLIED = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": None,
             "min_length": 0, "typical_p": 1.0, "min_p": None}      # generation_config.json fields not implemented


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a model folder (config.json, the weights and tokenizer.json "
                        "or byte_tokenizer.json), as transformers or `lowrank lm pretrain` writes it")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="a PEFT adapter folder, optionally named (NAME=DIR); several: one per prompt, run as "
                             f"one mixed batch ({BASE} for a row on the base model)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="text to continue (repeatable)")
    parser.add_argument("--chat", action="append", default=[], metavar="TEXT",
                        help="a user message to answer through the chat template (repeatable)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="a system message before each --chat")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"new tokens per prompt at most (default: generation_config.json's, else "
                             f"{DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature (> 0)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens whose "
                        "probability reaches p, in (0, 1]")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding, whatever generation_config.json says")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--keep-quantized", action="store_true",
                        help="a .gguf model: keep its quantized matrices as their blocks and multiply them as llama.cpp "
                             "does, each layer's input rounded to Q8_0 first (less memory, faster decoding; the "
                             "logits differ from the dequantized model's by that rounding)")


def run(args) -> int:
    _check_args(args)
    folders = _adapter_folders(args.adapter)
    model, tok = model_and_tokenizer(args.model, args.dtype, keep_quantized=args.keep_quantized)
    texts = args.prompt or args.chat
    row = [(i if len(folders) > 1 else 0) if folders else None for i in range(len(texts))]      # row -> --adapter
    where = ["base model" if r is None else args.adapter[r] for r in row]
    prompts = ([tok.encode(p) for p in args.prompt] if args.prompt else
               [_chat_ids(tok, c, args.system, None if r is None else folders[r][1]) for c, r in zip(args.chat, row)])
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.stop_token_ids or [0])[0]
    ids, mask = _left_padded(prompts, pad)
    settings = _settings(args, Path(args.model), ids.shape[1], model.config.max_position_embeddings)
    runner, adapter_names = _with_adapters(model, folders)
    extra = {} if adapter_names is None else {"adapter_names": adapter_names}
    streamer = None
    if len(prompts) == 1:
        print(f"--- prompt 1 ({_shown(where[0])}) ---", flush=True)
        streamer = PrintStreamer(tok, skip_prompt=bool(args.chat))
    out = runner.generate(ids, attention_mask=mask, eos_token_id=tok.stop_token_ids or None, pad_token_id=pad,
                          streamer=streamer, **settings, **extra)
    if streamer is None:
        out = np.asarray(out)
        for i, prompt in enumerate(prompts):
            new = _until_stop(out[i, ids.shape[1]:], tok.stop_token_ids)
            text = tok.decode(new if args.chat else [*prompt, *new], skip_special_tokens=True)
            print(f"--- prompt {i + 1} ({_shown(where[i])}) ---")
            print(_shown(text))
    return 0


def model_and_tokenizer(path, dtype, keep_quantized: bool = False):
    """(the model in eval mode, its folder's tokenizer), after checking that every id the tokenizer produces has
    an embedding row and every id the model can produce has text. ``keep_quantized``: a GGUF's quantized matrices
    stay blocks, multiplied as llama.cpp does (``LlamaForCausalLM.from_pretrained``'s q8_activations)."""
    from ..io.tokenizer import BYTE_TOKENIZER_FILE, ByteTokenizer, check_vocab, load_tokenizer
    from ..models.llama import LlamaForCausalLM
    if keep_quantized and not str(path).endswith(".gguf"):
        raise ValueError(f"--keep-quantized is for a llama.cpp .gguf model, got --model {path}")
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, keep_quantized=keep_quantized,
                                             q8_activations=keep_quantized)
    model.eval()
    tok = load_tokenizer(path)
    V = model.config.vocab_size
    check_vocab(tok, V, str(Path(path) / "config.json"))
    if isinstance(tok, ByteTokenizer) and V > tok.vocab_size:               # its decode refuses such ids
        raise ValueError(f"{Path(path) / BYTE_TOKENIZER_FILE}: a byte-level model has {tok.vocab_size} ids but the "
                         f"model's vocab_size is {V}: ids >= {tok.vocab_size} it generates have no text")
    return model, tok


class PrintStreamer:
    """Prints one row's text to stdout as its tokens arrive (transformers' streamer protocol: ``put`` the
    prompt ids (1, T) once, then each step's token (1,), then ``end``); the prompt's text too unless
    ``skip_prompt``. Special tokens are not shown."""

    def __init__(self, tokenizer, skip_prompt: bool = False):
        from ..io.tokenizer import DecodeStream
        self.stream = DecodeStream(tokenizer, skip_special_tokens=True)
        self.skip_prompt, self.prompt_seen = skip_prompt, False

    def put(self, ids):
        ids = np.asarray(ids)
        if ids.ndim > 1 and ids.shape[0] != 1:
            raise ValueError(f"PrintStreamer: streams one prompt, got ids of shape {ids.shape}")
        prompt, self.prompt_seen = not self.prompt_seen, True
        if prompt and self.skip_prompt:
            return
        self._print("".join(self.stream.put(i) for i in ids.reshape(-1)))

    def end(self):
        self._print(self.stream.end() + "\n")

    @staticmethod
    def _print(text: str):
        if text:
            sys.stdout.write(_shown(text))
            sys.stdout.flush()


def _check_args(args):
    """The checks that need no model: ValueError (exit 2) naming the flag."""
    if bool(args.prompt) == bool(args.chat):
        raise ValueError("give --prompt (text to continue) or --chat (a message to answer), not both and not neither")
    if args.system is not None and not args.chat:
        raise ValueError("--system goes with --chat, not --prompt")
    empty = [i + 1 for i, p in enumerate(args.prompt or args.chat) if not p]
    if empty:
        flag = "--prompt" if args.prompt else "--chat"
        raise ValueError(f"empty prompt ({flag} number {', '.join(map(str, empty))}); give at least one character")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.greedy and any(v is not None for v in (args.temperature, args.top_k, args.top_p)):
        raise ValueError("--greedy contradicts --temperature, --top-k and --top-p (which sample)")
    n = len(args.prompt or args.chat)
    if len(args.adapter) > 1 and len(args.adapter) != n:
        raise ValueError(f"{len(args.adapter)} --adapter folders need one --prompt or --chat each (a mixed batch), "
                         f"got {n} prompts")
    if args.adapter and all(a == BASE for a in args.adapter):
        raise ValueError(f"every --adapter is {BASE}: leave --adapter out to run the base model")


def _adapter_folders(specs) -> list[tuple[str, str | None]]:
    """--adapter values (NAME=DIR, DIR or __base__) -> [(name, folder or None for the base)]."""
    out = []
    for i, spec in enumerate(specs):
        if spec == BASE:
            out.append((BASE, None))
            continue
        name, folder = spec.split("=", 1) if "=" in spec and not Path(spec).is_dir() else (f"adapter{i}", spec)
        if not name or name == BASE:
            raise ValueError(f"--adapter {spec}: NAME=DIR needs a name other than '' and {BASE}")
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"--adapter {spec}: no such folder {folder}")
        if any(n == name and f != folder for n, f in out):
            raise ValueError(f"--adapter {spec}: the name {name!r} is given to two folders")
        out.append((name, folder))
    return out


def _with_adapters(model, folders):
    """(what to call generate on, per-row adapter names or None) for the (name, folder) pairs."""
    if not folders:
        return model, None
    from ..tuners.lora.model import LoraModel
    loaded = list(dict.fromkeys((n, f) for n, f in folders if f is not None))
    runner = LoraModel.from_pretrained(model, loaded[0][1], adapter_name=loaded[0][0])
    for name, folder in loaded[1:]:
        runner.load_adapter(folder, name)
    runner.eval()
    return runner, ([n for n, _ in folders] if len(folders) > 1 else None)


def _chat_ids(tok, text, system, adapter_folder) -> list[int]:
    """[system?, user] through the chat template (the adapter folder's if it has one), with the generation prompt."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": text}]
    template = None
    if adapter_folder is not None:
        from ..io.chat_template import load_chat_template
        from ..io.tokenizer import TOKENIZER_CONFIG_FILE, read_json
        config_path = Path(adapter_folder) / TOKENIZER_CONFIG_FILE
        template, _ = load_chat_template(adapter_folder, read_json(config_path) if config_path.is_file() else {})
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, chat_template=template)
    if not ids:
        raise ValueError("the chat template rendered an empty prompt")
    return ids


def _settings(args, folder: Path, T: int, context: int) -> dict:
    """generate's keyword arguments: generation_config.json's settings as transformers applies them, then the flags."""
    from ..io.tokenizer import GENERATION_CONFIG_FILE, read_json
    path = folder / GENERATION_CONFIG_FILE
    config = read_json(path) if path.is_file() else None
    s = dict(do_sample=False, temperature=1.0, top_k=None, top_p=None, max_new_tokens=None)
    if config is not None:
        s.update(do_sample=_field(config, path, "do_sample", bool, False),
                 temperature=_field(config, path, "temperature", float, 1.0),
                 top_k=_field(config, path, "top_k", int, 50) or None,           # 0: no top-k, as transformers
                 top_p=_field(config, path, "top_p", float, 1.0),
                 max_new_tokens=_field(config, path, "max_new_tokens", int, None))
        max_length = _field(config, path, "max_length", int, None)
        if s["max_new_tokens"] is None and max_length is not None:
            if max_length <= T:
                raise ValueError(f"{path}: max_length {max_length} leaves no room after a prompt of {T} tokens; "
                                 f"give --max-new-tokens")
            s["max_new_tokens"] = max_length - T
        for key, neutral in UNAPPLIED.items():
            if config.get(key, neutral) != neutral:
                print(f"lowrank generate: note: {path}: {key} {config[key]!r} is not applied", file=sys.stderr)
    sampling = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None}
    s.update(sampling)
    if sampling:
        s["do_sample"] = True
    if args.greedy:
        s["do_sample"] = False
    where = f"{folder / 'config.json'}: max_position_embeddings"
    if T > context:
        raise ValueError(f"a prompt of {T} tokens (special tokens included) is longer than the model's context of "
                         f"{context} positions ({where})")
    if args.max_new_tokens is not None:
        if T + args.max_new_tokens > context:
            raise ValueError(f"a prompt of {T} tokens (special tokens included) + --max-new-tokens "
                             f"{args.max_new_tokens} exceeds the model's context of {context} positions; ask for at "
                             f"most {context - T} new tokens")
        s["max_new_tokens"] = args.max_new_tokens
    if T == context:
        raise ValueError(f"a prompt of {T} tokens (special tokens included) fills the model's context of {context} "
                         f"positions ({where}): no room for new tokens")
    s["max_new_tokens"] = min(s["max_new_tokens"] or DEFAULT_MAX_NEW_TOKENS, context - T)
    return {**s, "seed": args.seed}


def _field(config: dict, path: Path, key: str, kind, default):
    """config[key] checked as ``kind`` (bool, int >= 0 or finite float > 0); ``default`` when absent or null."""
    value = config.get(key)
    if value is None:
        return default
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0}[kind]
    if not ok(value) or (key == "top_p" and value > 1):
        want = {bool: "true or false", int: "an integer >= 0", float: "a finite number > 0"}[kind]
        raise ValueError(f"{path}: {key} must be {want}{' and <= 1' if key == 'top_p' else ''}, got {value!r}")
    return value


def _until_stop(new, stop_ids):
    """A row's new ids up to and including its first stop id (what follows is padding)."""
    hits = np.flatnonzero(np.isin(new, stop_ids)) if stop_ids else []
    return new[:hits[0] + 1] if len(hits) else new


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
