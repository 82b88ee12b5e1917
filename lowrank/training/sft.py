"""Fine-tuning data from the user's files: plain text, prompt/completion pairs and chat messages.

The formats are TRL's (``SFTTrainer``), one record per line of a ``.jsonl`` file:

    {"text": "..."}                                 every token is trained
    {"prompt": "...", "completion": "..."}          the loss is on the completion only
    {"messages": [{"role": ..., "content": ...}]}   rendered by the chat template; loss on the
                                                    assistant turns only

and a ``.txt`` file is one document. An example is ``input_ids`` and ``labels`` of the same length
(L,), labels −100 where nothing is trained (``CausalLMLoss`` shifts them by one itself).

The tokenizer is anything with transformers' names: ``encode(text, add_special_tokens=)`` -> ids,
``eos_token_id``, and ``apply_chat_template(messages, add_generation_prompt=, tokenize=False)`` for
messages. A chat is tokenized piece by piece: the rendering of the first i messages with the
generation prompt is a prefix of the rendering of the first i + 1, so each assistant reply is the
text between the two, and its tokens are the ones trained.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

IGNORE_INDEX = -100                                   # a label that is not trained (transformers' value)
FORMATS = ("text", "prompt/completion", "messages")


class Example(NamedTuple):
    input_ids: np.ndarray        # (L,) int64
    labels: np.ndarray           # (L,) int64, IGNORE_INDEX where nothing is trained
    where: str                   # "FILE:LINE", for errors


class DataError(ValueError):
    """A data file that can't be used: the message names the file, the line and the field."""


def read_records(path) -> list[tuple[str, dict]]:
    """[("FILE:LINE", record)] of a .jsonl file (blank lines skipped), or one {"text": ...} for a .txt file."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise DataError(f"{path}: a data file is .txt or .jsonl, got {path.suffix or 'no suffix'!r}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: can't read it as UTF-8 text ({e})") from None
    if path.suffix == ".txt":
        return [(f"{path}", {"text": text})] if text.strip() else []
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a record is a JSON object, got {type(record).__name__}")
        records.append((f"{path}:{number}", record))
    return records


def record_format(record: dict, where: str) -> str:
    """Which of FORMATS ``record`` is, by its keys; DataError for none or several."""
    found = [f for f, keys in (("text", ("text",)), ("prompt/completion", ("prompt", "completion")),
                               ("messages", ("messages",))) if any(k in record for k in keys)]
    if len(found) != 1:
        raise DataError(f"{where}: a record has 'text', 'prompt' and 'completion', or 'messages'; "
                        f"got the keys {sorted(record)}")
    return found[0]


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list:
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def tokenize_record(record: dict, tokenizer, where: str) -> Example:
    """One record as an Example: ids and labels, −100 on what is not trained."""
    kind = record_format(record, where)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if kind == "text":
        ids = _encode(tokenizer, _string(record, "text", where), True) + eos
        labels = list(ids)
    elif kind == "prompt/completion":
        prompt = _encode(tokenizer, _string(record, "prompt", where), True)
        completion = _encode(tokenizer, _string(record, "completion", where), False) + eos
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    else:
        ids, labels = [], []
        for text, trained in chat_pieces(record.get("messages"), tokenizer, where):
            piece = _encode(tokenizer, text, False)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return Example(np.asarray(ids, np.int64), np.asarray(labels, np.int64), where)


def chat_pieces(messages, tokenizer, where: str) -> list[tuple[str, bool]]:
    """The rendered chat cut into [(text, is an assistant reply)], in order; joined, the whole rendering."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn to train on")

    def render(upto: int, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages[:upto], add_generation_prompt=prompt, tokenize=False)
        except ValueError as e:
            raise DataError(f"{where}: the chat template refused these messages: {e}") from None

    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, after = render(i, True), render(i + 1, False)
        if not before.startswith(done) or not after.startswith(before):
            raise DataError(f"{where}: the chat template does not render messages[:{i}] as a prefix of "
                            f"messages[:{i + 1}], so the assistant's tokens can't be told apart")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    rest = render(len(messages), False)[len(done):]
    return [(text, trained) for text, trained in pieces + [(rest, False)] if text]


