"""``lowrank generate`` on a transformers model folder: a tiny random Llama saved by transformers'
``save_pretrained``, a byte-level BPE trained here with ``tokenizers``, a ChatML chat template and a
generation_config.json whose ``eos_token_id`` is a list.

Oracles: transformers' ``generate`` (float64, greedy) then its tokenizer's ``decode`` on the same
folder, for --prompt, --chat and a left-padded batch; PEFT's ``generate`` through the same adapter
with the adapter folder's own chat template; and a model built to write a known text: its layers
add nothing to the residual stream and its head maps each token's embedding to the next token of
"🦜日é!", so the expected output is that text, an emoji and a CJK character split over byte tokens,
stopped by the second id of the generation_config.json list.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import lowrank as lr
from lowrank.app.cli import main, printable
from lowrank.app import generate as generate_cli
from lowrank.models.llama import LlamaForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]          # ids 0, 1, 2
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
ADAPTER_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' says:\\n' + "
                    "message['content'] + '<|im_end|>' }}{% endfor %}{{ '<|im_start|>assistant says:\\n' }}")
CORPUS = ["def add(x, y):\n    return x + y\n", "The quick brown fox jumps over the lazy dog.",
          "naïve café, Straße, ελληνικά", "user: what is two plus two? assistant: four."] * 5
KNOWN = "🦜日é!"                                                  # not in CORPUS: split over byte tokens


def bpe() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def model_folder(folder, generation: dict, seed=0, context=96):
    """A random transformers Llama (GQA 4 over 2 heads, d = 32, untied head) with the BPE, in ``folder``."""
    tok = bpe()
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=context, tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config)
    hf.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_prefix_space": False,
        "clean_up_tokenization_spaces": False}))
    (folder / "chat_template.jinja").write_text(CHATML)
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("gen") / "model",
                        {"bos_token_id": 1, "eos_token_id": [2, 0], "do_sample": False, "max_new_tokens": 10})


def hf_generate(folder, ids_rows, **kwargs):
    """transformers' greedy generate in float64 on each prompt alone: [new ids]."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    out = []
    for ids in ids_rows:
        x = torch.tensor([ids])
        out.append(hf.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0, len(ids):].tolist())
    return out


def cli(capsys, *args):
    """(printed rows without their headers, stderr) of one successful ``lowrank generate``."""
    assert main(["generate", *map(str, args)]) == 0
    captured = capsys.readouterr()
    blocks = captured.out.split("--- prompt ")[1:]
    return [b.split(") ---\n", 1)[1].removesuffix("\n") for b in blocks], captured.err


def test_greedy_prompt_equals_transformers_generate_then_decode(folder, capsys):
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = "def add(x, y):"
    ids = auto(prompt)["input_ids"]
    expected = auto.decode(ids + hf_generate(folder, [ids])[0], skip_special_tokens=True)
    rows, _ = cli(capsys, "--model", folder, "--prompt", prompt, "--dtype", "float64")      # 10 new: the file's
    assert rows == [printable(expected, keep="\n\t")]
    assert len(auto(expected)["input_ids"]) > len(ids)                                      # it generated something


def test_greedy_chat_equals_transformers_apply_chat_template_generate_decode(folder, capsys):
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is two plus two?"}]
    ids = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert auto.decode(ids).endswith("<|im_start|>assistant\n")
    new = hf_generate(folder, [ids], max_new_tokens=7)[0]
    rows, _ = cli(capsys, "--model", folder, "--chat", messages[1]["content"], "--system", "Be brief.",
                  "--max-new-tokens", 7, "--dtype", "float64")
    assert rows == [printable(auto.decode(new, skip_special_tokens=True), keep="\n\t")]


def test_several_prompts_one_left_padded_batch_equal_each_alone_in_transformers(folder, capsys):
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    prompts = ["The quick brown fox", "x", "café = naïve"]
    ids = [auto(p)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) == 3                                                  # padded to the longest
    news = hf_generate(folder, ids, max_new_tokens=6)
    rows, _ = cli(capsys, "--model", folder, *sum([["--prompt", p] for p in prompts], []), "--max-new-tokens", 6,
                  "--dtype", "float64")
    stops = (0, 2)
    expected = [auto.decode(i + (n[:next((k + 1 for k, t in enumerate(n) if t in stops), len(n))]),
                            skip_special_tokens=True) for i, n in zip(ids, news)]
    assert rows == [printable(e, keep="\n\t") for e in expected]


