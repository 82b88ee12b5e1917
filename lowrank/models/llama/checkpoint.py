"""transformers checkpoints of the Llama-style families (``families``): read a ``save_pretrained`` folder,
write one transformers loads.

A folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``) plus its
shards. Tensor names are the model's ``named_parameters()`` names; a tied ``lm_head.weight`` is
absent, as in transformers' files. float16/bfloat16/float32 tensors are upcast to the requested
dtype (float64 tensors need ``dtype="float64"``: narrowing is refused, not done silently).

Loading checks everything before changing anything (``lowrank.io.model_files``: integrity,
names, shapes, dtypes, finiteness; FileFormatError naming the file and the tensor) and copies
the arrays in under ``all_or_nothing``, so a failed load leaves no model half-loaded.
Saving writes both files with ``commit_files``: all or nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...io.atomic import commit_files
from ...nn.snapshot import all_or_nothing
from ...io.model_files import FileFormatError, check_tensors, read_tensor_file, tensor_file_bytes
from ...io.tensor_files import cast_for_saving
from .configuration import LlamaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def _shard_names(folder: Path) -> dict:
    """{shard file path: [tensor names the folder says it holds]}; FileFormatError when neither layout is there."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return {single: None}                                  # None: whatever the single file holds
    if not index.is_file():
        raise FileFormatError(f"{folder}: no {WEIGHTS_NAME} and no {INDEX_NAME}: not a folder written by "
                              f"save_pretrained (or saved without safetensors)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise FileFormatError(f"{index}: not a valid safetensors index (needs a 'weight_map' of "
                              f"tensor name -> shard file): {e!r}") from e
    shards: dict = {}
    for name, shard in weight_map.items():
        shards.setdefault(folder / shard, []).append(name)
    return shards


def read_checkpoint(folder) -> dict:
    """{shard file path: {tensor name: array}}, each shard's integrity checked and matched to the index."""
    out = {}
    for path, listed in _shard_names(Path(folder)).items():
        tensors, _ = read_tensor_file(path)
        if listed is not None and set(tensors) != set(listed):
            raise FileFormatError(f"{path}: the index lists {sorted(listed)} for this shard, but it holds "
                                  f"{sorted(tensors)}")
        out[path] = tensors
    return out


def load_weights(model, folder):
    """Copy a checkpoint's tensors into ``model`` (a LlamaForCausalLM): all checked first, then all copied."""
    shards = read_checkpoint(folder)
    expected = {n: (p.shape, p.dtype, "parameter") for n, p in model.named_parameters()}
    found = {name: path for path, tensors in shards.items() for name in tensors}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        files = sorted({str(found[n]) for n in unexpected}) or [str(p) for p in shards]
        hint = (" (tie_word_embeddings is true in config.json: lm_head shares embed_tokens.weight and is not "
                "stored)" if "lm_head.weight" in unexpected else "")
        raise FileFormatError(f"{', '.join(files)}: missing tensors {missing}, unexpected tensors {unexpected}{hint}")
    checked = {}
    for path, tensors in shards.items():                         # names the shard and tensor on a bad shape/dtype
        checked.update(check_tensors(path, {n: expected[n] for n in tensors}, tensors))
    with all_or_nothing(model):
        model.load_state_dict(checked)
    return model


def from_pretrained(cls, folder, *, dtype="float32"):
    """A ``cls`` (LlamaForCausalLM) in ``dtype`` built from ``folder/config.json`` and loaded from its tensors."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise FileFormatError(f"{folder / CONFIG_NAME}: file not found (a save_pretrained folder holds "
                              f"{CONFIG_NAME} beside the tensors)")
    config = LlamaConfig.from_json_file(folder / CONFIG_NAME)
    return load_weights(cls(config, dtype=dtype, seed=0), folder)


def save_pretrained(model, folder, *, overwrite: bool = False, dtype: str | None = None,
                    metadata: dict | None = None, extra_files: dict | None = None):
    """Write ``config.json`` and ``model.safetensors`` (transformers' names; the model's dtype, or
    ``dtype`` such as "bfloat16"; ``metadata`` strings in the tensor file's header), plus any
    ``extra_files`` {name: bytes}, as one all-or-nothing commit."""
    config = model.config.to_dict()
    config["dtype"] = str(dtype or model.dtype)
    files = {CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), **(extra_files or {})}
    files[WEIGHTS_NAME] = tensor_file_bytes(cast_for_saving(model.state_dict(), dtype), metadata, bind=files)
    commit_files(folder, files, overwrite=overwrite)
