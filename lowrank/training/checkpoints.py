"""Resumable training state: what determines every later step, saved as one folder and restored exactly.

A checkpoint folder holds

    adapter/ or model/     the weights as the run's output would be (PEFT files, or a transformers folder)
    state.safetensors      every trainable parameter by name, and Adam's moments exp_avg, exp_avg_sq
    trainer_state.json     the step, Adam's step counts, the data position (the batcher's order, place in
                           it, epoch and generator state), every generator the model draws from (LoRA
                           dropout's, by module name), and the run's settings (``settings``)

written by ``save_checkpoint`` as one commit (``io.atomic.one_commit``): a run killed while saving leaves
the previous checkpoint whole, or the new one once ``read_trainer_state`` finishes the commit.
``load_checkpoint`` puts it all back, so that the steps after it are the steps an uninterrupted run would
have taken, bit for bit. The parameters are restored from ``state.safetensors`` in their own dtype
(``adapter/`` is for the user: PEFT loads it), and a checkpoint whose settings differ from the run's
(another base model, other data, another rank) is refused, naming the field.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STATE_FILE = "state.safetensors"
TRAINER_FILE = "trainer_state.json"
VERSION = 1


def generators(model) -> dict:
    """{module name: np.random.Generator} of every module of ``model`` that draws from one (``_rng``)."""
    return {name: m._rng for name, m in model.named_modules() if isinstance(getattr(m, "_rng", None),
                                                                             np.random.Generator)}


def batcher_state(batcher) -> dict:
    """A Batcher's data position: its order, the place in it, the epoch and its generator's state."""
    return {"order": [int(i) for i in batcher.order], "at": int(batcher.at), "epoch": int(batcher.epoch),
            "rng": batcher.rng.bit_generator.state}


def set_batcher_state(batcher, state: dict):
    """Put a ``batcher_state`` back."""
    batcher.order, batcher.at, batcher.epoch = np.asarray(state["order"], np.int64), state["at"], state["epoch"]
    batcher.rng.bit_generator.state = state["rng"]


def trainable_names(model, optimizer) -> dict:
    """{id(parameter): name} of the parameters ``optimizer`` updates."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {id(p): names[id(p)] for g in optimizer.param_groups for p in g["params"]}


def save_checkpoint(folder, model, optimizer, batcher, step: int, settings: dict, weights_name: str):
    """Write the checkpoint of ``model`` after ``step`` optimizer steps into ``folder`` (replacing an older
    one) as one commit; ``weights_name`` is "adapter" or "model" (``model.save_pretrained`` writes it)."""
    from ..io.atomic import commit_files, one_commit
    from ..io.tensor_files import tensor_file_bytes
    folder = Path(folder)
    names = trainable_names(model, optimizer)
    tensors, adam_steps = {}, {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            name, state = names[id(p)], optimizer.state.get(id(p), {})
            tensors[f"param/{name}"] = p.data
            if state:
                tensors[f"exp_avg/{name}"], tensors[f"exp_avg_sq/{name}"] = state["exp_avg"], state["exp_avg_sq"]
                adam_steps[name] = int(state["step"])
    trainer = {"version": VERSION, "step": step, "optimizer_steps": optimizer.steps, "adam_steps": adam_steps,
               "data": batcher_state(batcher), "settings": settings,
               "generators": {name: rng.bit_generator.state for name, rng in generators(model).items()}}
    with one_commit(folder, overwrite=True):
        model.save_pretrained(folder / weights_name, overwrite=True)
        commit_files(folder, {STATE_FILE: tensor_file_bytes(tensors),
                              TRAINER_FILE: (json.dumps(trainer, indent=1) + "\n").encode()}, overwrite=True)


def read_trainer_state(folder, settings: dict) -> dict:
    """``trainer_state.json`` of the checkpoint in ``folder``; ValueError naming the file and field for a
    missing checkpoint or one written with other ``settings``."""
    from ..io.atomic import finish_interrupted_commits
    path = Path(folder) / TRAINER_FILE
    if Path(folder).is_dir():
        finish_interrupted_commits(folder)               # a run killed while saving: its save completes
    if not path.is_file():
        raise ValueError(f"--resume: no checkpoint in {folder} ({TRAINER_FILE} not found); a run writes one "
                         f"every --save-every steps")
    try:
        trainer = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({e})") from None
    if not isinstance(trainer, dict):
        raise ValueError(f"{path}: a checkpoint's trainer state is a JSON object, got {type(trainer).__name__}")
    if trainer.get("version") != VERSION:
        raise ValueError(f"{path}: field 'version' must be {VERSION}, got {trainer.get('version')!r}")
    saved = trainer.get("settings")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: field 'settings' must be an object")
    for key, value in settings.items():
        if saved.get(key) != value:
            raise ValueError(f"{path}: field 'settings.{key}' is {saved.get(key)!r} but this run has {value!r}: "
                             f"the checkpoint is another run's (resume with that run's flags)")
    return trainer


def load_checkpoint(folder, model, optimizer, batcher, trainer: dict) -> int:
    """Restore the checkpoint in ``folder`` (``trainer`` from ``read_trainer_state``) into ``model``, ``optimizer``
    and ``batcher``, built as the run that wrote it built them; returns the step it was taken after."""
    from ..io.tensor_files import read_tensor_file
    path = Path(folder) / STATE_FILE
    tensors, _ = read_tensor_file(path)
    names = trainable_names(model, optimizer)
    expected = {f"param/{n}" for n in names.values()}
    if not expected <= set(tensors):
        missing = sorted(expected - set(tensors))[0]
        raise ValueError(f"{path}: no tensor {missing!r}: the checkpoint is for another model or adapter")
    for g in optimizer.param_groups:
        for p in g["params"]:
            name = names[id(p)]
            saved = tensors[f"param/{name}"]
            if saved.shape != p.data.shape or saved.dtype != p.data.dtype:
                raise ValueError(f"{path}: tensor 'param/{name}' is {saved.dtype} {saved.shape}, the model's is "
                                 f"{p.data.dtype} {p.data.shape}: the checkpoint is for another base or adapter")
            p.data[...] = saved
            if name in trainer["adam_steps"]:
                optimizer.state[id(p)] = {"step": trainer["adam_steps"][name],
                                          "exp_avg": np.array(tensors[f"exp_avg/{name}"]),
                                          "exp_avg_sq": np.array(tensors[f"exp_avg_sq/{name}"])}
    optimizer.steps = trainer["optimizer_steps"]
    set_batcher_state(batcher, trainer["data"])
    rngs = generators(model)
    if set(rngs) != set(trainer["generators"]):
        raise ValueError(f"{Path(folder) / TRAINER_FILE}: field 'generators' names {sorted(trainer['generators'])}, "
                         f"the model draws from {sorted(rngs)}")
    for name, rng in rngs.items():
        rng.bit_generator.state = trainer["generators"][name]
    return int(trainer["step"])
