"""Adapters as Hugging Face PEFT files: save_pretrained, load_adapter, from_pretrained.

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

Loading reads and checks everything first (config fields and values, file integrity,
tensor keys, shapes against the model and the config's r, dtypes, NaN/Inf) on a scratch
copy of the model whose parameters share the model's arrays; only then does it inject the
adapter into the real model and copy the tensors in, inside ``all_or_nothing`` so that
even an unforeseen failure leaves the model exactly as it was. Bad input raises
FileFormatError (a ValueError; AdapterFileError for the config and layout checks) naming
the file and the problem. Loading injects with ``init_lora_weights=True`` whatever the config says (the
tensors are overwritten, and a PiSSA init would rewrite the base weights): a PiSSA
adapter's A, B apply to the residual base saved with it (``save_model`` after training).
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

from ..nn.device import device_of, get_array_module, to_device
from .atomic import commit
from .tensor_files import FileFormatError, cast_for_saving, check_tensors, read_tensor_file, tensor_file_bytes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
CONFIG_HASH_KEY = "lowrank.adapter_config_sha256"      # binds the tensors to the config saved with them


MAX_NAME_LENGTH = 128


def check_folder_name(name):
    """An adapter name names a sub-directory and sits in parameter keys: 1 to 128 letters, digits,
    '_' or '-' (no separators, no '.' or '..'). TypeError/ValueError otherwise. The tuner adds
    its reserved words (``lowrank.tuners.lora.names``)."""
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__} {name!r}")
    if not re.fullmatch(rf"[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}", name):
        raise ValueError(f"adapter name must be 1 to {MAX_NAME_LENGTH} letters, digits, '_' or '-' (it names a "
                         f"directory and parameters), got {name[:140]!r}")


class AdapterFileError(FileFormatError):
    """An adapter directory lowrank can't load; the message names the file and the problem."""


def _empty(v) -> bool:
    return v is None or (isinstance(v, (list, dict, str)) and len(v) == 0)


# PEFT 0.21 fields lowrank does not implement: accepted only at PEFT's neutral values.
NEUTRAL = {
    "fan_in_fan_out": (lambda v: v is False, "weights stored transposed (Conv1D layout)"),
    "lora_bias": (lambda v: v is False, "a trainable bias on lora_B"),
    "layers_to_transform": (_empty, "adapting only some layer indices"),
    "layers_pattern": (_empty, "adapting only some layer indices"),
    "exclude_modules": (_empty, "excluding layers from target_modules"),
    "layer_replication": (_empty, "replicated base layers"),
    "trainable_token_indices": (_empty, "trainable embedding rows"),
    "target_parameters": (_empty, "adapting bare parameters"),
    "megatron_config": (_empty, "Megatron parallel layers"),
    "loftq_config": (_empty, "a LoftQ-initialised quantized base"),
    "use_qalora": (lambda v: v is False, "QALoRA input pooling"),
    "alora_invocation_tokens": (_empty, "activated LoRA (aLoRA)"),
    "ensure_weight_tying": (lambda v: v is False, "tied adapter weights"),
    "use_bdlora": (lambda v: v is None or v is False, "BD-LoRA"),
    "runtime_config": (lambda v: v is None or (isinstance(v, dict) and set(v) <= {"ephemeral_gpu_offload"}
                                               and all(isinstance(x, bool) for x in v.values())), "runtime options"),
    **{name: (_empty, "a LoRA variant lowrank does not implement")
       for name in ("eva_config", "corda_config", "arrow_config", "kasa_config", "lora_ga_config",
                    "monteclora_config", "velora_config")},
}
INFORMATIONAL = {"peft_version": (str, type(None)), "revision": (str, type(None)), "auto_mapping": (dict, type(None)),
                 "megatron_core": (str, type(None)), "qalora_group_size": (int, type(None))}
NONE = type(None)
FIELD_TYPES = {"r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "bias": (str,),
               "target_modules": (str, list), "use_rslora": (bool,), "use_dora": (bool,),
               "init_lora_weights": (bool, str), "modules_to_save": (list, NONE), "rank_pattern": (dict,),
               "alpha_pattern": (dict,), "task_type": (str, NONE), "base_model_name_or_path": (str, NONE),
               "inference_mode": (bool,)}


# -- adapter_config.json ----------------------------------------------------------------
def config_to_dict(config, targets: list[str]) -> dict:
    """The fields PEFT writes, with "all-linear" resolved to the layers it hit (PEFT saves those)."""
    return {"peft_type": "LORA", "r": config.r, "lora_alpha": config.lora_alpha,
            "lora_dropout": config.lora_dropout,
            "target_modules": targets if config.target_modules == "all-linear" else config.target_modules,
            "bias": config.bias, "use_rslora": config.use_rslora, "use_dora": config.use_dora,
            "init_lora_weights": config.init_lora_weights, "fan_in_fan_out": False,
            "modules_to_save": config.modules_to_save, "rank_pattern": config.rank_pattern,
            "alpha_pattern": config.alpha_pattern, "task_type": config.task_type,
            "base_model_name_or_path": config.base_model_name_or_path, "inference_mode": True}


