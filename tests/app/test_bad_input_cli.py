"""Bad input through the commands that read the user's model and data, ``lowrank lm finetune --data``
and ``lowrank generate``: each case of issue #27's list is one line on stderr naming the file and the
field, exit status 2, no traceback, and nothing written (no --out folder, nothing on stdout), refused
before any training or generating starts.

The model is tests/tiny_models.py's tiny transformers Llama with its trained BPE and ChatML template;
each case edits a copy of it (or of the data) the way a user's folder goes wrong.
"""
import json
import shutil

import pytest
import transformers

import lowrank as lr
from lowrank.app import lm_finetune
from lowrank.app.cli import main
from lowrank.io.tensor_files import read_tensor_file
from lowrank.models.llama import LlamaForCausalLM
from tiny_models import tiny_llama

RAISES = "{{ raise_exception('no chats here') }}"
CHAT = {"messages": [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four."}]}
GOOD = [json.dumps({"text": f"The quick brown fox number {i}."}) for i in range(8)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Another tiny Llama (another seed, another context): its adapters and checkpoints are not the first's."""
    return tiny_llama(tmp_path_factory.mktemp("other") / "model", seed=1, context=128)


@pytest.fixture(scope="module")
def small_embedding(tmp_path_factory):
    """A model whose embedding has 300 rows under a tokenizer producing ids up to 319."""
    return tiny_llama(tmp_path_factory.mktemp("small") / "model", vocab_size=300)


@pytest.fixture(scope="module")
def wide_adapter(tmp_path_factory):
    """A LoRA adapter saved for another base: a Llama with hidden_size 48, not 32."""
    base = tmp_path_factory.mktemp("wide") / "model"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(base)
    lora = lr.get_lora_model(LlamaForCausalLM.from_pretrained(base),
                             lr.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    lora.save_pretrained(path)
    return path


def edited(model_dir, tmp_path, case):
    """A copy of the model folder with ``case``'s defect."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if case == "config missing":
        del config["hidden_size"]
    elif case == "config wrong type":
        config["num_attention_heads"] = "4"
    elif case == "config absurd":
        config["intermediate_size"] = 10 ** 12                  # not what the weights hold: refused before allocating
    elif case == "config zero":
        config["num_hidden_layers"] = 0
    elif case == "index outside":
        tensors, _ = read_tensor_file(folder / "model.safetensors")
        (folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {name: "../outside.safetensors" for name in tensors}}))
    elif case == "tokenizer unreadable":
        (folder / "tokenizer.json").write_text('{"model": ')
    elif case == "template syntax":
        t = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**t, "chat_template": "{{ messages }"}))
    elif case == "template raises":
        t = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**t, "chat_template": RAISES}))
    config_path.write_text(json.dumps(config))
    return folder


# case: (the words the line must hold: the file and the field)
MODEL_CASES = {
    "config missing": ["config.json", "hidden_size"],
    "config wrong type": ["config.json", "num_attention_heads"],
    "config absurd": ["config.json", "intermediate_size"],
    "config zero": ["config.json", "num_hidden_layers"],
    "index outside": ["model.safetensors.index.json", "../outside.safetensors", "outside the model directory"],
    "tokenizer unreadable": ["tokenizer.json", "not a tokenizers file"],
}


@pytest.fixture
def nothing_runs(monkeypatch):
    """Training or generating fails the test: every refusal comes before them."""
    def ran(*args, **kwargs):
        raise AssertionError("training or generating started before the input was checked")
    monkeypatch.setattr(lm_finetune, "finetune", ran)
    monkeypatch.setattr(LlamaForCausalLM, "generate", ran)


def refused(capsys, argv, command, words, out=None):
    """Run ``lowrank argv``: exit 2, one line on stderr holding ``words``, nothing on stdout, no ``out``."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith(f"lowrank {command}: error: "), err
    assert "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    assert captured.out == "", captured.out
    if out is not None:
        assert not out.exists()
    return err


def finetune_argv(model, data, out, *flags):
    return ["lm", "finetune", "--model", model, "--data", data, "--steps", 2, "--batch-size", 2, "--threads", 1,
            "--quiet", *flags, "--out", out]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# -- the model folder: both commands ---------------------------------------------------------------
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_bad_model_folder_through_lm_finetune(model_dir, tmp_path, capsys, nothing_runs, case):
    data = write_lines(tmp_path / "data.jsonl", GOOD)
    refused(capsys, finetune_argv(edited(model_dir, tmp_path, case), data, tmp_path / "out"), "lm",
            MODEL_CASES[case], tmp_path / "out")


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_bad_model_folder_through_generate(model_dir, tmp_path, capsys, nothing_runs, case):
    refused(capsys, ["generate", "--model", edited(model_dir, tmp_path, case), "--prompt", "def f(n):"],
            "generate", MODEL_CASES[case])


def test_a_tokenizer_larger_than_the_embedding_through_lm_finetune(small_embedding, tmp_path, capsys, nothing_runs):
    data = write_lines(tmp_path / "data.jsonl", GOOD)
    refused(capsys, finetune_argv(small_embedding, data, tmp_path / "out"), "lm",
            ["tokenizer.json", "config.json", "vocab_size is 300"], tmp_path / "out")


def test_a_tokenizer_larger_than_the_embedding_through_generate(small_embedding, capsys, nothing_runs):
    refused(capsys, ["generate", "--model", small_embedding, "--prompt", "def f(n):"], "generate",
            ["tokenizer.json", "config.json's vocab_size is 300"])


def test_a_chat_template_that_raises_through_lm_finetune(model_dir, tmp_path, capsys, nothing_runs):
    data = write_lines(tmp_path / "data.jsonl", [json.dumps(CHAT)] * 4)
    refused(capsys, finetune_argv(edited(model_dir, tmp_path, "template raises"), data, tmp_path / "out"), "lm",
            ["data.jsonl:1", "tokenizer_config.json", "chat_template", "no chats here"], tmp_path / "out")


def test_a_chat_template_that_raises_through_generate(model_dir, tmp_path, capsys, nothing_runs):
    refused(capsys, ["generate", "--model", edited(model_dir, tmp_path, "template raises"), "--chat", "hi"],
            "generate", ["tokenizer_config.json", "chat_template", "no chats here"])


def test_a_chat_template_that_does_not_parse_through_both_commands(model_dir, tmp_path, capsys, nothing_runs):
    model = edited(model_dir, tmp_path, "template syntax")
    words = ["tokenizer_config.json", "chat_template", "line 1", "not a valid Jinja template"]
    data = write_lines(tmp_path / "data.jsonl", [json.dumps(CHAT)] * 4)
    refused(capsys, finetune_argv(model, data, tmp_path / "out"), "lm", ["data.jsonl:1", *words], tmp_path / "out")
    refused(capsys, ["generate", "--model", model, "--chat", "hi"], "generate", words)


# -- the data: lm finetune ---------------------------------------------------------------------------
DATA_CASES = {  # case: (the file's lines, the words)
    "bad json line": ([*GOOD[:2], '{"text": "ok", ', *GOOD[2:]], ["data.jsonl:3", "not a JSON object"]),
    "bad field type": ([*GOOD, '{"prompt": "a", "completion": 3}'], ["data.jsonl:9", "'completion'"]),
    "missing field": ([*GOOD[:4], '{"prompt": "a"}', *GOOD[4:]], ["data.jsonl:5", "'completion'"]),
    "unknown keys": ([*GOOD[:1], '{"txt": "a"}'], ["data.jsonl:2", "'txt'"]),
    "not an object": ([*GOOD[:1], '["a"]'], ["data.jsonl:2", "JSON object"]),
    "bad message": ([*GOOD[:1], json.dumps({"messages": [{"role": "user"}]})], ["data.jsonl:2", "messages[0]"]),
    "empty": ([], ["data.jsonl", "no examples"]),
    "blank lines only": (["", "   ", ""], ["data.jsonl", "no examples"]),
    "longer than the context": ([*GOOD, json.dumps({"text": "The quick brown fox. " * 40})],
                                ["data.jsonl:9", "longer than the model's context", "config.json: max_position_embeddings 64"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
@pytest.mark.parametrize("which", ["--data", "--val-data"])
def test_a_bad_data_file_names_its_line_and_field(model_dir, tmp_path, capsys, nothing_runs, case, which):
    lines, words = DATA_CASES[case]
    bad = write_lines(tmp_path / "data.jsonl", lines)
    good = write_lines(tmp_path / "good.jsonl", GOOD)
    train, flags = (bad, []) if which == "--data" else (good, ["--val-data", bad])
    refused(capsys, finetune_argv(model_dir, train, tmp_path / "out", *flags), "lm", words, tmp_path / "out")


def test_an_empty_text_file_is_an_empty_dataset(model_dir, tmp_path, capsys, nothing_runs):
    (tmp_path / "data.txt").write_text("\n  \n")
    refused(capsys, finetune_argv(model_dir, tmp_path / "data.txt", tmp_path / "out"), "lm",
            ["data.txt", "no examples"], tmp_path / "out")


def test_a_max_seq_len_beyond_the_context_names_the_config(model_dir, tmp_path, capsys, nothing_runs):
    data = write_lines(tmp_path / "data.jsonl", GOOD)
    refused(capsys, finetune_argv(model_dir, data, tmp_path / "out", "--max-seq-len", 65), "lm",
            ["config.json", "max_position_embeddings 64"], tmp_path / "out")


def test_a_data_file_that_is_not_utf8_missing_or_not_jsonl(model_dir, tmp_path, capsys, nothing_runs):
    (tmp_path / "data.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    refused(capsys, finetune_argv(model_dir, tmp_path / "data.jsonl", tmp_path / "out"), "lm",
            ["data.jsonl", "UTF-8"], tmp_path / "out")
    refused(capsys, finetune_argv(model_dir, tmp_path / "none.jsonl", tmp_path / "out"), "lm",
            ["none.jsonl", "no such file"], tmp_path / "out")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    refused(capsys, finetune_argv(model_dir, tmp_path / "data.csv", tmp_path / "out"), "lm",
            ["data.csv", ".jsonl"], tmp_path / "out")


# -- a prompt longer than the context: generate -------------------------------------------------------
def test_a_prompt_longer_than_the_context_through_generate(model_dir, capsys, nothing_runs):
    refused(capsys, ["generate", "--model", model_dir, "--prompt", "The quick brown fox. " * 40], "generate",
            ["longer than the model's context of 64", "config.json: max_position_embeddings"])


# -- an adapter for another base -------------------------------------------------------------------------
def test_an_adapter_for_another_base_through_generate(model_dir, wide_adapter, capsys, nothing_runs):
    refused(capsys, ["generate", "--model", model_dir, "--adapter", wide_adapter, "--prompt", "def f(n):"],
            "generate", [str(wide_adapter), "adapter_model.safetensors"])


def test_a_checkpoint_of_another_base_through_lm_finetune_resume(model_dir, other_base, tmp_path, capsys):
    data = write_lines(tmp_path / "data.jsonl", GOOD)
    argv = finetune_argv(model_dir, data, tmp_path / "out", "--save-every", 1)
    assert main([str(a) for a in argv]) == 0
    shutil.rmtree(tmp_path / "out" / "adapter")
    (tmp_path / "out" / "summary.json").unlink()
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    refused(capsys, finetune_argv(other_base, data, tmp_path / "out", "--save-every", 1, "--resume"), "lm",
            ["trainer_state.json", "settings.model"])
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
