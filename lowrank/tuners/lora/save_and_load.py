"""The LoRA half of Hugging Face PEFT's adapter files: save_pretrained, load_adapter, from_pretrained,
as functions that take the model (``lowrank.io`` below holds the format-generic parts: safetensors,
all-or-nothing commits).

One adapter = one directory (the root for "default", ``root/<name>`` for the others):

    adapter_config.json          PEFT's LoraConfig fields (peft_type "LORA", r, lora_alpha, ...)
    adapter_model.safetensors    base_model.model.<path>.lora_A.weight   (r, D_in)
                                 base_model.model.<path>.lora_B.weight   (D_out, r)
                                 base_model.model.<path>.lora_magnitude_vector   (D_out,)  DoRA only
                                 base_model.model.<path>.lora_embedding_A   (r, V)    an embedding's
                                 base_model.model.<path>.lora_embedding_B   (d, r)    (no ".weight")
                                 base_model.model.<path>.base_layer.weight   optional, embed_tokens/lm_head
                                 base_model.model.<path>.weight / .bias   modules_to_save copies
                                 base_model.model.<path>[.base_layer].bias   bias "all"/"lora_only"

Saving commits every selected adapter's two files as one (``atomic.commit``: all new or all
old, under a lock), optionally in bfloat16/float16 (``dtype``); the tensor file's metadata
records the sha256 of the exact config bytes saved with it (``lowrank.adapter_config_sha256``),
so tensors beside a config from another save (a killed save, a foreign writer, a hand edit)
are refused at load, naming both files. Files without that key (PEFT's) load as before.

Loading reads and checks everything first (config fields and values, file integrity, tensor keys,
shapes against the model and the config's r, dtypes, NaN/Inf). The rank each targeted layer gets from
r or rank_pattern is checked against its A's shape in the tensor file's header before any factor is
allocated (``check_ranks``: a hand-edited ``"r": 10**9`` is refused, not allocated). Then it injects
the adapter into a scratch copy of the model whose parameters share the model's arrays and checks
every tensor against it; only then does it inject into the real model and copy the tensors in,
inside ``all_or_nothing`` so that even an unforeseen failure leaves the model exactly as it was. Bad
input raises FileFormatError (a ValueError; AdapterFileError for the config and layout checks) naming
the file and the problem.
Loading injects with ``init_lora_weights=True`` whatever the config says (the tensors are overwritten,
and a PiSSA init would rewrite the base weights): a PiSSA adapter's A, B apply to the residual base
saved with it (``save_model`` after training).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path

from ...io.atomic import commit
from ...io.tensor_files import cast_for_saving, check_tensors, read_tensor_file, tensor_file_bytes
from ...nn.device import device_of, get_array_module, to_device
from ...nn.embedding import Embedding
from ...nn.module import ParameterDict
from ...nn.snapshot import all_or_nothing
from .config import AdapterFileError, config_to_dict, read_config
from .embedding import LoraEmbedding
from .mixed import BASE
from .modules_to_save import ModuleDict

ADAPTER_CONFIG_NAME = "adapter_config.json"                # transformers' names for PEFT's two files
ADAPTER_SAFE_WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
CONFIG_HASH_KEY = "lowrank.adapter_config_sha256"      # binds the tensors to the config saved with them
MAX_NAME_LENGTH = 128
# Names that are parts of PEFT's parameter names (an adapter called one would be saved under a
# name that reads as something else), plus "__base__", which means "no adapter" in forward.
RESERVED_NAMES = frozenset({"original_module", "modules_to_save", "base_layer", "lora_A", "lora_B",
                            "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout",
                            "weight", "bias", BASE})


def check_adapter_name(name):
    """An adapter name is a key, an attribute and a directory: 1 to 128 letters, digits, '_' or '-' (no
    separators, no '.' or '..'), not reserved, not a module attribute. TypeError/ValueError otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__} {name!r}")
    if not re.fullmatch(rf"[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}", name):
        raise ValueError(f"adapter name must be 1 to {MAX_NAME_LENGTH} letters, digits, '_' or '-' (it names a "
                         f"directory and parameters), got {name[:140]!r}")
    if name in RESERVED_NAMES or name.startswith("_") or hasattr(ParameterDict, name) or hasattr(ModuleDict, name):
        raise ValueError(f"adapter name {name!r} is reserved (PEFT's parameter names use it, or it is a module "
                         f"attribute); reserved: {sorted(RESERVED_NAMES)} and names starting with '_'")


