"""LoraConfig with PEFT's field names and defaults, PEFT's rules for matching module names, and its
file form, adapter_config.json (written and read as PEFT does; fields lowrank can't compute faithfully
are refused).

The rules for r and init_lora_weights are stated once here and applied where a value enters:
LoraConfig (a user's, a file's or a command line's settings, checked before anything is built) and
``update_layer`` (every adapter a layer gets, a directly built ``LoraLinear(base, r=...)`` included).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ...io.tensor_files import FileFormatError
from ...nn.module import check_number

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa")


def check_rank(owner: str, name: str, r) -> int:
    """r as an int; ValueError naming ``owner`` unless it is an integer >= 1 (bools are not ranks)."""
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {r!r}")
    return int(r)


def check_init_lora_weights(owner: str, value, modes=INIT_MODES, why: str = ""):
    """ValueError naming ``owner`` unless ``value`` is one of ``modes``."""
    if value not in modes:
        choices = ", ".join(repr(m) for m in modes[:-1]) + f" or {modes[-1]!r}"
        raise ValueError(f"{owner}: init_lora_weights must be {choices}{why}, got {value!r}")


@dataclass
class LoraConfig:
    """What to adapt and how; ``peft.LoraConfig``'s names and defaults.

    r, lora_alpha        rank and alpha; scaling = lora_alpha / r (/ √r with use_rslora)
    lora_dropout         dropout on the LoRA branch input
    target_modules       list of names (full dotted name or a suffix after a dot), a regex
                         string (full match), or "all-linear" (every Dense layer)
    bias                 "none" | "all" (every bias trainable) | "lora_only" (biases of adapted layers)
    init_lora_weights    True (Kaiming A, zero B) | False (both random) | "gaussian" | "pissa"
    modules_to_save      modules trained in full and stored with the adapter (e.g. the head)
    rank_pattern         {name regex: r} overriding r per layer; alpha_pattern likewise for lora_alpha
    use_dora             weight-decomposed LoRA (DoRA)
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    modules_to_save: list | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self):
        self.r = check_rank("LoraConfig", "r", self.r)
        check_number("LoraConfig", "lora_alpha", self.lora_alpha)      # Infinity would train NaN weights
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoraConfig: lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig: bias must be one of {BIAS_MODES}, got {self.bias!r}")
        check_init_lora_weights("LoraConfig", self.init_lora_weights)
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list, tuple, set)):
            raise TypeError(f"LoraConfig: target_modules must be a list of names or a regex string, "
                            f"got {type(self.target_modules).__name__}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set) \
                else list(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        for name, table in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(table, dict):
                raise TypeError(f"LoraConfig: {name} must be a dict of {{pattern: value}}, got {type(table).__name__}")
        self.rank_pattern = {p: check_rank("LoraConfig", f"rank_pattern[{p!r}]", r)
                             for p, r in self.rank_pattern.items()}
        for pattern, a in self.alpha_pattern.items():
            check_number("LoraConfig", f"alpha_pattern[{pattern!r}]", a)

    def to_dict(self) -> dict:
        return asdict(self)

    def rank_for(self, name: str) -> int:
        pattern = matching_pattern(self.rank_pattern, name)
        return self.r if pattern is None else self.rank_pattern[pattern]

    def alpha_for(self, name: str) -> float:
        pattern = matching_pattern(self.alpha_pattern, name)
        return self.lora_alpha if pattern is None else self.alpha_pattern[pattern]

    def rank_key(self, name: str) -> str:
        """The adapter_config.json key that sets layer ``name``'s rank: "r" or "rank_pattern['<pattern>']"."""
        pattern = matching_pattern(self.rank_pattern, name)
        return "r" if pattern is None else f"rank_pattern[{pattern!r}]"


def matching_pattern(table: dict, name: str) -> str | None:
    """PEFT's rule: the first pattern p with re.match(rf"(.*\\.)?({p})$", name) wins; None if none does."""
    return next((p for p in table if re.match(rf"(.*\.)?({p})$", name)), None)


def matches(target_modules, name: str) -> bool:
    """PEFT's matching: a regex string must match the whole name; a list entry must equal
    the name or be a suffix of it after a dot; "all-linear" matches every name."""
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


# -- adapter_config.json: PEFT's fields, and those lowrank refuses --------------------------------
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
    AdapterFileError for anything lowrank would not compute faithfully."""
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


def read_config(path, data: bytes | None = None) -> LoraConfig:
    """The LoraConfig in ``path`` (or in ``data``, its bytes as read already); AdapterFileError naming the file."""
    fields = read_config_fields(path, data)
    try:
        return LoraConfig(**fields)
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{path}: {e}") from e
