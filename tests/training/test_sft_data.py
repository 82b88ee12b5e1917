"""Fine-tuning data files: records to ids and labels, the masks checked token by token against
masks written by hand, with a character tokenizer whose every token is one visible character."""
import json

import numpy as np
import pytest

from lowrank.training.sft import (IGNORE_INDEX, DataError, load_examples, pad_batch, split_validation,
                                  tokenize_record)

BOS, EOS = 1, 2
M = IGNORE_INDEX


class CharTokenizer:
    """One id per character (ord + 10), BOS = 1 added in front, EOS = 2; a ChatML-like template."""

    bos_token_id, eos_token_id, pad_token_id = BOS, EOS, 0

    def encode(self, text, add_special_tokens=True):
        return [BOS] * add_special_tokens + [ord(c) + 10 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        text = "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages)
        return text + "<a>" * add_generation_prompt


def ids(text):
    return [ord(c) + 10 for c in text]


def test_text_trains_every_token():
    e = tokenize_record({"text": "hi"}, CharTokenizer(), "f:1")
    assert e.input_ids.tolist() == [BOS, *ids("hi"), EOS]
    assert e.labels.tolist() == [BOS, *ids("hi"), EOS]


def test_prompt_completion_trains_the_completion_and_its_eos_only():
    e = tokenize_record({"prompt": "ab", "completion": "c"}, CharTokenizer(), "f:1")
    assert e.input_ids.tolist() == [BOS, *ids("ab"), *ids("c"), EOS]
    assert e.labels.tolist() == [M, M, M, *ids("c"), EOS]


def test_messages_train_the_assistant_turns_only():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "r"},
            {"role": "assistant", "content": "B"}]
    e = tokenize_record({"messages": chat}, CharTokenizer(), "f:1")
    text = "<s>s|<u>q|<a>A|<u>r|<a>B|"
    assert e.input_ids.tolist() == ids(text)
    # by hand: the generation prompt "<a>" belongs to the prompt; the reply and its "|" are trained
    trained = "." * len("<s>s|<u>q|<a>") + "AA" + "." * len("<u>r|<a>") + "BB"
    assert len(trained) == len(text)
    assert e.labels.tolist() == [t if c != "." else M for t, c in zip(ids(text), trained)]


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_jsonl_file_gives_one_example_per_record_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path, [json.dumps({"text": "a"}), "", json.dumps({"prompt": "b", "completion": "c"})])
    examples = load_examples(path, CharTokenizer(), max_seq_len=16)
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:3"]


def test_a_txt_file_is_cut_into_windows_that_predict_every_token_once(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("abcdefghij")                                  # BOS + 10 chars + EOS = 12 tokens
    examples = load_examples(path, CharTokenizer(), max_seq_len=5)
    stream = [BOS, *ids("abcdefghij"), EOS]
    assert [e.input_ids.tolist() for e in examples] == [stream[0:5], stream[4:9], stream[8:12]]
    predicted = sum(len(e.input_ids) - 1 for e in examples)
    assert predicted == len(stream) - 1


@pytest.mark.parametrize("line, message", [
    ("{not json", "data.jsonl:2: not a JSON object"),
    ("[1, 2]", "data.jsonl:2: a record is a JSON object, got list"),
    ('{"txt": "a"}', "data.jsonl:2: a record has 'text'"),
    ('{"text": 3}', "data.jsonl:2: field 'text' must be a string, got int"),
    ('{"prompt": "a"}', "data.jsonl:2: missing field 'completion'"),
    ('{"messages": []}', "data.jsonl:2: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "data.jsonl:2: field 'messages' has no assistant"),
    ('{"text": "' + "x" * 40 + '"}', "data.jsonl:2: 42 tokens, longer than --max-seq-len 16"),
])
def test_a_bad_line_is_named_with_its_file_line_and_field(tmp_path, line, message):
    path = _write(tmp_path, [json.dumps({"text": "fine"}), line])
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_examples(path, CharTokenizer(), max_seq_len=16)


def test_an_empty_file_is_refused(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        load_examples(_write(tmp_path, [""]), CharTokenizer(), max_seq_len=16)
    with pytest.raises(DataError, match=r"\.txt or \.jsonl"):
        load_examples(_write(tmp_path, ["a"], "data.csv"), CharTokenizer(), max_seq_len=16)


def test_a_template_that_does_not_extend_its_prefix_is_refused():
    class Reordering(CharTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
            return "".join(m["content"] for m in reversed(messages)) + "<a>" * add_generation_prompt
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(DataError, match="prefix"):
        tokenize_record({"messages": chat}, Reordering(), "f:1")


def test_padding_masks_the_padded_positions():
    tok = CharTokenizer()
    a, b = tokenize_record({"text": "abc"}, tok, "1"), tokenize_record({"prompt": "d", "completion": "e"}, tok, "2")
    batch = pad_batch([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[BOS, *ids("abc"), EOS], [BOS, *ids("de"), EOS, 0]]
    assert batch.labels.tolist() == [[BOS, *ids("abc"), EOS], [M, M, *ids("e"), EOS, M]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]


def test_validation_split_is_seeded_disjoint_and_complete():
    examples = list(range(10))
    train, val = split_validation(examples, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == examples
    assert split_validation(examples, 0.2, seed=3) == (train, val)
    assert split_validation(examples, 0.2, seed=4) != (train, val)
    with pytest.raises(DataError, match="--val-fraction"):
        split_validation(examples, 1.0, seed=0)


def test_masks_of_a_real_chatml_template_cover_the_replies_exactly(tmp_path):
    """The piecewise tokenization of a byte-level BPE with ChatML: the trained tokens decode to each
    reply and its end-of-turn, and the ids equal the whole rendering's encoding."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["hello there, how are you? fine thanks"] * 20, trainer)
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    tok.chat_template = template
    chat = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"},
            {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine"}]
    e = tokenize_record({"messages": chat}, tok, "f:1")
    whole = tok.apply_chat_template(chat, tokenize=False)
    assert e.input_ids.tolist() == tok.encode(whole, add_special_tokens=False)
    trained = np.flatnonzero(e.labels != M)
    runs = np.split(trained, np.flatnonzero(np.diff(trained) > 1) + 1)
    assert [tok.decode(e.input_ids[r]) for r in runs] == ["fine thanks<|im_end|>\n", "fine<|im_end|>\n"]
