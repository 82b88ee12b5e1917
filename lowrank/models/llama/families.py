"""The decoder families lowrank reads from transformers' ``config.json``: Llama, Mistral, Qwen2, Qwen3.

All four are one architecture (RMSNorm, RoPE, GQA attention, SwiGLU MLP); transformers gives each
its own classes, but they differ only by what their config switches on:

    model_type  biases                          q/k RMSNorm  sliding window W              head_dim default
    llama       q/k/v/o: attention_bias;        no           none                          d / H
                MLP: mlp_bias
    mistral     none                            no           every layer (sliding_window)  d / H
    qwen2       q/k/v always, o never           no           layers >= max_window_layers   d / H
                                                             when use_sliding_window
    qwen3       q/k/v/o: attention_bias         q_norm,      as qwen2                      128
                                                k_norm

A layer with a window W lets the query at position t see the keys in (t − W, t]. A key absent from
``config.json`` takes the default of that family's transformers class (``FAMILY_DEFAULTS``), since
older ``save_pretrained`` files leave out values equal to the default.

RoPE: ``rope_parameters`` (transformers 5) or the older ``rope_scaling`` beside a top-level
``rope_theta``, read as transformers 5.25's ``RotaryEmbeddingConfigMixin`` reads them; lowrank
computes the rope types in ``ROPE_TYPES`` (nn.rotary has the formulas) and refuses the rest.
"""
from __future__ import annotations

from ...nn.module import check_number
from ...nn.rotary import ROPE_TYPES

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
QWEN_DEFAULTS = dict(vocab_size=151936, intermediate_size=22016, num_key_value_heads=32, max_position_embeddings=32768)
FAMILY_DEFAULTS = {        # where transformers' class defaults differ from LlamaConfig's (lowrank's dataclass)
    "llama": {},
    "mistral": dict(intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=4096 * 32),
    "qwen2": QWEN_DEFAULTS,
    "qwen3": dict(QWEN_DEFAULTS, head_dim=128),
}
BIAS_FIELDS = {"llama": ("attention_bias", "mlp_bias"), "mistral": (), "qwen2": (), "qwen3": ("attention_bias",)}
LAYER_TYPES = ("full_attention", "sliding_attention")


def check_model_type(model_type):
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; lowrank reads {', '.join(FAMILIES)}")


def sliding_from_dict(model_type: str, d: dict, num_layers: int):
    """(sliding_window, layer_types) as transformers' config class for ``model_type`` sets them."""
    if model_type == "llama":
        return None, None                                        # LlamaConfig has no window
    if model_type == "mistral":                                  # every layer slides; layer_types ignored
        return d.get("sliding_window", 4096), None
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    layer_types = d.get("layer_types")
    if layer_types is None:
        first = d.get("max_window_layers", 28)
        layer_types = [LAYER_TYPES[window is not None and i >= first] for i in range(num_layers)]
    return window, list(layer_types)


def sliding_to_dict(config) -> dict:
    """The window keys of ``config.json`` for ``config``'s family."""
    if config.model_type == "mistral":
        return {"sliding_window": config.sliding_window}
    if config.model_type in ("qwen2", "qwen3"):
        return {"use_sliding_window": config.sliding_window is not None, "sliding_window": config.sliding_window,
                "layer_types": list(config.layer_types)}
    return {}


def _standard_rope(rope: dict, rope_theta, max_position_embeddings: int) -> dict:
    """transformers' ``standardize_rope_params``: "type" read as "rope_type", defaults filled in."""
    rope = dict(rope)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", rope_theta)
    if rope["rope_type"] == "llama3":
        rope.setdefault("original_max_position_embeddings", max_position_embeddings)
    return rope


def rope_from_dict(d: dict, max_position_embeddings: int) -> tuple[float, str, dict | None]:
    """(rope_theta, rope_type, the scaling's own numbers or None) from a config dict, as transformers reads
    ``rope_parameters``/``rope_scaling``/``rope_theta``/``partial_rotary_factor``; ValueError on what lowrank
    does not compute, naming the key, what was given and what is supported."""
    given = {k: d[k] for k in ("rope_parameters", "rope_scaling") if d.get(k) is not None}
    for key, rope in given.items():
        if not isinstance(rope, dict):
            raise ValueError(f"{key} must be an object, got {rope!r}")
    rope_theta = d.get("rope_theta", 10000.0)
    standard = {k: _standard_rope(r, rope_theta, max_position_embeddings) for k, r in given.items()}
    if len(standard) == 2 and standard["rope_scaling"] != standard["rope_parameters"]:
        raise ValueError(f"rope_scaling {given['rope_scaling']} and rope_parameters {given['rope_parameters']} "
                         f"disagree (transformers would use rope_scaling alone); keep one of them")
    key = "rope_scaling" if "rope_scaling" in standard else "rope_parameters"
    rope = standard.get(key) or _standard_rope({}, rope_theta, max_position_embeddings)
    nested = [k for k in rope if k in LAYER_TYPES]
    if nested:
        raise ValueError(f"{key} holds one RoPE per layer type ({', '.join(nested)}); lowrank supports one RoPE for "
                         f"every layer")
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported; lowrank rotates the whole head (1.0)")
    rope_type = rope["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{key} has rope_type {rope_type!r}, which lowrank does not compute; supported: "
                         f"{', '.join(ROPE_TYPES)}")
    missing = [k for k in ROPE_TYPES[rope_type] if rope.get(k) is None]
    if missing:
        raise ValueError(f"{key} of rope_type {rope_type!r} lacks {', '.join(missing)}")
    scaling = {k: rope[k] for k in ROPE_TYPES[rope_type]} or None
    for k, v in {"rope_theta": rope["rope_theta"], **(scaling or {})}.items():
        check_number("LlamaConfig", f"{key}[{k!r}]" if k in given.get(key, {}) else k, v)
    return float(rope["rope_theta"]), rope_type, scaling
