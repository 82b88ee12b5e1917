"""Mixed-adapter batches through a whole model: sequence b uses adapter adapter_names[b] in every layer.

PEFT's form: ``lora_model.forward(x, adapter_names=[...])`` with one name per sequence (per row of
an MLP's input, per row of a decoder's (B, T) ids), ``"__base__"`` for the base model alone.
How the layers learn the assignment, without the model code (attention, MLP, decoder) knowing:

1. ``forward_mixed`` checks the names model-wide (B of them, each a known adapter or "__base__"),
   sets ``row_adapters`` = those B names on every LoRA layer (``LoraModel.lora_layers``: LoRALinear,
   LoRAEmbedding) and ModulesToSave layer for this one call, runs the wrapped model's own forward (with its keyword arguments, e.g. a decoder's
   ``attention_mask``) and clears ``row_adapters`` again, also when the forward raises.
2. Each LoRALinear spreads the B names over the N rows it actually sees (``batches.rows_for``):
   N = B in an MLP; N = B·T in a decoder, whose Dense layers take (B·T, d) sequence-major rows
   (row b·T + t is token t of sequence b), so each name is repeated T times. A LoRAEmbedding,
   whose input is the (B, T) ids themselves, spreads them over each sequence's tokens likewise.
3. That forward keeps a MixedCache (the row -> adapter index) in each layer, so the backward needs
   nothing more: ``LoraModel.backward`` is the plain one, and each adapter's dA, dB sum over its own
   rows only (Punica's BGMV backward), for every adapter whose factors are trainable.

A ModulesToSave layer (a trained copy of, say, a decoder's lm_head) spreads the names with the same
``rows_for`` and runs each group of rows through its adapter's copy.
"""
from __future__ import annotations

from contextlib import contextmanager

from .batches import BASE


@contextmanager
def _per_layer(layers, attribute: str, make):
    """``layer.<attribute> = make()`` on every layer for the duration of the block, None again after (also on error)."""
    for layer in layers:
        setattr(layer, attribute, make())
    try:
        yield
    finally:
        for layer in layers:
            setattr(layer, attribute, None)


def row_adapters(layers, names):
    """Give every layer in ``layers`` the per-sequence ``names`` for the duration of the block."""
    return _per_layer(layers, "row_adapters", lambda: list(names))


def frozen_stacks(layers):
    """While the weights can't change (generation), each LoRA layer builds its stacked, zero-padded
    factors once per set of adapters and reuses them at every step."""
    return _per_layer(layers, "stack_cache", dict)


@contextmanager
def mixed_batch(lora_model, adapter_names, B: int, what: str = "rows"):
    """Names checked model-wide, then set on every LoRA layer and ModulesToSave wrapper for the block;
    yields the LoRA layers."""
    check_names(lora_model, adapter_names, B, what)
    lora_layers = [layer for _, layer in lora_model.lora_layers()]
    with row_adapters(lora_layers + lora_model._wrappers(), adapter_names):
        yield lora_layers


def check_names(lora_model, adapter_names, B: int, what: str = "rows"):
    """One known adapter name (or "__base__") per sequence; TypeError/ValueError otherwise."""
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names must be a list of names, one per sequence ({what}), got {adapter_names!r}")
    if len(adapter_names) != B:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries for {B} {what} (one name per sequence, "
                         f"{BASE!r} for the base model)")
    unknown = sorted(set(adapter_names) - set(lora_model.peft_config) - {BASE})
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; adapters: {list(lora_model.peft_config)} (or {BASE!r})")


def forward_mixed(lora_model, x, adapter_names, **kwargs):
    """``lora_model.model.forward(x, **kwargs)`` with sequence b on adapter ``adapter_names[b]``."""
    with mixed_batch(lora_model, adapter_names, x.shape[0]):
        return lora_model.model.forward(x, **kwargs)
