"""transformers checkpoints of the Llama-style families (``families``): read a ``save_pretrained`` folder,
write one transformers loads.

A folder holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (``{"weight_map": {tensor name: shard file}}``) plus its
shards. Tensor names are the model's ``named_parameters()`` names; a tied ``lm_head.weight`` is
absent, as in transformers' files. float16/bfloat16/float32 tensors are upcast to the requested
dtype (float64 tensors need ``dtype="float64"``: narrowing is refused, not done silently).

Loading checks everything before changing anything (``lowrank.io.model_files``: integrity,
names, shapes, dtypes, finiteness; FileFormatError naming the file and the tensor) and puts the
arrays in under ``all_or_nothing``, so a failed load leaves no model half-loaded. ``from_pretrained``
checks what config.json claims (layer count, every tensor's name and shape) against the tensor
files' headers before it builds anything, so a few edited bytes of config can't make it allocate
gigabytes, and builds the model without its random init; the loaded arrays become the parameters
(views of the file's private map where no conversion was needed), so the weights are held once.
Shard names in the index must be files inside the folder (no absolute paths, no "..", no symlink
leading out), as transformers requires; they are checked before any file is opened.
Saving writes both files with ``commit_files``: all or nothing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ...io.atomic import commit_files
from ...nn.module import block_views
from ...nn.snapshot import all_or_nothing
from ...io.model_files import FileFormatError, check_tensors, read_tensor_file, tensor_file_bytes
from ...io.tensor_files import MAX_HEADER_BYTES, cast_for_saving, parse_header
from .configuration import LlamaConfig
from .gguf import from_gguf

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
        shards.setdefault(_inside(folder, index, shard), []).append(name)
    return shards


def _inside(folder: Path, index: Path, shard: str) -> Path:
    """``folder / shard``, refused (never opened) unless it names a file inside ``folder``, links resolved."""
    path = folder / shard
    root = os.path.realpath(folder)
    if os.path.isabs(shard) or os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise FileFormatError(f"{index}: shard {shard[:200]!r} points outside the model directory {folder}; "
                              f"shards must be files inside it")
    return path


def read_shapes(folder) -> dict:
    """{tensor name: (shape, shard path)} from the shards' headers only (no tensor data read)."""
    out = {}
    for path, _ in _shard_names(Path(folder)).items():
        if not path.is_file():
            raise FileFormatError(f"{path}: file not found")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if 0 < n <= min(size - 8, MAX_HEADER_BYTES):      # else parse_header refuses it, naming the file
                head += f.read(n)
            entries, _, _ = parse_header(path, head, size)
        out.update({name: (shape, path) for name, (_, shape, _) in entries.items()})
    return out