# -- tensor names -----------------------------------------------------------------------
def adapter_parameters(model, adapter_name: str, shared: bool = True) -> dict:
    """PEFT key -> the Parameter that holds it, for one adapter of ``model``; ``shared=False`` leaves
    out the base biases that bias "all"/"lora_only" trains (they are shared by every adapter)."""
    bias, base, out = model.peft_config[adapter_name].bias if shared else "none", model.model, {}
    for name, p in base.named_parameters():
        key = _peft_key(base, name.split("."), adapter_name, bias)
        if key is not None:
            out[PREFIX + key] = p
    return out


def get_peft_model_state_dict(model, adapter_name: str = "default") -> dict:
    """PEFT key -> array of one adapter of ``model``: what its tensor file holds."""
    return {k: p.data for k, p in adapter_parameters(model, adapter_name).items()}


def set_peft_model_state_dict(model, peft_model_state_dict: dict, adapter_name: str = "default"):
    """Copy checked tensors into adapter ``adapter_name`` of ``model`` (an embedding's base weights too,
    when the file has them)."""
    optional = {k: p for k, p in embedding_base_parameters(model, adapter_name).items()
                if k in peft_model_state_dict}
    for key, p in {**optional, **adapter_parameters(model, adapter_name)}.items():
        xp = get_array_module(p.data)
        p.data = xp.array(to_device(peft_model_state_dict[key], device_of(p.data)), copy=True)


def _peft_key(base, parts, adapter, bias):
    """PEFT's name for parameter ``parts``: the adapter name removed, copies under their module's name."""
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")          # this adapter's copy: in full, under the module's names
        return ".".join(parts[:i] + parts[i + 2:]) if parts[i + 1] == adapter else None
    if "original_module" in parts:                  # the frozen original: only LoRA factors it may hold
        i = parts.index("original_module")
        return _peft_key(base, parts[:i] + parts[i + 1:], adapter, "none")
    owner, leaf = ([""] + parts)[-2], parts[-1]     # "0.lora_A.default" -> ("lora_A", "default")
    if owner in ("lora_A", "lora_B"):
        return ".".join(parts[:-1] + ["weight"]) if leaf == adapter else None
    if owner in ("lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B"):    # bare parameters in PEFT
        return ".".join(parts[:-1]) if leaf == adapter else None
    if leaf != "bias" or bias == "none":
        return None
    if bias == "all":
        return ".".join(parts)
    lora_layer = ".".join(parts[:-2])            # lora_only: the bias of a layer that holds this adapter
    holds = owner == "base_layer" and adapter in getattr(base.get_submodule(lora_layer), "lora_A", {})
    return ".".join(parts) if holds else None


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")        # PEFT's


def embedding_base_parameters(model, adapter_name: str) -> dict:
    """PEFT key -> base Parameter of each embed_tokens/lm_head layer that holds this adapter.

    PEFT's ``save_embedding_layers="auto"`` (its default) stores those base weights beside the adapter
    when such a layer is targeted, and loading writes them into the model: lowrank accepts them, when
    present, and loads them the same way. lowrank saves without them (PEFT's ``save_embedding_layers=False``).
    """
    names = [n for n, _ in model.model.named_parameters()]
    holders = {n.rsplit(".", 2)[0] for n in names if n.split(".")[-2:] in (["lora_A", adapter_name],
                                                                          ["lora_embedding_A", adapter_name])}
    holders = {h for h in holders if h.split(".")[-1] in EMBEDDING_LAYER_NAMES
               and not {"modules_to_save", "original_module"} & set(h.split("."))}
    return {PREFIX + n: p for n, p in model.model.named_parameters()
            if any(n.startswith(f"{h}.base_layer.") for h in holders)}


