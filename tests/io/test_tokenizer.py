"""lowrank.io.tokenizer against transformers' AutoTokenizer on the same folders, built offline:
a byte-level BPE trained here (GPT-2/SmolLM style, ChatML tokens; tokenizer_class GPT2Tokenizer),
a Llama-3-style byte-level BPE (split regex, BOS from the post-processor, tokens listed only in
tokenizer_config.json; PreTrainedTokenizerFast) and a SentencePiece-style BPE (Metaspace, byte
fallback, <s> added by the post-processor, like Llama 2 and Mistral; LlamaTokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings, strategies as st
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from lowrank.io.tensor_files import FileFormatError
from lowrank.io.tokenizer import (BYTE_TOKENIZER_FILE, ByteTokenizer, DecodeStream, Tokenizer, check_vocab,
                                  load_tokenizer)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; don't panic!",
    "def add(x, y):\n    return x + y\n\n\nclass Point:\n\tpass\n",
    "Ünïcödé tëxt: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, العربية",
    "Emoji 👍🏽 🎉 ❤️ 👨‍👩‍👧 and combining marks: e\u0301 a\u0308 n\u0303",
    "   leading spaces, trailing spaces   \n\n\n  tabs\t\there\r\nwindows line",
    "numbers 1234567890 3.14159 1e-5 0xFF",
] * 20
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>"]
LLAMA3_LISTED = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]     # only in tokenizer_config.json
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SP_SPECIAL = ["<unk>", "<s>", "</s>"]

FIXED_TEXTS = [
    "", " ", "hello", " hello", "Hello, world!", "  two  spaces  ", "\n", "\n\n\n", "\t\tx", " \r\n ",
    "naïve café", "日本語", "👍🏽🎉", "👨‍👩‍👧", "e\u0301\u0302", "\u200b\ufeff", "�", "\u0000",
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|><|im_start|>", "a<|endoftext|>b", "<|im_end", "<s>hi</s>",
    "[INST] hi [/INST]", "<|begin_of_text|><|start_header_id|>", "<0x41>", "▁hello ▁", "   ",
]


def byte_level_bpe(special, split_regex=None) -> tokenizers.Tokenizer:
    """A byte-level BPE trained on CORPUS: GPT-2's pre-tokenizer, or a Split regex then bytes (Llama 3)."""
    tok = tokenizers.Tokenizer(models.BPE())
    if split_regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def sentencepiece_bpe() -> tokenizers.Tokenizer:
    """Llama 2 / Mistral's layout: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then pieces;
    Metaspace ("▁" for spaces, prepended to the first piece), byte fallback, BOS by the post-processor."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SP_SPECIAL,
                                                        show_progress=False))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    bytes_ = {f"<0x{b:02X}>": len(SP_SPECIAL) + b for b in range(256)}
    vocab = {**{t: i for t, i in vocab.items() if i < len(SP_SPECIAL)}, **bytes_,
             **{t: i + 256 for t, i in vocab.items() if i >= len(SP_SPECIAL)}}
    data["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True)
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def write_folder(folder: Path, tok: tokenizers.Tokenizer, config: dict, generation: dict | None = None,
                 template_file: str | None = None) -> Path:
    """A model folder's tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    if template_file is not None:
        (folder / "chat_template.jinja").write_text(template_file)
    return folder


def chatml_folder(folder: Path, template_file: str | None = None, chat_template: str | None = None) -> Path:
    """SmolLM2's layout: ChatML tokens trained in, bos <|im_start|>, eos <|im_end|>, unk <|endoftext|>."""
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "clean_up_tokenization_spaces": False,
              "add_prefix_space": False, "model_max_length": 8192}
    if chat_template is not None:
        config["chat_template"] = chat_template
    return write_folder(folder, byte_level_bpe(CHATML), config, {"bos_token_id": 1, "eos_token_id": 2},
                        template_file)