def expected_shapes(config: LlamaConfig) -> dict:
    """{parameter name: shape} of the LlamaForCausalLM ``config`` describes, without building it."""
    V, d, I, h = config.vocab_size, config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * h, config.num_key_value_heads * h
    out = {"model.embed_tokens.weight": (V, d)}
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out.update({a + "q_proj.weight": (q, d), a + "k_proj.weight": (kv, d), a + "v_proj.weight": (kv, d),
                    a + "o_proj.weight": (d, q)})
        if config.qkv_bias:
            out.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
        if config.attention_bias:
            out[a + "o_proj.bias"] = (d,)
        if config.qk_norm:
            out.update({a + "q_norm.weight": (h,), a + "k_norm.weight": (h,)})
        out.update({m + "gate_proj.weight": (I, d), m + "up_proj.weight": (I, d), m + "down_proj.weight": (d, I)})
        if config.mlp_bias:
            out.update({m + "gate_proj.bias": (I,), m + "up_proj.bias": (I,), m + "down_proj.bias": (d,)})
        out.update({f"model.layers.{i}.input_layernorm.weight": (d,),
                    f"model.layers.{i}.post_attention_layernorm.weight": (d,)})
    out["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (V, d)
    return out


def _check_layer_count(config_path, d: dict, shapes: dict):
    """config.json's num_hidden_layers against the layers the tensors hold, before anything is sized by it."""
    layers = {int(m.group(1)) for name in shapes for m in [re.match(r"model\.layers\.(\d+)\.", name)] if m}
    claimed = d.get("num_hidden_layers", LlamaConfig.num_hidden_layers)
    if type(claimed) is int and claimed != len(layers):
        raise FileFormatError(f"{config_path}: num_hidden_layers is {claimed}, but the checkpoint holds "
                              f"{len(layers)} decoder layers (model.layers.N.*)")


def check_claims(config_path, config: LlamaConfig, shapes: dict):
    """Every tensor config.json implies, by name and shape, against the checkpoint's headers."""
    expected = expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        hint = (" (tie_word_embeddings is true in config.json: lm_head shares embed_tokens.weight and is not "
                "stored)" if "lm_head.weight" in unexpected else "")
        raise FileFormatError(f"{config_path} does not match the checkpoint beside it: missing tensors "
                              f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected tensors "
                              f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}{hint}")
    for name, shape in expected.items():
        found, path = shapes[name]
        if tuple(found) != tuple(shape):
            raise FileFormatError(f"{config_path} does not match {path}: {name!r} has shape {tuple(found)}, but "
                                  f"config.json ({_sizes(config_path, config)}) gives {tuple(shape)}")


def _sizes(config_path, config: LlamaConfig) -> str:
    """The sizes that shape the tensors, each marked when config.json lacks it (LlamaConfig's default was used)."""
    try:
        given = json.loads(Path(config_path).read_text())
    except (OSError, ValueError):
        given = {}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    return ", ".join(f"{k} {getattr(config, k)}" + ("" if k in given or k == "head_dim" else " (absent: the default)")
                     for k in keys)


def read_checkpoint(folder, allow_nonfinite: bool = False) -> dict:
    """{shard file path: {tensor name: array}}, each shard's integrity checked and matched to the index."""
    out = {}
    for path, listed in _shard_names(Path(folder)).items():
        tensors, _ = read_tensor_file(path, allow_nonfinite)
        if listed is not None and set(tensors) != set(listed):
            raise FileFormatError(f"{path}: the index lists {sorted(listed)} for this shard, but it holds "
                                  f"{sorted(tensors)}")
        out[path] = tensors
    return out


def load_weights(model, folder, allow_nonfinite: bool = False):
    """Put a checkpoint's tensors into ``model`` (a LlamaForCausalLM): all checked first, then all assigned
    (the freshly read arrays become the parameters: nothing else holds them). Tensors in the model's dtype stay
    views of the file's map; the others are cast into one block (``block_views``), never held twice."""
    shards = read_checkpoint(folder, allow_nonfinite)
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
        checked.update(check_tensors(path, {n: expected[n] for n in tensors}, tensors, convert=False))
    upcast = [n for n, a in checked.items() if a.dtype != expected[n][1]]       # bfloat16/float16 files
    for name, view in zip(upcast, block_views([checked[n].shape for n in upcast], model.dtype)):
        view[...] = checked[name]                                # straight from the file's map into one block
        checked[name] = view
    with all_or_nothing(model):
        model.load_state_dict(checked, allow_nonfinite=True, assign=True)     # read_tensor_file checked finiteness
    return model


def from_pretrained(cls, folder, *, dtype="float32", allow_nonfinite: bool = False, keep_quantized: bool = False,
                    q8_activations: bool = False):
    """A ``cls`` (LlamaForCausalLM) in ``dtype`` built from ``folder/config.json`` and loaded from its tensors;
    config.json is checked against the tensor headers first. ``allow_nonfinite`` loads NaN/Inf weights.
    A path ending in ``.gguf`` is a llama.cpp GGUF file instead (``gguf.from_gguf``: ``keep_quantized`` keeps
    its quantized matrices as their blocks, ``q8_activations`` then multiplies as llama.cpp does)."""
    if str(folder).endswith(".gguf"):
        return from_gguf(cls, folder, expected_shapes=expected_shapes, dtype=dtype, allow_nonfinite=allow_nonfinite,
                         keep_quantized=keep_quantized, q8_activations=q8_activations)
    if keep_quantized or q8_activations:
        raise ValueError(f"from_pretrained: keep_quantized and q8_activations are for a .gguf file, got {folder}")
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileFormatError(f"{config_path}: file not found (a save_pretrained folder holds "
                              f"{CONFIG_NAME} beside the tensors)")
    d = LlamaConfig.read_json(config_path)
    shapes = read_shapes(folder)
    _check_layer_count(config_path, d, shapes)
    try:
        config = LlamaConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: {e}") from e
    check_claims(config_path, config, shapes)
    model = cls(config, dtype=dtype, seed=0, init_weights=False)           # no weights held until the file's
    return load_weights(model, folder, allow_nonfinite)


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
