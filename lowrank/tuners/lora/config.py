"""LoraConfig with PEFT's field names and defaults, and PEFT's rules for matching module names."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ...nn.module import check_number

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa")


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
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be a positive integer, got {self.r!r}")
        check_number("LoraConfig", "lora_alpha", self.lora_alpha)      # Infinity would train NaN weights
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoraConfig: lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"LoraConfig: bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES:
            raise ValueError(f"LoraConfig: init_lora_weights must be one of {INIT_MODES}, "
                             f"got {self.init_lora_weights!r}")
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
        for pattern, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"LoraConfig: rank_pattern[{pattern!r}] must be a positive integer, got {r!r}")
        for pattern, a in self.alpha_pattern.items():
            check_number("LoraConfig", f"alpha_pattern[{pattern!r}]", a)

    def to_dict(self) -> dict:
        return asdict(self)

    def rank_for(self, name: str) -> int:
        return _pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return _pattern_value(self.alpha_pattern, name, self.lora_alpha)


def _pattern_value(table: dict, name: str, default):
    """PEFT's rule: the first pattern p with re.match(rf"(.*\\.)?({p})$", name) wins."""
    for pattern, value in table.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def matches(target_modules, name: str) -> bool:
    """PEFT's matching: a regex string must match the whole name; a list entry must equal
    the name or be a suffix of it after a dot; "all-linear" matches every name."""
    if target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)