def llama3_folder(folder: Path, chat_template: str | None = None) -> Path:
    """Llama 3's layout: BOS added by a TemplateProcessing after ByteLevel; the header tokens exist
    only in tokenizer_config.json's added_tokens_decoder; generation stops on two ids."""
    tok = byte_level_bpe(LLAMA3, LLAMA3_SPLIT)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
                                      special_tokens=[("<|begin_of_text|>", 0)])])
    base = tok.get_vocab_size()
    listed = {str(base + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                              "single_word": False, "special": True} for i, t in enumerate(LLAMA3_LISTED)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|eot_id|>", "added_tokens_decoder": listed, "clean_up_tokenization_spaces": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    return write_folder(folder, tok, config, {"bos_token_id": 0, "eos_token_id": [1, base + 2]})


def sentencepiece_folder(folder: Path, chat_template: str | None = None) -> Path:
    """Mistral's layout: <s>/</s>/<unk>, add_bos_token true, BOS from the post-processor."""
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
              "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    return write_folder(folder, sentencepiece_bpe(), config, {"bos_token_id": 1, "eos_token_id": 2})


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"chatml": chatml_folder(root / "chatml"), "llama3": llama3_folder(root / "llama3"),
            "sentencepiece": sentencepiece_folder(root / "sentencepiece")}


@pytest.fixture(scope="module")
def pairs(folders):
    """name -> (ours, transformers')."""
    return {name: (Tokenizer.from_pretrained(f), AutoTokenizer.from_pretrained(f)) for name, f in folders.items()}


def assert_same(ours, theirs, text):
    """encode (with and without special tokens) and decode (with and without skipping) agree."""
    for add in (True, False):
        ids = theirs.encode(text, add_special_tokens=add)
        assert ours.encode(text, add_special_tokens=add) == ids, (text, add)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("name", ["chatml", "llama3", "sentencepiece"])
def test_encode_decode_match_transformers_on_fixed_texts(pairs, name):
    ours, theirs = pairs[name]
    for text in FIXED_TEXTS + CORPUS[:6]:
        assert_same(ours, theirs, text)


PIECES = st.sampled_from(CHATML + LLAMA3 + LLAMA3_LISTED + SP_SPECIAL + [
    "  ", "   ", "\n\n", " \t ", "\r\n", "é", "e\u0301", "👍🏽", "🎉", "日本", " the", "<0x41>", "▁", "<|im_"])
TEXT = st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), PIECES),
                max_size=8).map("".join)


@settings(max_examples=60, deadline=None)
@given(text=TEXT, name=st.sampled_from(["chatml", "llama3", "sentencepiece"]))
def test_encode_decode_match_transformers_on_generated_text(pairs, text, name):
    ours, theirs = pairs[name]
    assert_same(ours, theirs, text)
    if name != "sentencepiece":     # byte-level BPE is lossless; Llama 2's decoder drops a leading space
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(["chatml", "llama3", "sentencepiece"]))
def test_decode_of_any_ids_and_the_stream_match(pairs, data, name):
    """Arbitrary id sequences (split characters, lone bytes, specials): decode matches transformers,
    and the stream's pieces concatenate to decode's text."""
    ours, theirs = pairs[name]
    ids = data.draw(st.lists(st.one_of(st.integers(0, len(ours) - 1), st.integers(0, 40), st.integers(3, 258)),
                             max_size=20))      # any id; often specials and (sentencepiece's) byte tokens
    skip = data.draw(st.booleans())
    assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    stream = DecodeStream(ours, skip_special_tokens=skip)
    assert "".join([stream.put(i) for i in ids] + [stream.end()]) == ours.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [False, True])
def test_stream_keeps_a_byte_run_whole_across_skipped_specials(pairs, skip):
    """<0x00> <unk> <0x80>: skipping <unk> joins the bytes into one invalid run, "\ufffd\ufffd"."""
    ours, theirs = pairs["sentencepiece"]
    ids = [3, 0, 3 + 0x80]
    expected = "\ufffd\ufffd" if skip else "\x00<unk>\ufffd"
    assert theirs.decode(ids, skip_special_tokens=skip) == expected
    stream = DecodeStream(ours, skip_special_tokens=skip)
    assert "".join([stream.put(i) for i in ids] + [stream.end()]) == expected


@pytest.mark.parametrize("name", ["chatml", "llama3", "sentencepiece"])
def test_stream_holds_back_incomplete_characters(pairs, name):
    ours, _ = pairs[name]
    text = "Hi 👨‍👩‍👧 naïve 日本語 e\u0301!"
    ids = ours.encode(text, add_special_tokens=False)
    stream = DecodeStream(ours)
    pieces = [stream.put(i) for i in ids]
    assert "".join(pieces) + stream.end() == text
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 1      # it streams, not one piece at the end


