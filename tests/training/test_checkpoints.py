"""Resumable checkpoints (training/checkpoints.py) in one process: steps continued from a reloaded
checkpoint equal the steps continued in memory, bit for bit in float64 (Adam's moments, the data order
and LoRA dropout's generators included), and a checkpoint of another run or another adapter is refused."""
import numpy as np
import pytest

from lowrank.app.lm import train_steps
from lowrank.io.tokenizer import load_tokenizer
from lowrank.models.llama import LlamaForCausalLM
from lowrank.nn.optim import Adam
from lowrank.training.checkpoints import (STATE_FILE, TRAINER_FILE, generators, load_checkpoint,
                                          read_trainer_state, save_checkpoint)
from lowrank.training.sft import ExampleBatcher, batches, tokenize_record
from lowrank.training.text import Batcher
from lowrank.tuners.lora.config import LoraConfig
from lowrank.tuners.lora.model import get_lora_model
from tiny_models import tiny_llama

SETTINGS = {"model": "tiny", "r": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def examples(folder):
    tok = load_tokenizer(folder)
    return [tokenize_record({"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}."}, tok, f"d:{i}")
            for i in range(7)]


def lora_model(folder, r=4, dropout=0.2):
    base = LlamaForCausalLM.from_pretrained(folder, dtype="float64")
    return get_lora_model(base, LoraConfig(r=r, lora_alpha=8, lora_dropout=dropout,
                                           target_modules=["q_proj", "v_proj"]))


def run(model, optimizer, batcher, val, steps, start, on_step=None):
    train_steps(model, batcher, val, steps=steps, lr=1e-2, warmup=1, eval_every=100, optimizer=optimizer,
                start=start, on_step=on_step)


def trainable(model):
    return {n: p.data.copy() for n, p in model.named_parameters() if p.trainable}


def test_resuming_from_a_saved_checkpoint_takes_the_same_steps(folder, examples, tmp_path):
    val = batches(examples[:2], 2, 2)
    model = lora_model(folder)
    optimizer, batcher = Adam(model.parameters(trainable_only=True), lr=1e-2), ExampleBatcher(examples, 3, 1, 2)

    def save_at_4(i, opt):
        if i == 4:
            save_checkpoint(tmp_path / "ckpt", model, opt, batcher, i, SETTINGS, "adapter")
    run(model, optimizer, batcher, val, steps=9, start=0, on_step=save_at_4)        # crosses two epochs
    whole = trainable(model)

    again = lora_model(folder)
    assert len(generators(again)) == 4                     # q_proj and v_proj of 2 layers draw dropout masks
    opt2, batcher2 = Adam(again.parameters(trainable_only=True), lr=1e-2), ExampleBatcher(examples, 3, 1, 2)
    start = load_checkpoint(tmp_path / "ckpt", again, opt2, batcher2, read_trainer_state(tmp_path / "ckpt", SETTINGS))
    assert start == 4 and opt2.steps == 4
    run(again, opt2, batcher2, val, steps=9, start=start)
    resumed = trainable(again)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert np.array_equal(whole[name], resumed[name]), name
    assert not np.array_equal(whole[name], trainable(lora_model(folder))[name])    # it did train


def test_the_data_position_of_both_batchers_is_restored(tmp_path, folder, examples):
    model = lora_model(folder)
    optimizer = Adam(model.parameters(trainable_only=True), lr=1e-2)
    for make in (lambda: Batcher(np.arange(50).reshape(10, 5), 3, 7), lambda: ExampleBatcher(examples, 3, 7, 2)):
        a, b = make(), make()
        for _ in range(4):                                 # into the second epoch
            a.next()
        save_checkpoint(tmp_path / "c", model, optimizer, a, 4, SETTINGS, "adapter")
        load_checkpoint(tmp_path / "c", model, optimizer, b, read_trainer_state(tmp_path / "c", SETTINGS))
        for _ in range(5):                                 # a Batch is (ids, labels, mask), each (B, T)
            assert np.array_equal(np.asarray(a.next()), np.asarray(b.next()))


def test_a_checkpoint_holds_the_adapter_state_and_trainer_files(tmp_path, folder, examples):
    model = lora_model(folder)
    optimizer = Adam(model.parameters(trainable_only=True), lr=1e-2)
    save_checkpoint(tmp_path / "c", model, optimizer, ExampleBatcher(examples, 2, 0, 2), 0, SETTINGS, "adapter")
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == sorted(["adapter", STATE_FILE, TRAINER_FILE])
    assert sorted(p.name for p in (tmp_path / "c" / "adapter").iterdir()) == ["adapter_config.json",
                                                                              "adapter_model.safetensors"]


def test_a_checkpoint_of_another_run_or_adapter_is_refused(tmp_path, folder, examples):
    model = lora_model(folder)
    optimizer, batcher = Adam(model.parameters(trainable_only=True), lr=1e-2), ExampleBatcher(examples, 2, 0, 2)
    save_checkpoint(tmp_path / "c", model, optimizer, batcher, 3, SETTINGS, "adapter")
    with pytest.raises(ValueError, match=r"trainer_state.json: field 'settings.model' is 'tiny' but this run has "
                                         r"'other'"):
        read_trainer_state(tmp_path / "c", {**SETTINGS, "model": "other"})
    with pytest.raises(ValueError, match=r"--resume: no checkpoint in"):
        read_trainer_state(tmp_path / "none", SETTINGS)
    wider = lora_model(folder, r=8)
    opt = Adam(wider.parameters(trainable_only=True), lr=1e-2)
    with pytest.raises(ValueError, match=r"state.safetensors: tensor 'param/.*lora_A.*' is float64 \(4, 32\), the "
                                         r"model's is float64 \(8, 32\)"):
        load_checkpoint(tmp_path / "c", wider, opt, batcher, read_trainer_state(tmp_path / "c", SETTINGS))
