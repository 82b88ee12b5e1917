"""A decoder's architecture, read from and written to transformers' ``config.json``.

One dataclass for the four families lowrank computes (``families``: Llama, Mistral, Qwen2, Qwen3):
the family is ``model_type``, and what sets it apart is a field here (the biases, Qwen3's q/k
RMSNorm, the sliding window, head_dim). RoPE is read from the 5.x ``rope_parameters`` or the older
``rope_scaling`` + ``rope_theta``, as transformers reads them. Fields lowrank has no use for (token
ids, ``use_cache`` ...) are ignored; settings it can't honour (another activation, a rope_type it
does not compute, an unknown model_type) raise a one-line ValueError saying which.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ...nn.module import check_number
from ...nn.rotary import ROPE_TYPES
from . import families
from .families import ARCHITECTURES, BIAS_FIELDS, FAMILY_DEFAULTS, LAYER_TYPES

SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")     # integers >= 1 (None: derived)
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias")


def check_settings(values: dict):
    """ValueError naming the key unless every size present is an integer >= 1 (the two derived ones may be
    None), every switch a JSON boolean and every float setting finite and in range."""
    for name in SIZE_FIELDS:
        v = values.get(name)
        if v is None and name in ("num_key_value_heads", "head_dim"):
            continue
        if name in values and (type(v) is not int or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    for name in BOOL_FIELDS:
        if name in values and not isinstance(values[name], bool):
            raise ValueError(f"{name} must be true or false (a JSON boolean), got {values[name]!r}")
    for name, low, inclusive in (("rms_norm_eps", 0.0, False), ("rope_theta", 0.0, False),
                                 ("initializer_range", 0.0, True)):
        if name in values:
            check_number("LlamaConfig", name, values[name], low, inclusive)
    for k, v in (values.get("rope_scaling") or {}).items():
        check_number("LlamaConfig", f"rope_scaling[{k!r}]", v)


@dataclass
class LlamaConfig:
    vocab_size: int = 32000                # V, rows of embed_tokens and lm_head
    hidden_size: int = 4096                # d, the residual stream width
    intermediate_size: int = 11008         # I, the SwiGLU MLP's inner width
    num_hidden_layers: int = 32            # decoder layers
    num_attention_heads: int = 32          # H, query heads
    num_key_value_heads: int | None = None  # H_kv, key/value heads (GQA); None -> H
    head_dim: int | None = None            # h, per head; None -> d / H
    rms_norm_eps: float = 1e-6             # eps inside every RMSNorm
    max_position_embeddings: int = 2048    # longest sequence the model accepts
    hidden_act: str = "silu"               # the MLP's gate activation; only "silu"
    tie_word_embeddings: bool = False      # lm_head reuses embed_tokens.weight (absent from the file)
    attention_bias: bool = False           # biases on q/k/v/o_proj (Llama, Qwen3; Qwen2's q/k/v ones: qkv_bias)
    mlp_bias: bool = False                 # biases on gate/up/down_proj (Llama only)
    rope_theta: float = 10000.0            # θ of RoPE's inv_freq = θ^(−2j/h)
    rope_type: str = "default"             # "default", "linear" or "llama3" (nn.rotary.ROPE_TYPES)
    rope_scaling: dict | None = None       # the scaled RoPE's numbers (factor ...); None for "default"
    initializer_range: float = 0.02        # std of the N(0, std) init of every weight matrix (as transformers)
    dtype: str | None = None               # the file's torch_dtype/dtype, as recorded ("bfloat16", ...)
    model_type: str = "llama"              # the family: "llama", "mistral", "qwen2" or "qwen3"
    sliding_window: int | None = None      # W: a sliding layer's query at t sees keys (t − W, t]; None: none slides
    layer_types: list | None = None        # per layer "full_attention"/"sliding_attention" (Qwen); None: all alike

    def __post_init__(self):
        families.check_model_type(self.model_type)
        check_settings({f.name: getattr(self, f.name) for f in fields(self)})
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; lowrank's Llama MLP "
                             f"implements only 'silu' (SwiGLU)")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        needs = ROPE_TYPES[self.rope_type]
        if sorted(self.rope_scaling or ()) != sorted(needs):
            raise ValueError(f"rope_type {self.rope_type!r} takes rope_scaling with exactly {list(needs)}, "
                             f"got {self.rope_scaling}")
        for name in ("attention_bias", "mlp_bias"):
            if getattr(self, name) and name not in BIAS_FIELDS[self.model_type]:
                raise ValueError(f"{name} is not a {self.model_type} setting (transformers' {self.model_type} has "
                                 f"fixed biases)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be even and >= 2 for RoPE, got {self.head_dim} (hidden_size "
                             f"{self.hidden_size} / num_attention_heads {self.num_attention_heads} when not given)")
        if self.sliding_window is not None and not (isinstance(self.sliding_window, int) and self.sliding_window >= 1):
            raise ValueError(f"sliding_window must be an integer >= 1 or null, got {self.sliding_window!r}")
        if self.layer_types is not None and (len(self.layer_types) != self.num_hidden_layers
                                             or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ValueError(f"layer_types must name {self.num_hidden_layers} layers, each one of {list(LAYER_TYPES)}, "
                             f"got {self.layer_types}")
        if self.sliding_window is None and "sliding_attention" in (self.layer_types or ()):
            raise ValueError("layer_types has sliding_attention layers but no sliding_window (use_sliding_window is "
                             "false); lowrank refuses to guess the window")

    @property
    def qkv_bias(self) -> bool:
        """Biases on q/k/v_proj: always in Qwen2, by attention_bias in Llama and Qwen3, never in Mistral."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Qwen3's RMSNorm over head_dim on each head of q and k, before RoPE (q_norm, k_norm)."""
        return self.model_type == "qwen3"

    def layer_window(self, i: int) -> int | None:
        """The sliding window W of decoder layer ``i``, or None where it attends to every earlier key."""
        if self.sliding_window is None or (self.layer_types is not None and self.layer_types[i] != "sliding_attention"):
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From a transformers config dict of any family in ``families``; unknown keys ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object {{key: value}}, got {type(d).__name__}")
        model_type = d.get("model_type", "llama")
        families.check_model_type(model_type)
        d = {**FAMILY_DEFAULTS[model_type], **d}
        read = {f.name for f in fields(cls)} - {"rope_theta", "rope_type", "rope_scaling", "dtype", "model_type",
                                                "sliding_window", "layer_types", "attention_bias", "mlp_bias"}
        kwargs = {k: d[k] for k in read | set(BIAS_FIELDS[model_type]) if k in d}
        check_settings({**kwargs, **{k: d[k] for k in ("rope_theta",) if k in d}})   # before sizes build lists
        if d.get("attention_dropout", 0.0):
            raise ValueError(f"attention_dropout {d['attention_dropout']} is not supported; lowrank's attention has "
                             f"no dropout (0.0)")
        max_positions = kwargs.get("max_position_embeddings", cls.max_position_embeddings)
        kwargs["rope_theta"], kwargs["rope_type"], kwargs["rope_scaling"] = families.rope_from_dict(d, max_positions)
        layers = kwargs.get("num_hidden_layers", cls.num_hidden_layers)
        kwargs["sliding_window"], kwargs["layer_types"] = families.sliding_from_dict(model_type, d, layers)
        kwargs["dtype"] = d.get("dtype", d.get("torch_dtype"))
        return cls(model_type=model_type, **kwargs)

    @staticmethod
    def read_json(path) -> dict:
        """The JSON object in ``config.json``; ValueError naming the file when it is unreadable or not an object."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: can't read a config.json: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a config.json must hold a JSON object {{key: value}}, got {type(d).__name__}")
        return d

    @classmethod
    def from_json_file(cls, path) -> "LlamaConfig":
        """From a ``config.json``; errors name the file."""
        path = Path(path)
        d = cls.read_json(path)
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        """A transformers 5.x ``config.json`` dict of the family's class (``rope_parameters``, its window keys)."""
        own = ("rope_theta", "rope_type", "rope_scaling", "dtype", "sliding_window", "layer_types", "attention_bias",
               "mlp_bias")
        d = {k: v for k, v in asdict(self).items() if k not in own}
        d.update({k: getattr(self, k) for k in BIAS_FIELDS[self.model_type]})
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type, **(self.rope_scaling or {})}
        d.update(families.sliding_to_dict(self), architectures=[ARCHITECTURES[self.model_type]])
        if self.dtype is not None:
            d["dtype"] = self.dtype
        return d