def _what(key: str, model, adapter_name: str) -> str:
    """How an error names a tensor: its module, and the config's r where that sets the shape."""
    path, _, leaf = key[len(PREFIX):].removesuffix(".weight").rpartition(".")
    if leaf in ("lora_A", "lora_B"):
        r = model.model.get_submodule(path).r[adapter_name]
        return f"{leaf} of module {path!r}, {'(r, D_in)' if leaf == 'lora_A' else '(D_out, r)'} with r={r}"
    if leaf in ("lora_embedding_A", "lora_embedding_B"):
        r = model.model.get_submodule(path).r[adapter_name]
        return f"{leaf} of embedding {path!r}, {'(r, V)' if leaf.endswith('A') else '(d, r)'} with r={r}"
    if leaf == "lora_magnitude_vector":
        return f"DoRA magnitude of module {path!r}, (D_out,)"
    if leaf == "base_layer":
        return f"base weights of {path!r} (PEFT's save_embedding_layers), shaped as in the base model"
    return "modules_to_save copy or trained bias, shaped as in the base model"


# -- save -------------------------------------------------------------------------------
def save_pretrained(model, save_directory, selected_adapters=None, overwrite: bool = False,
                    dtype: str | None = None):
    """Write each adapter as PEFT does ("default" in ``save_directory``, others in sub-directories).

    Every file is serialised before any is written; then all of them are committed as one
    (``atomic.commit``): the folder holds every new adapter or every old one. Existing files
    are replaced only with ``overwrite=True``. ``dtype`` ("bfloat16", "float16", "float32")
    stores the tensors in that type (PEFT does so for half-precision models). Each tensor
    file records the sha256 of the config written with it (``lowrank.adapter_config_sha256``).
    """
    names = list(model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"save_pretrained: no adapters {unknown}; adapters: {list(model.peft_config)}")
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"save_pretrained: {root} exists and is not a directory")
    files = {}
    for name in names:
        check_adapter_name(name)                    # add_adapter checked it; a folder name must be safe anyway
        targets = [n.replace(".original_module", "") for n, layer in model.lora_layers()
                   if name in layer.lora_A and ".modules_to_save." not in n]
        config = (json.dumps(config_to_dict(model.peft_config[name], targets), indent=2, sort_keys=True)
                  + "\n").encode()
        tensors = cast_for_saving(get_peft_model_state_dict(model, name), dtype)
        directory = root if name == "default" else root / name
        files[directory / ADAPTER_SAFE_WEIGHTS_NAME] = tensor_file_bytes(tensors, {CONFIG_HASH_KEY: _sha256(config)})
        files[directory / ADAPTER_CONFIG_NAME] = config
    commit(root, files, overwrite=overwrite)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- load: read, check on a scratch copy, then fill -------------------------------------
def read_adapter(model_id, allow_nonfinite: bool = False):
    """(LoraConfig, tensors, weights path) of the adapter directory ``model_id``, integrity
    checked, the config bound to the tensors by its hash where lowrank wrote them."""
    directory = Path(model_id)
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        subs = sorted(p.name for p in directory.glob(f"*/{ADAPTER_CONFIG_NAME}")) if directory.is_dir() else []
        hint = f" (adapters in sub-directories here: {[f'{directory / s}' for s in subs]})" if subs else ""
        raise AdapterFileError(f"{config_path}: file not found{hint}")
    config_bytes = config_path.read_bytes()
    config = read_config(config_path, config_bytes)
    weights_path = directory / ADAPTER_SAFE_WEIGHTS_NAME
    tensors, metadata = read_tensor_file(weights_path, allow_nonfinite)
    bound = metadata.get(CONFIG_HASH_KEY)           # PEFT's files carry none
    if bound is not None and bound != _sha256(config_bytes):
        raise AdapterFileError(f"{weights_path} was saved with a different {config_path} (the config's sha256 "
                               f"is not the one recorded in the tensors): the two files come from two different "
                               f"saves (one interrupted, or two writers at once?) or the config was edited; save "
                               f"the adapter again")
    return config, tensors, weights_path


def scratch_copy(module):
    """A structural copy of ``module`` whose parameters share its arrays (cheap; never written to)."""
    memo = {id(p.data): p.data for _, p in module.named_parameters()}
    memo.update({id(p.grad): None for _, p in module.named_parameters() if p.grad is not None})
    memo.update({id(m._cache): None for _, m in module.named_modules() if m._cache is not None})
    return copy.deepcopy(module, memo)


