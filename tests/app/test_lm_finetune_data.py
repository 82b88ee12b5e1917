"""``lowrank lm finetune --model DIR --data FILE`` on a tiny random transformers Llama with a BPE tokenizer
trained here and a ChatML chat template (tests/tiny_models.py):

    masks      each record kind's ids and labels, with the model's own tokenizer, against ids from
               transformers' AutoTokenizer and masks written by hand
    padding    a padded batch's loss is the token-weighted mean of its examples' losses alone
    PEFT       the final adapter loads in PEFT with logits equal to lowrank's
    resume     a run SIGKILLed at a random step after a checkpoint, or at a random moment with a checkpoint
               every step (often inside a save), then resumed, ends with the adapter of an uninterrupted
               run, bit for bit in float64
    bad input  one line naming the file and field, exit code 2, nothing written
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer
from transformers import LlamaForCausalLM as HFLlama

from lowrank.app.lm import evaluate_loss
from lowrank.io.tensor_files import read_tensor_file
from lowrank.io.tokenizer import load_tokenizer
from lowrank.models.llama import LlamaForCausalLM
from lowrank.training.sft import IGNORE_INDEX as M, pad_batch, tokenize_record
from lowrank.tuners.lora.model import LoraModel
from tiny_models import tiny_llama

CLI = [sys.executable, "-m", "lowrank.app.cli", "lm", "finetune"]
CHAT = [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four."},
        {"role": "user", "content": "and three?"}, {"role": "assistant", "content": "six."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A .jsonl of every record kind (40 records) and a .txt for validation."""
    root = tmp_path_factory.mktemp("data")
    records = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                             {"role": "assistant", "content": f"{2 * i}."}]} for i in range(16)]
    records += [{"prompt": f"def f{i}(x):", "completion": f"\n    return x + {i}\n"} for i in range(12)]
    records += [{"text": f"The quick brown fox number {i}."} for i in range(12)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "val.txt").write_text("for i in range(10):\n    print(i)\n" * 6)
    return root


def finetune(*flags, check=True):
    done = subprocess.run(CLI + [str(f) for f in flags], capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr
    return done


# -- masks -------------------------------------------------------------------------------------
def test_each_record_kind_masks_exactly_what_it_should_not_train(model_dir):
    ours, theirs = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    enc = lambda text: theirs.encode(text, add_special_tokens=False)        # noqa: E731
    eos = theirs.convert_tokens_to_ids("<|im_end|>")

    e = tokenize_record({"text": "def add(x, y):"}, ours, "f:1")
    assert e.input_ids.tolist() == e.labels.tolist() == theirs.encode("def add(x, y):") + [eos]

    e = tokenize_record({"prompt": "def f(x):", "completion": "\n    return x\n"}, ours, "f:2")
    prompt, completion = theirs.encode("def f(x):"), enc("\n    return x\n") + [eos]
    assert e.input_ids.tolist() == prompt + completion
    assert e.labels.tolist() == [M] * len(prompt) + completion

    e = tokenize_record({"messages": CHAT}, ours, "f:3")
    # by hand: ChatML, each assistant reply trained with its <|im_end|> and newline, the rest masked
    pieces = [("<|im_start|>user\nwhat is two plus two?<|im_end|>\n<|im_start|>assistant\n", False),
              ("four.<|im_end|>\n", True),
              ("<|im_start|>user\nand three?<|im_end|>\n<|im_start|>assistant\n", False),
              ("six.<|im_end|>\n", True)]
    ids = [t for text, _ in pieces for t in enc(text)]
    assert ids == enc(theirs.apply_chat_template(CHAT, tokenize=False))
    assert e.input_ids.tolist() == ids
    assert e.labels.tolist() == [t if trained else M for text, trained in pieces for t in enc(text)]


def test_a_padded_batch_loses_what_its_examples_lose_alone(model_dir):
    tok, model = load_tokenizer(model_dir), LlamaForCausalLM.from_pretrained(model_dir, dtype="float64")
    long = tokenize_record({"messages": CHAT}, tok, "f:1")
    short = tokenize_record({"prompt": "def f(x):", "completion": " x"}, tok, "f:2")
    counted = [int((e.labels[1:] != M).sum()) for e in (long, short)]
    alone = [evaluate_loss(model, [pad_batch([e], 0)]) for e in (long, short)]
    together = evaluate_loss(model, [pad_batch([long, short], 0)])
    assert len(short.input_ids) < len(long.input_ids)
    np.testing.assert_allclose(together, np.dot(alone, counted) / sum(counted), rtol=1e-12)


# -- the final adapter in PEFT -------------------------------------------------------------------
def test_the_final_adapter_loads_in_peft_with_equal_logits(model_dir, data, tmp_path):
    done = finetune("--model", model_dir, "--data", data / "train.jsonl", "--val-data", data / "val.txt",
                    "--steps", "6", "--batch-size", "4", "--lr", "1e-2", "--warmup", "1", "--eval-every", "3",
                    "--log-every", "2", "--target", "q_proj,v_proj,down_proj", "--dtype", "float64",
                    "--threads", "1", "--out", tmp_path / "run")
    lines = done.stdout.splitlines()
    assert any("step 2/6  loss " in line and " tok/s  ETA " in line for line in lines), done.stdout
    assert any("step 3/6  train loss " in line and " val loss " in line for line in lines), done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_info"]["train_examples"] == 40 and summary["history"]["step"] == [3, 6]

    ids = np.array([load_tokenizer(model_dir).encode("def f(x):\n    return x + 3\n")])
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype="float64")
    before = base.forward(ids)
    ours = LoraModel.from_pretrained(base, tmp_path / "run" / "adapter").forward(ids)
    hf = HFLlama.from_pretrained(model_dir, dtype=torch.float64)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf, tmp_path / "run" / "adapter").eval()(torch.from_numpy(ids)).logits
    # transformers keeps RMSNorm and the RoPE tables in float32 (tests/models/test_families_hf.py widens them
    # to reach 1e-10): equal to float32's rounding, while the adapter moves the logits far more than that
    scale = np.abs(theirs.numpy()).max()
    assert np.abs(ours - theirs.numpy()).max() / scale < 1e-6
    assert np.abs(ours - before).max() / scale > 1e-3
    tensors, _ = read_tensor_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(v.dtype == np.float64 for v in tensors.values())


