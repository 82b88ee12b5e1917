"""A model folder's tokenizer: ``tokenizer.json`` through Hugging Face's ``tokenizers``, read as
transformers' ``AutoTokenizer`` reads it (its generic ``TokenizersBackend``).

- The pipeline (normalizer, pre-tokenizer, model, decoder) and the post-processor come from
  ``tokenizer.json``; the post-processor alone decides whether ``encode`` adds BOS/EOS
  (transformers drops ``add_bos_token``/``add_eos_token`` from ``tokenizer_config.json`` when a
  ``tokenizer.json`` exists).
- ``tokenizer_config.json`` names the special tokens (``bos_token``, ``eos_token``, ``pad_token``,
  ... as strings or AddedToken dicts; ``special_tokens_map.json`` overrides them when the config
  has no ``added_tokens_decoder``); named or listed tokens the vocabulary lacks are added as
  special tokens, as transformers adds them. ``clean_up_tokenization_spaces`` applies to non-BPE models only.
- ``generation_config.json``'s ``eos_token_id`` (an int or a list) gives the ids that stop
  generation (``stop_token_ids``), and fills bos/eos/pad ids the tokenizer config leaves unset.

Byte-level models have no ``tokenizer.json``: their folder holds ``byte_tokenizer.json`` instead,
and ``load_tokenizer`` gives them ``ByteTokenizer`` (UTF-8 bytes, same methods). ``DecodeStream``
turns ids into text as they arrive, for either.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tokenizers

from .chat_template import load_chat_template, render_chat_template
from .tensor_files import FileFormatError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"        # marks a folder whose model reads UTF-8 bytes (ByteTokenizer)
SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                             "mask_token")
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))     # transformers' clean_up_tokenization


def read_json(path: Path) -> dict:
    """A JSON object file -> dict; FileFormatError naming the file otherwise."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: not a JSON file: {e}") from e
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def added_token(value, path: Path, field: str) -> tokenizers.AddedToken:
    """A token as tokenizer_config.json writes it (a str or an AddedToken dict) -> AddedToken (special)."""
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=True)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        settings = {k: value[k] for k in ADDED_TOKEN_FIELDS if k in value}
        settings.setdefault("special", True)
        return tokenizers.AddedToken(**settings)
    raise FileFormatError(f"{path}: {field} must be a string or an AddedToken object with a 'content', got {value!r}")


def token_ids(value, path: Path, field: str) -> list[int]:
    """An id or list of ids from generation_config.json -> [int]; None -> []."""
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise FileFormatError(f"{path}: {field} must be a token id or a list of token ids, got {value!r}")
    return values


def read_special_tokens(folder: Path, config: dict) -> tuple[dict, list]:
    """({"bos_token": AddedToken, ...}, [listed AddedToken, ...]) from tokenizer_config.json (and, for
    a config without ``added_tokens_decoder``, special_tokens_map.json, whose values win, as in
    transformers); listed tokens come in id order, ``added_tokens_decoder`` then ``extra_special_tokens``."""
    path = folder / TOKENIZER_CONFIG_FILE
    named = {k: config[k] for k in SPECIAL_TOKENS_ATTRIBUTES if config.get(k) is not None}
    if "added_tokens_decoder" not in config and (folder / SPECIAL_TOKENS_MAP_FILE).is_file():
        legacy = read_json(folder / SPECIAL_TOKENS_MAP_FILE)
        named.update({k: v for k, v in legacy.items() if k in SPECIAL_TOKENS_ATTRIBUTES and v is not None})
    named = {k: added_token(v, path, k) for k, v in named.items()}
    decoder = config.get("added_tokens_decoder") or {}
    listed = [added_token(decoder[i], path, f"added_tokens_decoder[{i}]") for i in sorted(decoder, key=int)]
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    listed += [added_token(v, path, "extra_special_tokens") for v in (extra.values() if isinstance(extra, dict)
                                                                       else extra)]
    return named, listed