def _injected(make, config_path):
    """Run an injection; its ValueError/TypeError (targets, ranks, names) become AdapterFileError."""
    try:
        return make()
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{config_path}: this adapter does not fit the model: {e}") from e


def check_ranks(layers, base, config, config_path, tensors, weights_path):
    """Each rank the config claims for a layer in ``layers`` (names in ``base``) checked against the shape of
    that layer's A in the file's header, before any factor of that rank is allocated: a claimed r of 10**9
    would otherwise be allocated first and refused after."""
    missing = []
    for name in layers:
        embedding = isinstance(base.get_submodule(name), (Embedding, LoraEmbedding))
        key = PREFIX + name + (".lora_embedding_A" if embedding else ".lora_A.weight")
        if key not in tensors:
            missing.append(key)
            continue
        shape, r = tuple(tensors[key].shape), config.rank_for(name)        # A: (r, D_in) or (r, V)
        if len(shape) != 2 or shape[0] != r:
            found = f"rank {shape[0]}" if len(shape) == 2 else "not a matrix"
            raise AdapterFileError(f"{config_path}: {config.rank_key(name)} is {r} for layer {name!r}, but "
                                   f"{weights_path} holds its {'lora_embedding_A' if embedding else 'lora_A'} with "
                                   f"shape {shape}, {found}: the config does not describe these tensors")
    if missing:
        raise AdapterFileError(f"{weights_path}: missing tensors {missing} for the layers {config_path} targets")


def check_adapter_tensors(scratch, adapter_name, tensors, weights_path) -> dict:
    """The file's tensors checked against the adapter as injected into ``scratch``."""
    optional = {k: p for k, p in embedding_base_parameters(scratch, adapter_name).items() if k in tensors}
    expected = {k: (p.shape, p.dtype, _what(k, scratch, adapter_name))
                for k, p in {**optional, **adapter_parameters(scratch, adapter_name)}.items()}
    return check_tensors(weights_path, expected, tensors)


def _prepare(model_id, adapter_name, is_trainable, allow_nonfinite):
    """Read and check the files; (config as loaded, config to inject with, tensors, weights path)."""
    check_adapter_name(adapter_name)
    config, tensors, weights_path = read_adapter(model_id, allow_nonfinite)
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    return config, dataclasses.replace(config, init_lora_weights=True), tensors, weights_path


def load_adapter(model, model_id, adapter_name: str, is_trainable: bool = False, allow_nonfinite: bool = False):
    """Add the adapter saved in directory ``model_id`` to LoraModel ``model`` as ``adapter_name`` (not made
    active, so frozen until ``set_adapter``; PEFT's ``is_trainable=False`` also calls ``eval()``).
    FileFormatError (a ValueError) naming the file and the problem leaves the model exactly as it was."""
    config, injected, tensors, weights_path = _prepare(model_id, adapter_name, is_trainable, allow_nonfinite)
    config_path = Path(model_id) / ADAPTER_CONFIG_NAME
    layers = _injected(lambda: type(model).layers_to_adapt(model.model, injected), config_path)
    check_ranks(layers, model.model, injected, config_path, tensors, weights_path)
    scratch = scratch_copy(model)
    _injected(lambda: scratch.add_adapter(adapter_name, injected), config_path)
    checked = check_adapter_tensors(scratch, adapter_name, tensors, weights_path)
    with all_or_nothing(model):
        model.add_adapter(adapter_name, injected)
        set_peft_model_state_dict(model, checked, adapter_name)
        model.peft_config[adapter_name] = config
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
    config_path = Path(model_id) / ADAPTER_CONFIG_NAME
    layers = _injected(lambda: cls.layers_to_adapt(model, injected), config_path)
    check_ranks(layers, model, injected, config_path, tensors, weights_path)
    scratch = _injected(lambda: cls(scratch_copy(model), injected, adapter_name), config_path)
    checked = check_adapter_tensors(scratch, adapter_name, tensors, weights_path)
    with all_or_nothing(model):
        lora_model = cls(model, injected, adapter_name)
        set_peft_model_state_dict(lora_model, checked, adapter_name)
        lora_model.peft_config[adapter_name] = config
        if not is_trainable:
            lora_model.requires_grad_(False).eval()
    return lora_model