def read_config_fields(path, data: bytes | None = None) -> dict:
    """The LoraConfig fields in ``path`` (or in ``data``, its bytes as read already), type-checked;
    AdapterFileError for anything lowrank would not compute faithfully. The tuner builds its
    LoraConfig from them (``lowrank.tuners.lora.pretrained.read_config``)."""
    path = Path(path)
    try:
        raw = json.loads((path.read_bytes() if data is None else data).decode("utf-8"))
    except ValueError as e:                    # bad UTF-8 or bad JSON
        raise AdapterFileError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{path}: expected a JSON object of config fields, got {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise AdapterFileError(f"{path}: peft_type must be 'LORA', got {raw.get('peft_type')!r}")
    if "target_modules" not in raw:
        raise AdapterFileError(f"{path}: target_modules is missing")
    fields = {}
    for key, value in raw.items():
        if key == "peft_type":
            continue
        if key in FIELD_TYPES:
            types = FIELD_TYPES[key]
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise AdapterFileError(f"{path}: {key} must be {' or '.join(t.__name__ for t in types)}, "
                                       f"got {value!r}")
            fields[key] = value
        elif key in NEUTRAL:
            ok, meaning = NEUTRAL[key]
            if not ok(value):
                raise AdapterFileError(f"{path}: {key}={json.dumps(value)} means {meaning}, which lowrank does "
                                       f"not implement; loading it would change the math")
        elif key in INFORMATIONAL:
            if not isinstance(value, INFORMATIONAL[key]):
                raise AdapterFileError(f"{path}: {key} has the wrong type: {value!r}")
        elif not (_empty(value) or value is False):
            raise AdapterFileError(f"{path}: unknown field {key}={json.dumps(value)}: lowrank can't tell whether "
                                   f"it changes the math, so it refuses it")
    _check_contents(path, fields)
    return fields


def _check_contents(path, fields):
    """Element types of the list/dict fields, and regexes that compile."""
    names = fields.get("target_modules"), fields.get("modules_to_save")
    for key, value in zip(("target_modules", "modules_to_save"), names):
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise AdapterFileError(f"{path}: {key} must list module names (strings), got {value!r}")
    patterns = [names[0]] if isinstance(names[0], str) and names[0] != "all-linear" else []
    for key, kinds in (("rank_pattern", (int,)), ("alpha_pattern", (int, float))):
        for p, v in fields.get(key, {}).items():
            if isinstance(v, bool) or not isinstance(v, kinds):
                raise AdapterFileError(f"{path}: {key}[{p!r}] must be a number, got {v!r}")
            patterns.append(p)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise AdapterFileError(f"{path}: {p!r} is not a valid regular expression: {e}") from e


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
        check_folder_name(name)                     # add_adapter checked it; a folder name must be safe anyway
        targets = [n.replace(".original_module", "") for n, layer in model.lora_layers()
                   if name in layer.lora_A and ".modules_to_save." not in n]
        config = (json.dumps(config_to_dict(model.peft_config[name], targets), indent=2, sort_keys=True)
                  + "\n").encode()
        tensors = cast_for_saving({k: p.data for k, p in adapter_parameters(model, name).items()}, dtype)
        directory = root if name == "default" else root / name
        files[directory / WEIGHTS_NAME] = tensor_file_bytes(tensors, {CONFIG_HASH_KEY: _sha256(config)})
        files[directory / CONFIG_NAME] = config
    commit(root, files, overwrite=overwrite)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- load: read, check, fill (the tuner's load_adapter/from_pretrained call these in turn) --------
def read_adapter(model_id, allow_nonfinite: bool = False):
    """(config fields, tensors, weights path) of the adapter directory ``model_id``, integrity
    checked, the config bound to the tensors by its hash where lowrank wrote them."""
    directory = Path(model_id)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        subs = sorted(p.name for p in directory.glob(f"*/{CONFIG_NAME}")) if directory.is_dir() else []
        hint = f" (adapters in sub-directories here: {[f'{directory / s}' for s in subs]})" if subs else ""
        raise AdapterFileError(f"{config_path}: file not found{hint}")
    config_bytes = config_path.read_bytes()
    fields = read_config_fields(config_path, config_bytes)
    tensors, metadata = read_tensor_file(directory / WEIGHTS_NAME, allow_nonfinite)
    bound = metadata.get(CONFIG_HASH_KEY)           # PEFT's files carry none
    if bound is not None and bound != _sha256(config_bytes):
        raise AdapterFileError(f"{directory / WEIGHTS_NAME} was saved with a different {config_path} (the config's "
                               f"sha256 is not the one recorded in the tensors): the two files come from two "
                               f"different saves (one interrupted, or two writers at once?) or the config was "
                               f"edited; save the adapter again")
    return fields, tensors, directory / WEIGHTS_NAME


def scratch_copy(module):
    """A structural copy of ``module`` whose parameters share its arrays (cheap; never written to)."""
    memo = {id(p.data): p.data for _, p in module.named_parameters()}
    memo.update({id(p.grad): None for _, p in module.named_parameters() if p.grad is not None})
    memo.update({id(m._cache): None for _, m in module.named_modules() if m._cache is not None})
    return copy.deepcopy(module, memo)


def inject(make, config_path):
    """Run an injection; its ValueError/TypeError (targets, ranks, names) become AdapterFileError."""
    try:
        return make()
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{config_path}: this adapter does not fit the model: {e}") from e


def check_adapter_tensors(scratch, adapter_name, tensors, weights_path) -> dict:
    """The file's tensors checked against the adapter as injected into ``scratch``."""
    optional = {k: p for k, p in embedding_base_parameters(scratch, adapter_name).items() if k in tensors}
    expected = {k: (p.shape, p.dtype, _what(k, scratch, adapter_name))
                for k, p in {**optional, **adapter_parameters(scratch, adapter_name)}.items()}
    return check_tensors(weights_path, expected, tensors)


def fill(model, adapter_name, config, tensors):
    """Copy checked tensors in (an embedding's base weights too, when the file has them) and record the config."""
    optional = {k: p for k, p in embedding_base_parameters(model, adapter_name).items() if k in tensors}
    for key, p in {**optional, **adapter_parameters(model, adapter_name)}.items():
        xp = get_array_module(p.data)
        p.data = xp.array(to_device(tensors[key], device_of(p.data)), copy=True)
    model.peft_config[adapter_name] = config