def load_examples(path, tokenizer, max_seq_len: int, limit: str | None = None) -> list[Example]:
    """Every record of a data file tokenized; DataError for an empty file, a bad record, a record
    with nothing to train, or one longer than ``max_seq_len`` tokens (``limit`` says where that number
    came from; default "--max-seq-len N"). A .txt file is cut into windows of ``max_seq_len`` tokens instead."""
    if max_seq_len < 2:
        raise DataError(f"--max-seq-len must be >= 2, got {max_seq_len}")
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    if Path(path).suffix == ".txt":
        (where, record), = records
        return cut_text(tokenize_record(record, tokenizer, where), max_seq_len)
    examples = [tokenize_record(record, tokenizer, where) for where, record in records]
    for e in examples:
        if len(e.input_ids) > max_seq_len:
            raise DataError(f"{e.where}: {len(e.input_ids)} tokens, longer than "
                            f"{limit or f'--max-seq-len {max_seq_len}'}")
        if not (e.labels[1:] != IGNORE_INDEX).any():
            raise DataError(f"{e.where}: nothing to train: every token after the first is masked")
    return examples


def cut_text(example: Example, max_seq_len: int) -> list[Example]:
    """A long document as consecutive windows of ``max_seq_len`` tokens that share one token, so that
    every token after the first is predicted exactly once; the last window may be shorter."""
    ids, T = example.input_ids, max_seq_len - 1
    starts = range(0, max(len(ids) - 1, 1), T)
    return [Example(ids[s:s + T + 1], ids[s:s + T + 1].copy(), f"{example.where} (window {k})")
            for k, s in enumerate(starts) if len(ids[s:s + T + 1]) >= 2]


class Batch(NamedTuple):
    input_ids: np.ndarray        # (B, T) int64, padded on the right with pad_id
    labels: np.ndarray           # (B, T) int64, IGNORE_INDEX on padding
    attention_mask: np.ndarray   # (B, T) int64, 1 on tokens, 0 on padding


def pad_batch(examples: list[Example], pad_id: int) -> Batch:
    """Examples padded on the right to the longest: ids with ``pad_id``, labels with −100, mask 0."""
    T = max(len(e.input_ids) for e in examples)
    ids = np.full((len(examples), T), pad_id, np.int64)
    labels = np.full((len(examples), T), IGNORE_INDEX, np.int64)
    mask = np.zeros((len(examples), T), np.int64)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n] = e.input_ids, e.labels, 1
    return Batch(ids, labels, mask)


def split_validation(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): ``fraction`` of the examples, at least one, drawn by ``seed``."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must lie in (0, 1), got {fraction}")
    if len(examples) < 2:
        raise DataError(f"--val-fraction needs at least 2 examples, got {len(examples)}")
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]


class ExampleBatcher:
    """Padded batches of ``examples`` forever, as ``text.Batcher`` draws windows: every example once per
    epoch, in an order drawn from ``seed`` (a new order each epoch), a batch never spanning two epochs.
    Its data position is ``order``, ``at``, ``epoch`` and ``rng`` (``checkpoints.batcher_state``)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int):
        if batch_size < 1:
            raise ValueError(f"ExampleBatcher: batch_size must be >= 1, got {batch_size}")
        if len(examples) < batch_size:
            raise DataError(f"{len(examples)} training examples can't fill a batch of --batch-size {batch_size}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.rng = np.random.default_rng(seed)
        self.order, self.at, self.epoch = self.rng.permutation(len(examples)), 0, 0

    def next(self) -> Batch:
        """The next padded batch (B, T), T the longest of its examples."""
        if self.at + self.batch_size > len(self.order):
            self.order, self.at, self.epoch = self.rng.permutation(len(self.examples)), 0, self.epoch + 1
        rows = self.order[self.at:self.at + self.batch_size]
        self.at += self.batch_size
        return pad_batch([self.examples[i] for i in rows], self.pad_id)


def batches(examples: list[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """``examples`` in order, padded ``batch_size`` at a time (a fixed validation set)."""
    return [pad_batch(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]