def test_the_python_api_takes_a_left_padded_batch_of_different_lengths(folder):
    model = LlamaForCausalLM.from_pretrained(folder, dtype="float64")
    rows = [[5, 9, 40, 7, 3], [11], [60, 61, 62]]
    ids, mask = generate_cli._left_padded(rows, 2)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[2, 0], pad_token_id=2)
    expected = hf_generate(folder, rows, max_new_tokens=8)                   # eos [2, 0] from generation_config.json
    for b, row in enumerate(rows):
        new = batch[b, ids.shape[1]:]
        np.testing.assert_array_equal(new[:len(expected[b])], expected[b])
        assert (new[len(expected[b]):] == 2).all()                           # padding after its stop id
        alone = model.generate(np.array([row]), max_new_tokens=8, eos_token_id=[2, 0])[0, len(row):]
        np.testing.assert_array_equal(alone, expected[b])


# -- a model that writes a known text: streaming and stop ids --------------------------------------
@pytest.fixture(scope="module")
def writer(tmp_path_factory):
    """A folder whose greedy continuation of "ab" is KNOWN, then <|endoftext|> (id 0, the second stop id), then
    "ZQ" (which a generation that ignores the list would print): each layer's o_proj and down_proj are 0, so the
    last hidden state is the last token's embedding, and lm_head row next(t) is t's (orthonormal) embedding."""
    folder = model_folder(tmp_path_factory.mktemp("writer") / "model",
                          {"eos_token_id": [2, 0], "max_new_tokens": 40})
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    chain = auto("ab")["input_ids"][-1:] + auto(KNOWN)["input_ids"] + [0] + auto("ZQ")["input_ids"]
    assert len(set(chain)) == len(chain) and len(auto(KNOWN)["input_ids"]) > len(KNOWN)    # characters split
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    d = hf.config.hidden_size
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = torch.linalg.qr(torch.randn(d, len(chain), generator=torch.Generator().manual_seed(0)))[0].T
        hf.model.embed_tokens.weight[chain] = basis                                        # (len(chain), d)
        hf.lm_head.weight.zero_()
        hf.lm_head.weight[chain[1:]] = 10 * basis[:-1]                                     # row next(t) = e_t
    hf.save_pretrained(folder)
    return folder


class Recorder:
    """sys.stdout that keeps each write, and a marker for each model forward in between."""

    def __init__(self):
        self.events = []

    def write(self, text):
        self.events.append(text)

    def flush(self):
        pass


def test_streaming_prints_each_character_once_complete_and_stops_at_a_listed_stop_id(writer, monkeypatch):
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    real = LlamaForCausalLM.forward
    monkeypatch.setattr(LlamaForCausalLM, "forward",
                        lambda self, *a, **k: out.events.append(None) or real(self, *a, **k))
    assert main(["generate", "--model", str(writer), "--prompt", "ab"]) == 0
    text = "".join(e for e in out.events if e is not None)
    assert text == "--- prompt 1 (base model) ---\nab" + KNOWN + "\n"                  # stopped at id 0, not "ZQ"
    chunks = [e for e in out.events if e]
    assert "\ufffd" not in text and all(c in chunks for c in ("🦜", "日", "é"))           # whole characters
    steps = [i for i, e in enumerate(out.events) if e is None]
    assert out.events.index("🦜") < steps[-1]                                            # printed while generating
    auto = transformers.AutoTokenizer.from_pretrained(writer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(writer)
    ids = auto("ab")["input_ids"]
    assert auto.decode(hf.generate(torch.tensor([ids]), max_new_tokens=40)[0], skip_special_tokens=True) == "ab" + KNOWN


def test_transformers_text_streamer_prints_the_same_through_lowrank_generate(writer, capsys):
    """``streamer`` follows transformers' protocol: its own TextStreamer works on lowrank's generate."""
    auto = transformers.AutoTokenizer.from_pretrained(writer)
    model = LlamaForCausalLM.from_pretrained(writer)
    ids = np.array([auto("ab")["input_ids"]])
    model.generate(ids, max_new_tokens=40, eos_token_id=[2, 0],
                   streamer=transformers.TextStreamer(auto, skip_special_tokens=True))
    assert capsys.readouterr().out == "ab" + KNOWN + "\n"


# -- settings from generation_config.json, adapters and their chat templates ------------------------
def test_sampling_settings_come_from_generation_config_and_flags_override(tmp_path, capsys):
    folder = model_folder(tmp_path / "model", {"eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_k": 5,
                                               "top_p": 0.9, "max_new_tokens": 6})
    model = LlamaForCausalLM.from_pretrained(folder, dtype="float64")
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    ids = np.array([auto("The quick")["input_ids"]])
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, seed=3,
                             eos_token_id=2)
    greedy = model.generate(ids, max_new_tokens=6, eos_token_id=2)
    hot = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=3.0, top_k=5, top_p=0.9, seed=3,
                         eos_token_id=2)
    assert not np.array_equal(sampled, greedy) and not np.array_equal(sampled, hot)     # the settings matter
    for flags, expected in [([], sampled), (["--greedy"], greedy), (["--temperature", 3.0], hot)]:
        rows, _ = cli(capsys, "--model", folder, "--prompt", "The quick", "--seed", 3, "--dtype", "float64", *flags)
        assert rows == [printable(auto.decode(expected[0], skip_special_tokens=True), keep="\n\t")], flags


