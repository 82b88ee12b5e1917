"""A GGUF's tokenizer as a ``tokenizers`` object, built as transformers 5.25 builds it
(``integrations/gguf/gguf_tokenizer_mapping.py``), so that both encode a text to the same ids.

The metadata gives ``tokenizer.ggml.model``, the tokens in id order, their types (1 normal, 2 unknown,
3 control, 4 user-defined, 6 byte), scores, merges ("a b"), the special ids and ``tokenizer.chat_template``.

- "gpt2", byte-level BPE: tokens spelled in GPT-2's byte alphabet (a token with another character is
  respelled from its UTF-8 bytes), the file's merges, a ``ByteLevel`` pre-tokenizer, preceded by the
  split regex ``tokenizer.ggml.pre`` names when transformers knows it (``PRE_TOKENIZER_SPLITS``).
- "llama", SentencePiece BPE: ``Metaspace`` ("▁", prepended to the first word), byte fallback to the
  <0xXX> tokens, and the file's merges, or where it has none (as llama.cpp writes these), merges
  rebuilt from the scores: every split of a token into two tokens, best score first.
- Control tokens become special added tokens (for byte-level, only those spelled in its alphabet),
  user-defined ones plain added tokens, and the bos/eos/unk/pad tokens special ones; the
  post-processor prepends BOS when ``tokenizer.ggml.add_bos_token`` (default true for "llama") and
  appends EOS when ``add_eos_token``.

transformers also adds its tokenizer classes' default tokens ("<|endoftext|>", "<s>" ...) when the
vocabulary lacks them, with ids past the embedding's rows; lowrank leaves those out.
"""
from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from .tensor_files import FileFormatError

CONTROL, USER_DEFINED = 3, 4
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {   # tokenizer.ggml.pre -> split regex, as transformers 5.25's GGUF_PRE_TOKENIZER_SPLITS
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    "tekken": _TEKKEN,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}
TOKENIZER_MODELS = ("gpt2", "llama")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte -> a printable character (printable Latin-1 bytes keep their own)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary (transformers' ``generate_merges``): each split of a token into two
    tokens, ordered by the token's score, then by the pieces' lengths, best first; ties in vocabulary order."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges = sorted(merges, key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _merges(gguf, tokens) -> list[tuple[str, str]] | None:
    merges = gguf.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
        raise FileFormatError(f"{gguf.path}: tokenizer.ggml.merges must be an array of strings")
    pairs = [tuple(m.split(" ")) for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise FileFormatError(f"{gguf.path}: tokenizer.ggml.merges holds an entry that is not two tokens "
                              f"separated by one space")
    return pairs


def _byte_level(gguf, tokens: list[str]) -> tokenizers.Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)},
                                              merges=_merges(gguf, tokens) or [], dropout=None,
                                              continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(gguf.get("tokenizer.ggml.pre"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece(gguf, tokens: list[str]) -> tokenizers.Tokenizer:
    merges = _merges(gguf, tokens)
    if merges is None:
        scores = gguf.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise FileFormatError(f"{gguf.path}: a 'llama' tokenizer needs tokenizer.ggml.merges or one score per "
                                  f"token in tokenizer.ggml.scores")
        merges = merges_from_scores(tokens, scores)
    backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                              fuse_unk=True, byte_fallback=True, dropout=None))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def _token_id(gguf, key: str, n: int) -> int | None:
    value = gguf.get(key)
    if value is not None and not (isinstance(value, int) and 0 <= value < n):
        raise FileFormatError(f"{gguf.path}: {key} is {value!r}, expected a token id in [0, {n})")
    return value


def tokenizer_from_gguf(gguf):
    """(``tokenizers.Tokenizer``, {"bos_token": str, ...}, chat template or None) from a ``GGUFFile``."""
    kind = gguf.get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise FileFormatError(f"{gguf.path}: tokenizer.ggml.model is {kind!r}; lowrank builds "
                              f"{', '.join(map(repr, TOKENIZER_MODELS))} (byte-level BPE and SentencePiece BPE)")
    tokens = gguf.require("tokenizer.ggml.tokens", list)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise FileFormatError(f"{gguf.path}: tokenizer.ggml.tokens must be a non-empty array of strings")
    types = gguf.get("tokenizer.ggml.token_type") or []
    if types and len(types) != len(tokens):
        raise FileFormatError(f"{gguf.path}: tokenizer.ggml.token_type has {len(types)} entries for "
                              f"{len(tokens)} tokens")
    backend = (_byte_level if kind == "gpt2" else _sentencepiece)(gguf, tokens)
    alphabet = set(bytes_to_unicode().values()) if kind == "gpt2" else None
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == CONTROL and (alphabet is None or set(t) <= alphabet)]
    backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=True)
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                        if k == USER_DEFINED and t in vocab])
    named = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token_id = _token_id(gguf, f"tokenizer.ggml.{key}_token_id", len(tokens))
        if token_id is not None:
            named[name] = tokens[token_id]
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in dict.fromkeys(named.values())
                                if t not in added])
    bos = named.get("bos_token") if gguf.get("tokenizer.ggml.add_bos_token", kind == "llama") else None
    eos = named.get("eos_token") if gguf.get("tokenizer.ggml.add_eos_token", False) else None
    single = " ".join([f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None))
    pair = " ".join([single] + [f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None))
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys((bos, eos)) if t is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    template = gguf.get("tokenizer.chat_template")
    return backend, named, template if isinstance(template, str) else None
