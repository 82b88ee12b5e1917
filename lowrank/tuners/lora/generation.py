"""Generation through LoRA adapters, one adapter per row: many adapters served from one frozen base.

``lora_model.generate(ids, adapter_names=[...], ...)`` is the decoder's ``generate``
(``models.llama.generation``: prefill once, then one token per step, one KV cache for the batch)
with every forward run as a mixed batch (``mixed``): sequence b uses adapter adapter_names[b]
("__base__": none) in every LoRA layer, at prefill (the B·T prompt rows, sequence-major) and at
each decode step (B rows, one per sequence). The base products x Wᵀ are shared by the whole batch;
only the rank-r part is computed per adapter: at prefill each sequence's T rows are one segment
(Punica's SGMV, ``lora_forward_sgmv``), at decode each row is gathered alone (BGMV,
``lora_forward_multi``); each layer stacks the adapters' factors once per generation (``frozen_stacks``). The KV cache
needs nothing per adapter: row b's keys and values come from row b's own adapted k/v projections.

``adapter_names=None``: the active adapter for every row, through the single-adapter (fused) kernel.

The names are checked once and handed to the layers once for the whole generation (``mixed.mixed_batch``)
rather than per forward as ``LoraModel.forward(..., adapter_names=)`` does: a decode step's model is
small, and two walks of the module tree per step cost it ~8% of its throughput (benchmarks/serving.py).
"""
from __future__ import annotations

from ...models.llama.generation import generate as generate_ids
from .mixed import frozen_stacks, mixed_batch


def generate(lora_model, input_ids, adapter_names=None, **kwargs):
    """``LoraModel.generate``: prompt ids (B, T) -> ids (B, T + n); ``kwargs`` as the decoder's ``generate``."""
    if adapter_names is None:
        return generate_ids(lora_model.model, input_ids, **kwargs)
    with mixed_batch(lora_model, adapter_names, len(input_ids), "prompts") as lora_layers, frozen_stacks(lora_layers):
        return generate_ids(lora_model.model, input_ids, **kwargs)     # row b -> adapter_names[b] at every step
