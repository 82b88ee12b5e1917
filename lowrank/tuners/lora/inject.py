"""What LoRA may wrap, what "all-linear" means, and the wrapping itself (LoraModel's injection).

    linear layers     Dense, a layer already carrying LoRA (LoRALinear, DoraLinear), or any type
                      that declares ``lora_targetable = True`` (NF4Dense, say)
    embeddings        Embedding, or a LoRAEmbedding already wrapping one
    "all-linear"      PEFT's meaning: every linear layer but the model's output head, the module
                      ``get_output_embeddings()`` returns or else the one named ``lm_head`` (a plain
                      MLP has neither, so its last layer is adapted too, as in PEFT). A tied head
                      (``TiedLMHead``) is no Dense layer: it is never wrapped, even by name.
"""
from __future__ import annotations

import zlib

from ...nn.embedding import Embedding
from ...nn.layers import Dense
from .dora import DoraLinear
from .embedding import LoRAEmbedding
from .layer import LoRALinear

LORA_LAYERS = (LoRALinear, LoRAEmbedding)


def linear(module) -> bool:
    """A layer "all-linear" adapts (the output head aside)."""
    return isinstance(module, (Dense, LoRALinear)) or getattr(type(module), "lora_targetable", False)


def adaptable(module) -> bool:
    """A layer target_modules may name: a linear layer or a token embedding."""
    return linear(module) or isinstance(module, (Embedding, LoRAEmbedding))


def output_head(model) -> str | None:
    """The dotted name of ``model``'s output head (PEFT: the output embedding), or None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def inject(model, name: str, adapter_name: str, config):
    """Add adapter ``adapter_name`` to layer ``name`` of ``model``, wrapping it first if it has no LoRA yet."""
    layer = model.get_submodule(name)
    kwargs = dict(r=config.rank_for(name), lora_alpha=config.alpha_for(name), lora_dropout=config.lora_dropout,
                  use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights)
    if isinstance(layer, (Embedding, LoRAEmbedding)):
        if config.use_dora:
            raise ValueError(f"layer {name!r} is an embedding: lowrank implements DoRA for linear layers only; "
                             f"leave it out of target_modules or set use_dora=False")
        if isinstance(layer, LoRAEmbedding):
            layer.update_layer(adapter_name, **kwargs)
            return
        wrapper = LoRAEmbedding(layer, adapter_name=adapter_name, seed=_seed(adapter_name, name, kwargs["r"]), **kwargs)
        wrapper.tied_to = tuple(n for n, m in model.named_modules()      # a tied lm_head shares the weight
                                if m is not layer and getattr(m, "weight", None) is layer.weight)
        model.set_submodule(name, wrapper)
        return
    if config.use_dora:                        # DoRA: a DoraLinear, which also keeps plain adapters
        kwargs["use_dora"] = True
        if isinstance(layer, LoRALinear) and not isinstance(layer, DoraLinear):
            layer = DoraLinear.from_lora(layer)
            model.set_submodule(name, layer)
    if isinstance(layer, LoRALinear):
        layer.update_layer(adapter_name, **kwargs)
        return
    cls = DoraLinear if config.use_dora else LoRALinear
    model.set_submodule(name, cls(layer, adapter_name=adapter_name, seed=_seed(adapter_name, name, kwargs["r"]),
                                  **kwargs))


def _seed(adapter_name: str, layer_name: str, r: int) -> int:
    """A stable seed per (adapter, layer, rank): injection is deterministic, and adapters of
    different ranks do not start with the same first rows of A."""
    return zlib.crc32(f"{adapter_name}/{layer_name}/r={r}".encode())
