"""Text that every Python installation ships, and next-token windows (of the byte tokenizer's ids by default).

Two corpora, nothing downloaded (their content differs slightly between Python versions, so
``corpus_info`` records the version beside the sizes):

    "pydoc"   the English of CPython's documentation topics, ``pydoc_data.topics.topics``
              (one document per topic, about 465 KB): the pretraining corpus
    "stdlib"  Python source of the standard library, ``*.py`` under ``sysconfig.get_paths()["stdlib"]``
              without site-packages, test folders and ``pydoc_data`` (the English above, as a .py):
              the downstream domain. A fixed, hash-ordered choice of files up to ``STDLIB_MAX_BYTES``.

Splits are by document: the documents, sorted by name, are permuted by ``seed`` and cut 80/10/10,
so no text is in two splits and a seed always gives the same split on the same Python.

Letters: B windows per batch, T predicted tokens per window. A token stream is the documents'
ids end to end, each document ``BOS text EOS``; window i is ``stream[i·T : i·T + T + 1]`` (B, T+1),
so consecutive windows share one token and every token after the first is predicted exactly once.
A window is both the input ids and the labels of ``CausalLMLoss`` (it shifts by one itself).
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.tokenizer import ByteTokenizer

CORPORA = ("pydoc", "stdlib")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)          # train, validation, test, by document
STDLIB_MAX_BYTES = 1_500_000               # the code domain's total size (speed on 2 cores)
STDLIB_MAX_FILE_BYTES = 60_000             # larger files are skipped: many modules rather than a few giants
SKIPPED_FOLDERS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}


# -- the corpora --------------------------------------------------------------------------
def pydoc_documents() -> list[tuple[str, str]]:
    """[(topic, text)] of ``pydoc_data.topics.topics``, sorted by topic."""
    from pydoc_data.topics import topics
    return sorted(topics.items())


def _stdlib_candidates(root: Path) -> list[Path]:
    """Every ``*.py`` under ``root`` outside SKIPPED_FOLDERS and up to STDLIB_MAX_FILE_BYTES, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS)
        for name in sorted(files):
            path = Path(folder, name)
            if name.endswith(".py") and 0 < path.stat().st_size <= STDLIB_MAX_FILE_BYTES:
                found.append(path)
    return sorted(found)


def stdlib_documents(max_bytes: int = STDLIB_MAX_BYTES) -> list[tuple[str, str]]:
    """[(path relative to the stdlib, source)], sorted by path: files taken in the order of the
    SHA-256 of their relative path (a fixed shuffle, not the alphabet's 'a' modules first) until
    ``max_bytes`` of text; files that are not UTF-8 are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(_stdlib_candidates(root),
                   key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
    docs, total = [], 0
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text.encode("utf-8", "surrogatepass")) > max_bytes:
            continue
        docs.append((path.relative_to(root).as_posix(), text))
        total += len(text.encode("utf-8", "surrogatepass"))
    return sorted(docs)


def documents(corpus: str) -> list[tuple[str, str]]:
    """The named corpus ("pydoc" or "stdlib") as [(name, text)], sorted by name."""
    if corpus == "pydoc":
        return pydoc_documents()
    if corpus == "stdlib":
        return stdlib_documents()
    raise ValueError(f"unknown corpus {corpus!r}; choose one of {CORPORA}")


@dataclass
class Splits:
    """One corpus cut by document: lists of (name, text)."""

    train: list
    validation: list
    test: list

    def __getitem__(self, split: str) -> list:
        if split not in ("train", "validation", "test"):
            raise KeyError(f"no split {split!r}; splits are train, validation, test")
        return getattr(self, split)


def split_documents(docs: list, seed: int = 0, fractions=SPLIT_FRACTIONS) -> Splits:
    """``docs`` permuted by ``seed`` and cut by ``fractions``; each split keeps >= 1 document."""
    n = len(docs)
    if n < 3:
        raise ValueError(f"split_documents: need at least 3 documents for train/validation/test, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    n_train = n - n_val - n_test
    picked = [docs[i] for i in order]
    return Splits(sorted(picked[:n_train]), sorted(picked[n_train:n_train + n_val]),
                  sorted(picked[n_train + n_val:]))


def load_splits(corpus: str, seed: int = 0) -> Splits:
    """``split_documents(documents(corpus), seed)``."""
    return split_documents(documents(corpus), seed)


def corpus_info(seed: int = 0) -> dict:
    """The Python version and, per corpus and split, documents and UTF-8 bytes (for the report)."""
    info = {"python": sys.version.split()[0], "split_seed": seed}
    for corpus in CORPORA:
        splits = load_splits(corpus, seed)
        info[corpus] = {s: {"documents": len(splits[s]),
                            "bytes": sum(len(t.encode("utf-8", "surrogatepass")) for _, t in splits[s])}
                        for s in ("train", "validation", "test")}
    return info


# -- token streams and windows ------------------------------------------------------------------
def token_stream(docs: list, tokenizer=None) -> np.ndarray:
    """Every document's ``BOS text EOS`` ids, end to end: int64 (L,); the byte tokenizer by default."""
    tok = tokenizer or ByteTokenizer()
    ids = [tok.encode(text) + [tok.eos_token_id] for _, text in docs]
    return np.concatenate(ids).astype(np.int64) if docs else np.zeros(0, np.int64)


def cut_windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows (n, T+1) with window i = stream[i·T : i·T + T + 1] (T = seq_len); a short tail is dropped."""
    if seq_len < 1:
        raise ValueError(f"cut_windows: seq_len must be >= 1, got {seq_len}")
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise ValueError(f"cut_windows: a stream of {len(stream)} tokens holds no window of {seq_len + 1}")
    starts = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)          # (n, T+1) indices
    return stream[starts]


def spaced_windows(windows: np.ndarray, limit: int | None) -> np.ndarray:
    """At most ``limit`` windows, evenly spaced over the stream (all of them when None): a fixed evaluation set."""
    if limit is None or limit >= len(windows):
        return windows
    if limit < 1:
        raise ValueError(f"spaced_windows: limit must be >= 1, got {limit}")
    return windows[np.linspace(0, len(windows) - 1, limit).round().astype(int)]


def windows(docs: list, seq_len: int, limit: int | None = None) -> np.ndarray:
    """The documents' token stream cut into windows (n, T+1), at most ``limit`` of them, evenly spaced."""
    return spaced_windows(cut_windows(token_stream(docs), seq_len), limit)


class Batcher:
    """Global batches (B, T+1) of ``windows`` forever: every window once per epoch, in an order drawn
    from ``seed`` (a new order each epoch). Every rank of a data-parallel run draws the same batches."""

    def __init__(self, windows: np.ndarray, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"Batcher: batch_size must be >= 1, got {batch_size}")
        if len(windows) < batch_size:
            raise ValueError(f"Batcher: {len(windows)} windows can't fill a batch of {batch_size}")
        self.windows, self.batch_size = windows, batch_size
        self.rng = np.random.default_rng(seed)
        self.order, self.at, self.epoch = self.rng.permutation(len(windows)), 0, 0

    def next(self) -> np.ndarray:
        """The next (B, T+1) batch; a batch never spans two epochs (the remainder is left out)."""
        if self.at + self.batch_size > len(self.order):
            self.order, self.at, self.epoch = self.rng.permutation(len(self.windows)), 0, self.epoch + 1
        rows = self.order[self.at:self.at + self.batch_size]
        self.at += self.batch_size
        return self.windows[rows]