def test_max_length_in_generation_config_counts_the_prompt_as_transformers_does(tmp_path, capsys):
    folder = model_folder(tmp_path / "model", {"eos_token_id": 2, "max_length": 11})
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    ids = auto("The quick")["input_ids"]
    new = hf_generate(folder, [ids])[0]                                   # transformers reads max_length itself
    assert len(ids) + len(new) == 11 or 2 in new
    rows, _ = cli(capsys, "--model", folder, "--prompt", "The quick", "--dtype", "float64")
    assert rows == [printable(auto.decode(ids + new, skip_special_tokens=True), keep="\n\t")]


@pytest.fixture(scope="module")
def adapter(folder, tmp_path_factory):
    """A LoRA adapter (random B) for ``folder``'s model, saved with a chat template of its own."""
    lora = lr.get_lora_model(LlamaForCausalLM.from_pretrained(folder),
                             lr.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    rng = np.random.default_rng(0)
    for _, layer in lora.lora_layers():
        for n in layer.lora_B:
            layer.lora_B[n].data = rng.standard_normal(layer.lora_B[n].shape).astype(layer.lora_B[n].dtype)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    lora.save_pretrained(path)
    (path / "chat_template.jinja").write_text(ADAPTER_TEMPLATE)
    return path


def test_an_adapter_folder_brings_its_chat_template_and_matches_peft(folder, adapter, capsys):
    import peft
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "two plus two?"}]
    ids = auto.apply_chat_template(messages, chat_template=ADAPTER_TEMPLATE, add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
    tuned = peft.PeftModel.from_pretrained(hf, adapter).eval()
    x = torch.tensor([ids])
    new = tuned.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=6)[0, len(ids):].tolist()
    rows, _ = cli(capsys, "--model", folder, "--adapter", f"mine={adapter}", "--chat", "two plus two?",
                  "--max-new-tokens", 6, "--dtype", "float64")
    assert rows == [printable(auto.decode(new, skip_special_tokens=True), keep="\n\t")]
    base, _ = cli(capsys, "--model", folder, "--chat", "two plus two?", "--max-new-tokens", 6, "--dtype", "float64")
    assert base != rows


def test_a_mixed_chat_batch_gives_each_row_its_adapter_and_its_template(folder, adapter, tmp_path, capsys):
    """Row i through adapter i, rendered with adapter i's chat template (the base's for a folder without one):
    the rows of one left-padded batch equal each run alone."""
    import shutil
    plain = shutil.copytree(adapter, tmp_path / "plain")
    (plain / "chat_template.jinja").unlink()
    args = ["--model", folder, "--max-new-tokens", 5, "--dtype", "float64"]
    specs, chats = [f"mine={adapter}", str(plain), "__base__"], ["two plus two?", "hi", "what is the fox?"]
    mixed, _ = cli(capsys, *args, *sum([["--adapter", a, "--chat", c] for a, c in zip(specs, chats)], []))
    assert len(mixed) == 3
    for a, c, row in zip(specs, chats, mixed):
        alone, _ = cli(capsys, *args, *([] if a == "__base__" else ["--adapter", a]), "--chat", c)
        assert alone == [row], a