def read_generation_ids(folder: Path) -> dict[str, list[int]]:
    """{"bos_token_id": [...], "eos_token_id": [...], "pad_token_id": [...]} from generation_config.json."""
    path = folder / GENERATION_CONFIG_FILE
    config = read_json(path) if path.is_file() else {}
    return {k: token_ids(config.get(k), path, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with a model folder's special tokens and chat template.

    ``backend_tokenizer`` is the ``tokenizers.Tokenizer``; the other names follow transformers'
    tokenizers (``encode``, ``decode``, ``bos_token_id``, ``special_tokens_map``, ``apply_chat_template``).
    ``stop_token_ids`` are the ids generation stops on: generation_config.json's ``eos_token_id``
    (an int or a list), else ``[eos_token_id]``.
    """

    def __init__(self, backend_tokenizer: tokenizers.Tokenizer, special_tokens: dict | None = None,
                 added_tokens=(), generation_ids: dict | None = None, chat_template: str | None = None,
                 chat_template_file: str = "chat_template", clean_up_tokenization_spaces: bool = False):
        self.backend_tokenizer = backend_tokenizer
        special_tokens = {k: v if isinstance(v, tokenizers.AddedToken) else tokenizers.AddedToken(v, special=True)
                          for k, v in (special_tokens or {}).items()}
        self.special_tokens_map = {k: t.content for k, t in special_tokens.items()}   # what templates see
        vocab = backend_tokenizer.get_vocab(with_added_tokens=True)
        missing = []                    # transformers adds the listed tokens, then the named ones, that lack ids
        for token in [*added_tokens, *special_tokens.values()]:
            if token.content not in vocab and all(t.content != token.content for t in missing):
                missing.append(token)
        backend_tokenizer.add_tokens(missing)
        generation_ids = generation_ids or {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = self.special_tokens_map.get(name)
            fallback = (generation_ids.get(f"{name}_id") or [None])[0]
            setattr(self, f"{name}_id", backend_tokenizer.token_to_id(token) if token is not None else fallback)
        self.stop_token_ids = (list(generation_ids.get("eos_token_id") or [])
                               or ([self.eos_token_id] if self.eos_token_id is not None else []))
        self.chat_template, self.chat_template_file = chat_template, chat_template_file
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """Read ``folder``'s tokenizer.json and, where present, tokenizer_config.json,
        special_tokens_map.json, generation_config.json and chat template."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:              # tokenizers raises a bare Exception for files it can't parse
            raise FileFormatError(f"{path}: not a tokenizers file: {e}") from e
        config_path = folder / TOKENIZER_CONFIG_FILE
        config = read_json(config_path) if config_path.is_file() else {}
        named, listed = read_special_tokens(folder, config)
        template, template_file = load_chat_template(folder, config)
        return cls(backend, named, listed, read_generation_ids(folder), template, template_file,
                   clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """The tokenizer a llama.cpp GGUF file holds (``gguf_tokenizer``), its ``tokenizer.chat_template`` as the
        chat template; generation stops on its eos, eot and eom tokens."""
        from .gguf import read_gguf
        from .gguf_tokenizer import tokenizer_from_gguf

        gguf = read_gguf(path)
        backend, named, template = tokenizer_from_gguf(gguf)
        stops = [gguf.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        stops = list(dict.fromkeys(i for i in stops if i is not None))
        return cls(backend, named, generation_ids={"eos_token_id": stops},
                   chat_template=template, chat_template_file=f"{gguf.path}: tokenizer.chat_template")

    # -- ids ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """The base vocabulary's size, without added tokens (transformers' ``vocab_size``)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """The vocabulary's size with the added tokens."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def max_token_id(self) -> int:
        """The largest id the tokenizer can produce (ids need not be contiguous)."""
        return max(self.backend_tokenizer.get_vocab(with_added_tokens=True).values())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` -> ids; the post-processor adds BOS/EOS when ``add_special_tokens``."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: expected a str, got {type(text).__name__}")
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """ids -> text; special tokens dropped when ``skip_special_tokens``."""
        text = self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces and type(self.backend_tokenizer.model).__name__ != "BPE":
            for spaced, tight in CLEAN_UP:      # transformers skips this for BPE, where it corrupts text
                text = text.replace(spaced, tight)
        return text

    # -- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None, **kwargs):
        """Render ``messages`` ([{"role", "content"}, ...]) as transformers does: the template sees
        ``messages``, ``add_generation_prompt``, ``tools``, ``documents``, the special tokens
        (``bos_token``, ...) and ``kwargs``. ``tokenize=True`` returns ids, encoded without adding
        special tokens (the template writes its own)."""
        template, where = (chat_template, "chat_template") if chat_template is not None else \
            (self.chat_template, self.chat_template_file)
        if template is None:
            raise ValueError(f"{self.chat_template_file}: this tokenizer has no chat template "
                             f"(expected chat_template.jinja or tokenizer_config.json's chat_template)")
        text = render_chat_template(template, messages, where=where, add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS = 256, EOS = 257, PAD = 258 (vocab_size 259), with
    ``Tokenizer``'s methods: ``encode`` puts BOS first when ``add_special_tokens`` (as Llama's do).

    ``decode(encode(s))`` is ``s`` for every str, lone surrogates included (``surrogatepass``). Ids that
    are not valid UTF-8 (a sampled sequence can be anything) decode with U+FFFD in place of the bad
    bytes; special ids decode to nothing (they have no text).
    """

    bos_token_id, eos_token_id, pad_token_id, unk_token_id = 256, 257, 258, None
    vocab_size = 259
    stop_token_ids = [257]
    chat_template = None
    chat_template_file = BYTE_TOKENIZER_FILE

    def __len__(self) -> int:
        return self.vocab_size

    def max_token_id(self) -> int:
        return self.vocab_size - 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text`` -> ids: BOS (when ``add_special_tokens``), then its UTF-8 bytes."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: expected a str, got {type(text).__name__}")
        return [self.bos_token_id] * add_special_tokens + list(text.encode("utf-8", "surrogatepass"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """ids (any int sequence) -> str; specials dropped; ValueError for ids outside [0, 259)."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"ByteTokenizer.decode: ids must be integers, got {ids.dtype}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise ValueError(f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got {int(ids[bad][0])}")
        data = ids[ids < 256].astype(np.uint8).tobytes()
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return data.decode("utf-8", "replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False, **kwargs):
        raise ValueError(f"{BYTE_TOKENIZER_FILE}: a byte-level model has no chat template; give text, not a chat")


def load_tokenizer(folder) -> Tokenizer | ByteTokenizer:
    """``folder``'s Tokenizer, or ``ByteTokenizer`` for a byte-level model folder (``byte_tokenizer.json``);
    FileFormatError when the folder has neither. A path ending in ``.gguf`` gives the GGUF's tokenizer."""
    if str(folder).endswith(".gguf"):
        return Tokenizer.from_gguf(folder)
    folder = Path(folder)
    if (folder / TOKENIZER_FILE).is_file():
        return Tokenizer.from_pretrained(folder)
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    raise FileFormatError(f"{folder}: no {TOKENIZER_FILE} (a tokenizers file) and no {BYTE_TOKENIZER_FILE} "
                          f"(a byte-level model): the folder names no tokenizer")


def check_vocab(tokenizer: Tokenizer, vocab_size: int, where: str = "config.json") -> None:
    """ValueError unless every id ``tokenizer`` can produce or stop on has a row in an embedding
    of ``vocab_size`` rows (``where`` names the file that gave it). A larger embedding is fine."""
    top = tokenizer.max_token_id()
    if top >= vocab_size:
        raise ValueError(f"{TOKENIZER_FILE}: the tokenizer produces ids up to {top} but {where}'s vocab_size is "
                         f"{vocab_size}: ids >= {vocab_size} have no embedding row")
    # Ids the tokenizer names are below ``top``; others came from generation_config.json.
    named = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
             **{f"eos_token_id[{i}]": t for i, t in enumerate(tokenizer.stop_token_ids)}}
    for name, token_id in named.items():
        if token_id is not None and token_id >= vocab_size:
            raise ValueError(f"{GENERATION_CONFIG_FILE}: {name} is {token_id} but {where}'s vocab_size is "
                             f"{vocab_size}: it has no embedding row")


class DecodeStream:
    """Text as ids arrive: ``put(id)`` returns the new text ("" while a character is incomplete),
    ``end()`` the rest; their concatenation equals ``tokenizer.decode(all ids)``.

    Each step decodes a short window, ids[prefix:], and subtracts the text of ids[prefix:read]
    (so a decoder that strips the first token's space, like Metaspace's, strips it from both).
    Held back: text ending in U+FFFD (byte-level BPE decodes a multi-byte character only once all
    its bytes arrived) and text after a byte-fallback token <0xXX> (a run of them decodes as one
    UTF-8 string, each byte U+FFFD if the run is invalid, so the next byte can change it; skipped
    special tokens don't end a run). With ``clean_up_tokenization_spaces`` (non-BPE models only)
    a clean-up that spans two pieces (" ' s") can make the stream differ from ``decode``.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = self.read = 0        # ids[prefix:read] is text already returned, kept for context
        self.byte_ids, self.skipped = set(), set()       # ByteTokenizer: no byte-fallback tokens, specials never shown
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            self.byte_ids = {backend.token_to_id(f"<0x{b:02X}>") for b in range(256)} - {None}
            self.skipped = {i for i, t in backend.get_added_tokens_decoder().items()
                            if t.special and skip_special_tokens}

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, final: bool) -> str:
        """The text the ids after ``read`` add; "" while it ends in an incomplete character."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(done):
            return ""
        last = next((i for i in reversed(self.ids) if i not in self.skipped), None)    # the last id decode sees
        if not final and (text.endswith("\ufffd") or last in self.byte_ids):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def put(self, token_id: int) -> str:
        """Take one id; return the text it completes."""
        self.ids.append(int(token_id))
        return self._step(final=False)

    def end(self) -> str:
        """Return what is held back (incomplete characters decode as U+FFFD, as ``decode`` does)."""
        return self._step(final=True)
