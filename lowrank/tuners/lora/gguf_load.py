"""A llama.cpp LoRA adapter GGUF (``gguf_export``'s, or ``convert_lora_to_gguf.py``'s) onto a lowrank model.

llama.cpp's adapter is one alpha for the file and pairs ``blk.N.<name>.weight.lora_a`` (r, D_in),
``.lora_b`` (D_out, r), with the scale alpha / r of each pair (r from lora_b) and lora_b's rows of q/k in
llama.cpp's rotary order for the "llama" architecture. As a PEFT LoraConfig that is lora_alpha = alpha,
r = the most common rank, and rank_pattern for the layers of another rank; lora_b's rows are put back in
transformers' order (``models.llama.gguf.unpermute_rotary``). The file is read by ``io.gguf.read_gguf``
(checked before it is trusted) and the tensors go through the same checks as a PEFT adapter's
(``save_and_load.check_adapter_tensors``); on any error the model is left as it was.
"""
from __future__ import annotations

import re
from collections import Counter

from ...io import gguf_adapter as gg
from ...io.gguf import read_gguf
from ...io.tensor_files import FileFormatError
from ...models.llama.gguf import unpermute_rotary
from ...nn.snapshot import all_or_nothing
from .config import LoraConfig
from .gguf_export import projection_shape
from .save_and_load import PREFIX, check_adapter_tensors, scratch_copy, set_peft_model_state_dict

LAYER_MODULES = {v: k for k, v in gg.LAYER_NAMES.items()}          # llama.cpp's name in blk.N -> transformers'
MODEL_MODULES = {v: k for k, v in gg.MODEL_NAMES.items()}


def transformers_module(gguf_name: str) -> str | None:
    """"blk.3.ffn_up" -> "model.layers.3.mlp.up_proj"; "output" -> "lm_head"; None for a name it doesn't know."""
    parts = gguf_name.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_MODULES:
        return f"model.layers.{int(parts[1])}.{LAYER_MODULES[parts[2]]}"
    return MODEL_MODULES.get(gguf_name)


def read_gguf_adapter(path, config) -> tuple[LoraConfig, dict]:
    """(LoraConfig, {PEFT key: array}) of the LoRA GGUF at ``path`` for a base of LlamaConfig ``config``;
    FileFormatError naming the file for anything else (another architecture, a missing half, a wrong shape)."""
    f = read_gguf(path)
    if f.get("general.type") != "adapter" or f.get("adapter.type") != gg.ADAPTER_TYPE:
        raise FileFormatError(f"{f.path}: not a LoRA adapter GGUF (general.type {f.get('general.type')!r}, "
                              f"adapter.type {f.get('adapter.type')!r}; expected 'adapter', 'lora')")
    arch, base_arch = f.require("general.architecture", str), gg.gguf_architecture(config.model_type)
    if arch != base_arch:
        raise FileFormatError(f"{f.path}: an adapter for a {arch!r} base; this base is {base_arch!r}")
    alpha = f.require("adapter.lora.alpha", float)
    pairs = {}
    for name in f.tensors:
        stem, _, half = name.rpartition(".weight.lora_")
        module = transformers_module(stem) if half in ("a", "b") else None
        if module is None or projection_shape(module, config) is None:
            raise FileFormatError(f"{f.path}: tensor {name!r} is not a LoRA half of a projection lowrank knows")
        pairs.setdefault(module, {})[half] = name
    tensors, ranks = {}, {}
    for module, halves in pairs.items():
        if set(halves) != {"a", "b"}:
            raise FileFormatError(f"{f.path}: {module} has only lora_{''.join(halves)}")
        (d_out, d_in), r = projection_shape(module, config), f.shape(halves["b"])[-1]
        A, B = f.dequantize(halves["a"]), f.dequantize(halves["b"])
        if A.shape != (r, d_in) or B.shape != (d_out, r):
            raise FileFormatError(f"{f.path}: {module} has lora_a {A.shape} and lora_b {B.shape}, expected ({r}, "
                                  f"{d_in}) and ({d_out}, {r}) on this base")
        heads = gg.heads_to_permute(gg.gguf_module_name(module), arch, config.num_attention_heads,
                                    config.num_key_value_heads)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.copy()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.copy() if heads is None else unpermute_rotary(B, heads).copy()
        ranks[module] = r
    if not ranks:
        raise FileFormatError(f"{f.path}: the adapter holds no LoRA pairs")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): rm for m, rm in ranks.items() if rm != r}
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks), rank_pattern=pattern), tensors


def lora_model_from_gguf(model, path, adapter_name: str = "default"):
    """``model`` (a LlamaForCausalLM) wrapped in a LoraModel holding the GGUF adapter at ``path``, frozen, in
    eval mode: what ``llama-cli --lora path`` computes."""
    from .model import LoraModel
    config, tensors = read_gguf_adapter(path, model.config)
    scratch = LoraModel(scratch_copy(model), config, adapter_name)
    checked = check_adapter_tensors(scratch, adapter_name, tensors, path)
    with all_or_nothing(model):
        lora_model = LoraModel(model, config, adapter_name)
        set_peft_model_state_dict(lora_model, checked, adapter_name)
        lora_model.requires_grad_(False).eval()
    return lora_model
