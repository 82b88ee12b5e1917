"""Loading PEFT adapter files into a LoraModel: read, check on a scratch copy, then fill.

The file format lives in ``lowrank.io.adapter_files`` (functions that take the model); this
module is the tuner's side: it turns the file's fields into a ``LoraConfig``, injects the
adapter into a scratch copy of the model whose parameters share the model's arrays, checks
every tensor against it, and only then injects into the real model and copies the tensors
in, inside ``all_or_nothing`` so that even an unforeseen failure leaves the model exactly as
it was. Injection uses ``init_lora_weights=True`` whatever the config says (the tensors are
overwritten, and a PiSSA init would rewrite the base weights): a PiSSA adapter's A, B apply
to the residual base saved with it (``save_model`` after training).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ...io.adapter_files import (CONFIG_NAME, AdapterFileError, adapter_parameters, check_adapter_tensors, fill,
                                 inject, read_adapter, read_config_fields, scratch_copy)
from ...nn.snapshot import all_or_nothing
from .config import LoraConfig
from .names import check_adapter_name


def read_config(path, data: bytes | None = None) -> LoraConfig:
    """The LoraConfig in ``path`` (or in ``data``, its bytes); AdapterFileError naming the file."""
    return _config(path, read_config_fields(path, data))


def _config(path, fields: dict) -> LoraConfig:
    try:
        return LoraConfig(**fields)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{path}: {e}") from e


def _prepare(model_id, adapter_name, is_trainable, allow_nonfinite):
    """Read and check the files; (config as loaded, config to inject with, tensors, weights path)."""
    check_adapter_name(adapter_name)
    fields, tensors, weights_path = read_adapter(model_id, allow_nonfinite)
    config = dataclasses.replace(_config(Path(model_id) / CONFIG_NAME, fields), inference_mode=not is_trainable)
    return config, dataclasses.replace(config, init_lora_weights=True), tensors, weights_path


def load_adapter(model, model_id, adapter_name: str, is_trainable: bool = False, allow_nonfinite: bool = False):
    """Add the adapter saved in directory ``model_id`` to LoraModel ``model`` as ``adapter_name`` (not made
    active, so frozen until ``set_adapter``; PEFT's ``is_trainable=False`` also calls ``eval()``).

    Raises FileFormatError (a ValueError) naming the file and the problem; the model is then
    exactly as it was.
    """
    config, injected, tensors, weights_path = _prepare(model_id, adapter_name, is_trainable, allow_nonfinite)
    scratch = scratch_copy(model)
    inject(lambda: scratch.add_adapter(adapter_name, injected), Path(model_id) / CONFIG_NAME)
    checked = check_adapter_tensors(scratch, adapter_name, tensors, weights_path)
    with all_or_nothing(model):
        model.add_adapter(adapter_name, injected)
        fill(model, adapter_name, config, checked)
        for p in adapter_parameters(model, adapter_name, shared=False).values():
            p.trainable = False
        if not is_trainable:
            model.eval()


def from_pretrained(cls, model, model_id, adapter_name: str = "default", is_trainable: bool = False,
                    allow_nonfinite: bool = False):
    """Wrap base ``model`` in ``cls`` (LoraModel) with the adapter saved in ``model_id``, active;
    ``is_trainable=False`` (PEFT's default) freezes everything and calls ``eval()``. On error
    ``model`` is left as it was."""
    config, injected, tensors, weights_path = _prepare(model_id, adapter_name, is_trainable, allow_nonfinite)
    scratch = inject(lambda: cls(scratch_copy(model), injected, adapter_name), Path(model_id) / CONFIG_NAME)
    checked = check_adapter_tensors(scratch, adapter_name, tensors, weights_path)
    with all_or_nothing(model):
        lora_model = cls(model, injected, adapter_name)
        fill(lora_model, adapter_name, config, checked)
        if not is_trainable:
            lora_model.requires_grad_(False).eval()
    return lora_model