# -- bad input: one line, exit 2 ----------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--temperature", "1e-400"], r"--temperature must be a finite number > 0, got 0.0"),
    (["--temperature", "inf"], r"--temperature must be a finite number > 0, got inf"),
    (["--temperature", "nan"], r"--temperature must be a finite number > 0, got nan"),
    (["--greedy", "--top-k", "3"], "--greedy contradicts"),
    (["--system", "hi"], "--system goes with --chat"),
    (["--chat", "hi"], "give --prompt .* or --chat .*, not both"),
    (["--adapter", "__base__=x"], "needs a name other than"),
    (["--adapter", "nowhere"], "no such folder nowhere"),
])
def test_bad_flags_are_one_line_and_exit_2(folder, capsys, args, match):
    import re
    assert main(["generate", "--model", str(folder), "--prompt", "ab", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowrank generate: error: ") and re.search(match, err), err


@pytest.mark.parametrize("case, match", [
    ("vocab", r"tokenizer.json: the tokenizer produces ids up to 359 but \S*bad/config.json's vocab_size is 100"),
    ("eos", r"generation_config.json: eos_token_id\[1\] is 100000 but \S*bad/config.json's vocab_size is 360"),
    ("temperature", r"generation_config.json: temperature must be a finite number > 0, got 'hot'"),
    ("max_length", r"generation_config.json: max_length 2 leaves no room after a prompt of \d+ tokens"),
    ("no_template", "has no chat template"),
])
def test_bad_folders_are_one_line_and_exit_2_before_generating(folder, tmp_path, capsys, monkeypatch, case, match):
    import re
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    generation = {"eos_token_id": 2}
    if case == "vocab":                                                   # an embedding smaller than the tokenizer
        config = transformers.AutoConfig.from_pretrained(bad)
        config.vocab_size = 100
        transformers.LlamaForCausalLM(config).save_pretrained(bad)
    elif case == "eos":
        generation["eos_token_id"] = [2, 100000]
    elif case == "temperature":
        generation.update(do_sample=True, temperature="hot")
    elif case == "max_length":
        generation["max_length"] = 2
    elif case == "no_template":
        (bad / "chat_template.jinja").unlink()
    (bad / "generation_config.json").write_text(json.dumps(generation))
    monkeypatch.setattr(LlamaForCausalLM, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    prompt = ["--chat", "hi"] if case == "no_template" else ["--prompt", "ab"]
    capsys.readouterr()
    assert main(["generate", "--model", str(bad), *prompt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowrank generate: error: ") and re.search(match, err), err


def test_ids_of_a_padded_embedding_without_text_print_nothing_as_transformers_decodes_them(folder, tmp_path, capsys):
    """An embedding larger than the tokenizer (models pad it to a round size) is accepted: an id with no token
    decodes to no text, in the stream as in transformers' decode."""
    import shutil
    padded = shutil.copytree(folder, tmp_path / "padded")
    config = transformers.AutoConfig.from_pretrained(padded)
    config.vocab_size = 400                                               # the tokenizer's ids end at 359
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        hf.lm_head.weight[380:] *= 1.5                                    # so that greedy picks some ids >= 360
    hf.save_pretrained(padded)
    auto = transformers.AutoTokenizer.from_pretrained(padded)
    ids = auto("The quick")["input_ids"]
    new = hf_generate(padded, [ids], max_new_tokens=12)[0]
    assert any(t >= 360 for t in new) and any(t < 360 for t in new), new
    rows, _ = cli(capsys, "--model", padded, "--prompt", "The quick", "--max-new-tokens", 12, "--dtype", "float64")
    assert rows == [printable(auto.decode(ids + new, skip_special_tokens=True), keep="\n\t")]


def test_a_folder_lm_pretrain_writes_generates_with_the_byte_tokenizer(tmp_path, capsys):
    """`lowrank lm pretrain` marks its folder byte-level (byte_tokenizer.json), so generate finds its tokenizer."""
    out = tmp_path / "pretrained"
    assert main(["lm", "pretrain", "--quick", "--quiet", "--steps", "2", "--out", str(out)]) == 0
    capsys.readouterr()
    rows, _ = cli(capsys, "--model", out, "--prompt", "def ", "--max-new-tokens", 5, "--dtype", "float64")
    model = LlamaForCausalLM.from_pretrained(out, dtype="float64")
    ids = model.generate(np.array([[256, *b"def "]]), max_new_tokens=5, eos_token_id=257)   # BOS, the bytes
    assert rows == [printable(bytes(i for i in ids[0, 1:] if i < 256).decode("utf-8", "replace"), keep="\n\t")]
