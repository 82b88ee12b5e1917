"""Mixed-adapter batches: sequence b uses adapter adapter_names[b] in every layer (Punica's BGMV/SGMV).

Letters: B sequences, N rows a layer sees, K adapters in the batch, r_max the largest of their ranks.
PEFT's form is ``lora_model.forward(x, adapter_names=[...])``, one name per sequence, ``"__base__"``
(``BASE``) for the base model alone. How the layers learn the assignment without the model code
(attention, MLP, decoder) knowing:

1. The model (``LoraModel.forward``/``generate``) checks the B names model-wide (``check_names``) and
   sets them as ``row_adapters`` on every LoRA layer and ModulesToSave wrapper for the block
   (``mixed_batch``), clearing them after it, also when the block raises.
2. Each layer spreads the B names over the N rows it sees (``rows_for``): N = B in an MLP; N = B·T
   in a decoder, whose Dense layers take (B·T, d) sequence-major rows, so each name repeats T times.
3. A LoraLinear turns its names into a ``MixedPlan`` (``mixed_plan``): a row -> stack-position index
   (−1 = the base alone), the factors stacked and zero-padded to r_max (padding adds nothing and gets
   zero gradients), and, when the rows come in runs of one adapter (a prefill), SGMV's segments;
   scattered rows (a decode step, one row per sequence) take BGMV. The plan is the layer's cache, so
   ``LoraModel.backward`` is the plain one: each adapter's dA, dB sum over its own rows only.

During generation the weights can't change, so each layer builds its stacks once per set of adapters
and reuses them at every step, whatever order the rows come in (``frozen_stacks`` sets ``stack_cache``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

BASE = "__base__"          # PEFT's name for "no adapter" in a mixed batch


def rows_for(names, N: int, label: str = "LoraLinear") -> list:
    """One adapter name per row of a layer's (N, D_in) input, from one name per sequence.

    A decoder's layers see N = B·T rows, sequence-major (row b·T + t is token t of sequence b, as
    ``x.reshape(B·T, d)`` lays them out), so each name is repeated T = N / B times.
    """
    B = len(names)
    if B == 0 or N % B:
        raise ValueError(f"{label}: a mixed batch of {B} sequences can't be spread over {N} rows "
                         f"(expected a multiple of {B}: B·T rows, sequence-major)")
    T = N // B
    return list(names) if T == 1 else [n for n in names for _ in range(T)]


def segments(index):
    """SGMV's indptr (S+1,) and seg_index (S,) for the S runs of equal values of a per-row host index (N,)."""
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])      # (S,) first row of each run
    return np.r_[starts, len(index)], index[starts]


class MixedPlan(NamedTuple):
    names: list            # the K adapters of the batch this layer holds, in stack order
    index: object          # (N,) row -> position in the stacks, −1 = the base alone
    A_stack: object        # (K, r_max, D_in)
    B_stack: object        # (K, D_out, r_max), a view of a C-contiguous (K, r_max, D_out): the kernels' Bᵀ free
    scalings: object       # (K,)
    segments: tuple | None  # SGMV's (indptr, seg_index) when the rows come in runs, else None (BGMV)


class Stacks(NamedTuple):
    names: list            # the K adapters, in stack order
    A_stack: object        # (K, r_max, D_in)
    B_stack: object        # (K, D_out, r_max), a view of a C-contiguous (K, r_max, D_out): the kernels' Bᵀ free
    scalings: object       # (K,)


def mixed_plan(layer, adapter_names: tuple, strict: bool, dtype, xp) -> MixedPlan:
    """``layer``'s MixedPlan for one name per row. The stacks depend only on the set of adapters, so with a
    ``layer.stack_cache`` set they are built once per set and reused whatever the rows' order, and for any
    batch whose adapters they all hold (an unused stack entry costs no work); the row index and segments are
    the call's own. strict=False: names the layer lacks run on the base alone (the model
    checked them model-wide)."""
    names = [n for n in dict.fromkeys(adapter_names) if n != BASE]
    unknown = [n for n in names if n not in layer.lora_A]
    names = [n for n in names if n in layer.lora_A]
    if unknown and strict:
        raise ValueError(f"{layer.label}: unknown adapters {unknown}; it has {list(layer.lora_A)} "
                         f"(use {BASE!r} for the base model)")
    if layer.training and any(layer.lora_dropout[n] > 0 for n in names):
        raise ValueError(f"{layer.label}: mixed-adapter batches do not apply lora_dropout; call eval() "
                         f"or use adapters with lora_dropout=0")
    key = (frozenset(names), np.dtype(dtype))
    stacks = None
    if layer.stack_cache is not None:                  # these adapters' stacks, or any that hold them all
        stacks = next((s for (held, t), s in layer.stack_cache.items() if t == key[1] and key[0] <= held), None)
    if stacks is None:
        stacks = _stack(layer, names, dtype, xp)
        if layer.stack_cache is not None:
            layer.stack_cache[key] = stacks
    position = {n: i for i, n in enumerate(stacks.names)}
    index = np.array([position.get(n, -1) for n in adapter_names], dtype=np.int64)   # (N,) −1 = the base alone
    indptr, seg_index = segments(index)
    runs = (xp.asarray(indptr), xp.asarray(seg_index)) if len(seg_index) <= len(index) // 2 else None
    return MixedPlan(stacks.names, xp.asarray(index), stacks.A_stack, stacks.B_stack, stacks.scalings, runs)


def _stack(layer, names: list, dtype, xp) -> Stacks:
    """The factors of ``names`` stacked in that order, zero-padded to the largest rank."""
    r_max = max([layer.r[n] for n in names], default=1)
    K, D_in, D_out = max(len(names), 1), layer.in_features, layer.out_features
    A_stack = xp.zeros((K, r_max, D_in), dtype)
    B_stack = xp.zeros((K, r_max, D_out), dtype).transpose(0, 2, 1)   # (K, D_out, r_max) laid out as Bᵀ
    for i, n in enumerate(names):
        A_stack[i, :layer.r[n]] = layer.lora_A[n].data
        B_stack[i, :, :layer.r[n]] = layer.lora_B[n].data
    scalings = xp.asarray(np.array([layer.scaling[n] for n in names] or [0.0], dtype=dtype))
    return Stacks(names, A_stack, B_stack, scalings)


# -- the model's side: names checked once, then handed to every layer for the block ------------
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


@contextmanager
def mixed_batch(lora_model, adapter_names, B: int, what: str = "rows"):
    """Names checked model-wide, then set as ``row_adapters`` on every LoRA layer and ModulesToSave
    wrapper for the block; yields the LoRA layers."""
    check_names(lora_model, adapter_names, B, what)
    lora_layers = [layer for _, layer in lora_model.lora_layers()]
    with _per_layer(lora_layers + lora_model._wrappers(), "row_adapters", lambda: list(adapter_names)):
        yield lora_layers


def frozen_stacks(layers):
    """Each layer's ``stack_cache`` a dict for the block: its MixedPlans are built once and reused."""
    return _per_layer(layers, "stack_cache", dict)
