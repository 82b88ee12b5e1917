"""A Llama's architecture, read from and written to transformers' ``config.json``.

Reads both the 5.x form ``rope_parameters = {"rope_theta": ..., "rope_type": "default"}`` and
the older top-level ``rope_theta`` (with an optional ``rope_scaling``). Fields lowrank has no use
for (token ids, ``use_cache``, ``initializer_range`` ...) are ignored; settings it can't honour
(another activation, a scaled RoPE) raise a ValueError saying which.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


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
    attention_bias: bool = False           # biases on q/k/v/o_proj
    mlp_bias: bool = False                 # biases on gate/up/down_proj
    rope_theta: float = 10000.0            # θ of RoPE's inv_freq = θ^(−2j/h)
    rope_type: str = "default"             # only "default" (no scaled RoPE)
    initializer_range: float = 0.02        # std of the N(0, std) init of every weight matrix (as transformers)
    dtype: str | None = None               # the file's torch_dtype/dtype, as recorded ("bfloat16", ...)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act != "silu":
            raise ValueError(f"LlamaConfig: hidden_act {self.hidden_act!r} is not supported; lowrank's Llama MLP "
                             f"implements only 'silu' (SwiGLU)")
        if self.rope_type != "default":
            raise ValueError(f"LlamaConfig: rope_type {self.rope_type!r} is not supported; lowrank implements only "
                             f"the 'default' (unscaled) RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From a transformers config dict; unknown keys ignored."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"LlamaConfig: model_type is {d['model_type']!r}, expected 'llama'")
        names = {f.name for f in fields(cls)} - {"rope_theta", "rope_type", "dtype"}
        kwargs = {k: d[k] for k in names if k in d}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"LlamaConfig: rope_parameters must be an object, got {rope!r}")
        kwargs["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
        kwargs["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
        kwargs["dtype"] = d.get("dtype", d.get("torch_dtype"))
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path) -> "LlamaConfig":
        """From a ``config.json``; errors name the file."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: can't read a Llama config.json: {e}") from e
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict:
        """A transformers 5.x ``config.json`` dict (``LlamaForCausalLM``, ``rope_parameters``)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("rope_theta", "rope_type", "dtype")}
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type}
        d.update(architectures=["LlamaForCausalLM"], model_type="llama")
        if self.dtype is not None:
            d["dtype"] = self.dtype
        return d
