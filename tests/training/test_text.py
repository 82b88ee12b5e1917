"""The text every Python ships, the byte tokenizer and the next-token windows (lowrank.training.text).

    tokenizer  decode(encode(s)) == s for any str (lone surrogates too); BOS/EOS around the bytes;
               specials dropped on decode; bad ids refused
    splits     by document: disjoint, covering, the same for the same seed, another for another seed
    windows    window i = stream[i·T : i·T + T + 1]: every token after the first predicted once
"""
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from lowrank.training import text
from lowrank.io.tokenizer import ByteTokenizer
from lowrank.training.text import Batcher, cut_windows, spaced_windows, split_documents, token_stream

tok = ByteTokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.booleans())
def test_decode_inverts_encode_on_any_text(s, bos):
    ids = tok.encode(s, add_special_tokens=bos)
    body = s.encode("utf-8", "surrogatepass")
    assert ids == [256] * bos + list(body)
    assert tok.decode(ids) == s


def test_specials_and_layout():
    assert tok.encode("aé") == [256, 97, 0xC3, 0xA9]
    assert token_stream([("a", "aé"), ("b", "")]).tolist() == [256, 97, 0xC3, 0xA9, 257, 256, 257]
    assert tok.decode([258, 256, 104, 105, 257, 258]) == "hi"              # PAD, BOS, EOS dropped
    assert tok.vocab_size == 259 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert tok.decode([0xC3]) == "\ufffd"                                  # a sampled half character
    assert tok.decode(np.zeros(0, np.int64)) == ""
    assert tok.decode(tok.encode("a\ud800b\udfff")) == "a\ud800b\udfff"         # lone surrogates round-trip too


@pytest.mark.parametrize("ids", [[259], [-1], [1.5]])
def test_decode_refuses_ids_outside_the_vocabulary(ids):
    with pytest.raises((ValueError, TypeError), match="ByteTokenizer.decode"):
        tok.decode(ids)


def test_encode_refuses_bytes():
    with pytest.raises(TypeError, match="expected a str"):
        tok.encode(b"abc")


@given(st.integers(3, 60), st.integers(0, 2**32 - 1))
def test_splits_are_disjoint_cover_everything_and_repeat_for_a_seed(n, seed):
    docs = [(f"doc{i:03d}", f"text {i}") for i in range(n)]
    s = split_documents(docs, seed)
    names = [[name for name, _ in s[k]] for k in ("train", "validation", "test")]
    assert sorted(sum(names, [])) == [name for name, _ in docs]              # disjoint and covering
    assert all(len(x) >= 1 for x in names)
    assert split_documents(docs, seed) == s


def test_the_real_corpora_split_the_same_way_twice_and_differently_by_seed():
    for corpus in text.CORPORA:
        a, b, c = text.load_splits(corpus, 0), text.load_splits(corpus, 0), text.load_splits(corpus, 1)
        assert a == b and a.validation != c.validation
        names = [{n for n, _ in a[k]} for k in ("train", "validation", "test")]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


def test_the_code_corpus_is_capped_and_leaves_tests_site_packages_and_pydoc_out():
    docs = text.stdlib_documents()
    assert len(docs) > 50 and [n for n, _ in docs] == sorted(n for n, _ in docs)
    assert sum(len(t.encode("utf-8", "surrogatepass")) for _, t in docs) <= text.STDLIB_MAX_BYTES
    for name, _ in docs:
        parts = name.split("/")
        assert name.endswith(".py") and not set(parts[:-1]) & text.SKIPPED_FOLDERS


def test_corpus_info_names_the_python_version_and_sizes():
    info = text.corpus_info(0)
    assert info["python"] == sys.version.split()[0]
    assert info["pydoc"]["train"]["bytes"] > 300_000 and info["stdlib"]["validation"]["documents"] >= 1


@given(st.integers(2, 300), st.integers(1, 20))
def test_windows_predict_every_token_once(L, T):
    stream = np.arange(L, dtype=np.int64) * 7
    if L - 1 < T:
        with pytest.raises(ValueError, match="no window"):
            cut_windows(stream, T)
        return
    w = cut_windows(stream, T)
    assert w.shape == ((L - 1) // T, T + 1)
    for i in range(len(w)):
        np.testing.assert_array_equal(w[i], stream[i * T:i * T + T + 1])
    predicted = w[:, 1:].reshape(-1)                                        # what CausalLMLoss targets
    np.testing.assert_array_equal(predicted, stream[1:1 + len(predicted)])


def test_batcher_covers_each_window_once_per_epoch_and_repeats_for_a_seed():
    windows = cut_windows(np.arange(101, dtype=np.int64), 4)               # 25 windows of 5
    b1, b2 = Batcher(windows, 6, seed=3), Batcher(windows, 6, seed=3)
    epoch = np.concatenate([b1.next() for _ in range(4)])                   # 24 of 25: the remainder is left out
    assert epoch.shape == (24, 5) and len({tuple(r) for r in epoch}) == 24
    np.testing.assert_array_equal(epoch, np.concatenate([b2.next() for _ in range(4)]))
    b1.next()
    assert b1.epoch == 1
    assert not np.array_equal(Batcher(windows, 6, seed=4).next(), Batcher(windows, 6, seed=3).next())
    with pytest.raises(ValueError, match="can't fill"):
        Batcher(windows[:3], 6)


def test_spaced_windows_are_a_fixed_even_sample():
    w = cut_windows(np.arange(1001, dtype=np.int64), 10)                   # 100 windows
    s = spaced_windows(w, 5)
    assert s[:, 0].tolist() == [0, 250, 500, 740, 990] and spaced_windows(w, None) is w