# -- a killed run, resumed ---------------------------------------------------------------------
def test_a_run_killed_at_a_random_step_and_resumed_ends_with_the_same_adapter(model_dir, data, tmp_path):
    steps, save_every = 24, 3
    flags = ["--model", model_dir, "--data", data / "train.jsonl", "--val-fraction", "0.2", "--steps", steps,
             "--batch-size", "4", "--lr", "1e-2", "--warmup", "2", "--eval-every", "5", "--log-every", "1",
             "--dropout", "0.1", "--dtype", "float64", "--threads", "1", "--save-every", save_every]
    finetune(*flags, "--out", tmp_path / "whole")

    seed = int.from_bytes(os.urandom(4), "little")
    # after the first checkpoint, and 10 steps before the end, so that the kill lands before the run ends
    kill_at = int(np.random.default_rng(seed).integers(save_every + 1, steps - 10))
    run = subprocess.Popen(CLI + [str(f) for f in flags] + ["--out", str(tmp_path / "cut")],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in run.stdout:
        if f"step {kill_at}/{steps}" in line:
            run.send_signal(signal.SIGKILL)
            break
    run.wait(timeout=60)
    run.stdout.close()
    assert run.returncode == -signal.SIGKILL, f"the run ended before step {kill_at} (seed {seed})"
    assert not (tmp_path / "cut" / "adapter").exists() and (tmp_path / "cut" / "checkpoint").is_dir()

    done = finetune(*flags, "--out", tmp_path / "cut", "--resume")
    assert "resumed from" in done.stdout
    whole, _ = read_tensor_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed, _ = read_tensor_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert whole[name].dtype == np.float64
        assert np.array_equal(whole[name], resumed[name]), f"{name}: killed at step {kill_at} (seed {seed})"


def saved_step(state) -> int:
    """The step of the checkpoint whose trainer_state.json is ``state`` (0 while none, or while it is replaced)."""
    try:
        return json.loads(state.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def test_a_run_killed_at_a_random_moment_even_while_saving_resumes_to_the_same_adapter(model_dir, data, tmp_path):
    """--save-every 1: a checkpoint is being written most of the time, so a SIGKILL at a random moment after a
    random checkpoint often lands inside a save; the resumed run still ends with the uninterrupted run's adapter."""
    import time
    steps = 30
    flags = ["--model", model_dir, "--data", data / "train.jsonl", "--val-fraction", "0.2", "--steps", steps,
             "--batch-size", "4", "--lr", "1e-2", "--warmup", "2", "--eval-every", "10", "--dropout", "0.1",
             "--dtype", "float64", "--threads", "1", "--save-every", "1", "--quiet"]
    finetune(*flags, "--out", tmp_path / "whole")
    seed = int.from_bytes(os.urandom(4), "little")
    run = subprocess.Popen(CLI + [str(f) for f in flags] + ["--out", str(tmp_path / "cut")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = np.random.default_rng(seed)
    after, state = int(rng.integers(1, steps - 8)), tmp_path / "cut" / "checkpoint" / "trainer_state.json"
    while saved_step(state) < after and run.poll() is None:
        time.sleep(0.001)
    time.sleep(rng.uniform(0, 0.05))                                  # a step and its save take about 0.05 s
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL, f"the run ended before the kill after step {after} (seed {seed})"
    assert not (tmp_path / "cut" / "adapter").exists()

    done = finetune(*flags[:-1], "--out", tmp_path / "cut", "--resume")
    assert "resumed from" in done.stdout, done.stdout
    whole, _ = read_tensor_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed, _ = read_tensor_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert np.array_equal(whole[name], resumed[name]), f"{name} (seed {seed})"


# -- bad input -----------------------------------------------------------------------------------
def edited_model(model_dir, tmp_path, config=None, template=None):
    """A copy of the tiny model with config.json fields or the chat template replaced."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    if config:
        c = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**c, **config}))
    if template:
        t = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**t, "chat_template": template}))
    return folder


BAD = {  # name: (what to change, flags, the words the error line must hold)
    "bad line": ("lines", ['{"text": "ok"}', '{"text": "ok", ', '{"text": "ok"}'], ["data.jsonl:2", "not a JSON"]),
    "bad field": ("lines", ['{"text": "ok"}', '{"prompt": "a", "completion": 3}'],
                  ["data.jsonl:2", "'completion' must be a string"]),
    "empty dataset": ("lines", [], ["data.jsonl", "no examples"]),
    "longer than --max-seq-len": ("flags", ["--max-seq-len", "8"], ["train.jsonl:", "longer than --max-seq-len 8"]),
    "longer than the context": ("flags", ["--max-seq-len", "65"], ["config.json", "max_position_embeddings 64"]),
    "template raises": ("template", "{{ raise_exception('no chats here') }}",
                        ["train.jsonl:1", "tokenizer_config.json: chat_template", "no chats here"]),
    "too few examples": ("flags", ["--batch-size", "40"], ["train.jsonl", "36 training examples"]),
    "vocab against the weights": ("config", {"vocab_size": 100},
                                  ["config.json", "model.safetensors", "vocab_size 100"]),
    "wrong type": ("config", {"hidden_size": "32"}, ["config.json", "hidden_size"]),
    "absurd": ("config", {"num_hidden_layers": 0}, ["config.json", "num_hidden_layers"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(model_dir, data, tmp_path, case):
    kind, change, words = BAD[case]
    model, train, flags = model_dir, data / "train.jsonl", []
    if kind == "lines":
        train = tmp_path / "data.jsonl"
        train.write_text("".join(line + "\n" for line in change))
    elif kind == "flags":
        flags = change
    else:
        model = edited_model(model_dir, tmp_path, **{kind: change})
    done = finetune("--model", model, "--data", train, "--steps", "2", "--batch-size", "2", *flags,
                    "--out", tmp_path / "out", check=False)
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("lowrank lm: error: "), done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)
    assert not (tmp_path / "out").exists()


def test_resuming_with_another_base_is_refused_and_writes_nothing(model_dir, data, tmp_path):
    flags = ["--data", data / "train.jsonl", "--steps", "4", "--batch-size", "2", "--save-every", "2",
             "--out", tmp_path / "out"]
    finetune("--model", model_dir, *flags, "--threads", "1")
    shutil.rmtree(tmp_path / "out" / "adapter")
    (tmp_path / "out" / "summary.json").unlink()
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    other = tiny_llama(tmp_path / "other", seed=1, context=128)
    done = finetune("--model", other, *flags, "--resume", check=False)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "trainer_state.json: field 'settings.model'" in done.stderr, done.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