def test_special_tokens_and_ids_match_transformers(pairs, folders):
    for name, (ours, theirs) in pairs.items():
        assert len(ours) == len(theirs), name
        assert ours.vocab_size == theirs.vocab_size, name
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            assert getattr(ours, attr) == getattr(theirs, attr), (name, attr)
        assert ours.special_tokens_map == theirs.special_tokens_map, name
    llama3, _ = pairs["llama3"]
    base = llama3.vocab_size
    assert [llama3.backend_tokenizer.token_to_id(t) for t in LLAMA3_LISTED] == [base, base + 1, base + 2]
    assert llama3.stop_token_ids == [1, base + 2]          # generation_config.json's list
    assert llama3.eos_token_id == base + 2                  # tokenizer_config.json's <|eot_id|>
    assert pairs["chatml"][0].stop_token_ids == [2]
    sp, _ = pairs["sentencepiece"]
    assert sp.encode("hi")[0] == 1 and sp.encode("hi", add_special_tokens=False)[0] != 1


def test_generation_config_fills_ids_the_tokenizer_config_leaves_unset(tmp_path):
    folder = write_folder(tmp_path, byte_level_bpe(CHATML), {}, {"bos_token_id": 1, "eos_token_id": [2, 0],
                                                                 "pad_token_id": 0})
    tok = Tokenizer.from_pretrained(folder)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.stop_token_ids) == (1, 2, 0, [2, 0])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id"):
        Tokenizer.from_pretrained(folder)


def test_special_tokens_map_json_wins_when_the_config_lists_no_tokens(tmp_path):
    folder = write_folder(tmp_path, byte_level_bpe(CHATML), {"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>", "special": True}, "bos_token": "<new_bos>"}))
    ours, theirs = Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.special_tokens_map == theirs.special_tokens_map
    assert (ours.eos_token_id, ours.bos_token_id, len(ours)) == (theirs.eos_token_id, theirs.bos_token_id, len(theirs))
    assert ours.eos_token_id == 0 and ours.bos_token_id == len(ours) - 1     # <new_bos> was added


def test_check_vocab_names_the_file_and_field(pairs):
    ours, _ = pairs["llama3"]
    check_vocab(ours, len(ours), "config.json")
    check_vocab(ours, len(ours) + 64, "config.json")        # a padded embedding is fine
    with pytest.raises(ValueError, match=rf"tokenizer.json: .* ids up to {len(ours) - 1} but config.json's "
                                         rf"vocab_size is {ours.vocab_size}") as info:
        check_vocab(ours, ours.vocab_size, "config.json")
    assert "\n" not in str(info.value)
    sp, _ = pairs["sentencepiece"]
    sp_stop = Tokenizer(sp.backend_tokenizer, {"eos_token": "</s>"}, generation_ids={"eos_token_id": [len(sp) + 3]})
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id\[0\] is"):
        check_vocab(sp_stop, len(sp), "config.json")


def test_load_tokenizer_byte_folders_and_bad_folders(tmp_path, folders):
    assert isinstance(load_tokenizer(folders["chatml"]), Tokenizer)
    shipped = Path(__file__).resolve().parents[2] / "lowrank" / "models" / "checkpoints"
    for folder in shipped.iterdir():
        assert (folder / BYTE_TOKENIZER_FILE).is_file() and isinstance(load_tokenizer(folder), ByteTokenizer)
        marker = json.loads((folder / BYTE_TOKENIZER_FILE).read_text())
        config = json.loads((folder / "config.json").read_text())
        assert marker["vocab_size"] == config["vocab_size"]
    with pytest.raises(FileFormatError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a tokenizers file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    folder = write_folder(tmp_path / "bad", byte_level_bpe(CHATML), {"bos_token": 7})
    with pytest.raises(ValueError, match="tokenizer_config.json: bos_token must be a string"):
        load_tokenizer(folder)


def test_the_byte_tokenizer_streams_a_character_split_over_ids():
    """DecodeStream works on ByteTokenizer too: a multi-byte character comes out once its last byte arrived."""
    tok = ByteTokenizer()
    ids = tok.encode("aé€😀")
    stream = DecodeStream(tok)
    pieces = [stream.put(i) for i in ids] + [stream.end()]
    assert "".join(pieces) == "aé€😀" and pieces[:3] == ["", "a", ""]
