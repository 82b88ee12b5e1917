"""Mixed-adapter batches, row by row: which rows use which adapter, and the stacked factors.

Letters: N rows, K adapters in the batch, r_max the largest of their ranks. A model hands a layer
one adapter name per sequence (``rows_for`` spreads them over the layer's rows); the layer turns
its names into a ``MixedPlan``: a row -> stack-position index (−1 = the base alone), the factors
stacked and zero-padded to r_max (padding adds nothing and gets zero gradients), and, when the rows
come in runs of one adapter (a prefill's B·T sequence-major rows), SGMV's segments; scattered rows
(a decode step, one row per sequence) take BGMV.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

BASE = "__base__"          # PEFT's name for "no adapter" in a mixed batch


def rows_for(names, N: int, label: str = "LoRALinear") -> list:
    """One adapter name per row of a layer's (N, D_in) input, from one name per sequence.

    A model hands each layer B names (one per sequence); a decoder's layers see N = B·T rows,
    sequence-major (row b·T + t is token t of sequence b, as ``x.reshape(B·T, d)`` lays them out),
    so each name is repeated T = N / B times. N = B (an MLP) gives the names unchanged.
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


def mixed_plan(layer, adapter_names: tuple, strict: bool, dtype, xp) -> MixedPlan:
    """The per-row adapter index and the adapters' factors stacked, zero-padded to the largest rank:
    A (K, r_max, D_in), B (K, D_out, r_max), scalings (K,); SGMV's (indptr, seg_index) when the rows
    come in runs of one adapter. Reused from ``layer.stack_cache`` when one is set (``mixed.frozen_stacks``)."""
    key = (adapter_names, strict, np.dtype(dtype))
    if layer.stack_cache is not None and key in layer.stack_cache:
        return layer.stack_cache[key]
    names = [n for n in dict.fromkeys(adapter_names) if n != BASE]
    unknown = [n for n in names if n not in layer.lora_A]
    names = [n for n in names if n in layer.lora_A]
    if unknown and strict:
        raise ValueError(f"{layer.label}: unknown adapters {unknown}; it has {list(layer.lora_A)} "
                         f"(use {BASE!r} for the base model)")
    if layer.training and any(layer.lora_dropout[n] > 0 for n in names):
        raise ValueError(f"{layer.label}: mixed-adapter batches do not apply lora_dropout; call eval() "
                         f"or use adapters with lora_dropout=0")
    position = {n: i for i, n in enumerate(names)}
    index = np.array([position.get(n, -1) for n in adapter_names], dtype=np.int64)
    r_max = max([layer.r[n] for n in names], default=1)
    K, D_in, D_out = max(len(names), 1), layer.in_features, layer.out_features
    A_stack = xp.zeros((K, r_max, D_in), dtype)          # zero-padded to the largest rank
    B_stack = xp.zeros((K, r_max, D_out), dtype).transpose(0, 2, 1)   # (K, D_out, r_max) laid out as Bᵀ
    for i, n in enumerate(names):
        A_stack[i, :layer.r[n]] = layer.lora_A[n].data
        B_stack[i, :, :layer.r[n]] = layer.lora_B[n].data
    scalings = xp.asarray(np.array([layer.scaling[n] for n in names] or [0.0], dtype=dtype))
    indptr, seg_index = segments(index)
    runs = (xp.asarray(indptr), xp.asarray(seg_index)) if len(seg_index) <= len(index) // 2 else None
    plan = MixedPlan(names, xp.asarray(index), A_stack, B_stack, scalings, runs)
    if layer.stack_cache is not None:
        layer.stack_cache[key] = plan
    return plan
