"""PEFT LoRA adapters out to llama.cpp: the adapter as a LoRA GGUF (``--lora``), or merged into its base
as a model GGUF (``lowrank.io.gguf_adapter`` holds llama.cpp's names, permutation and the writer).

llama.cpp scales every layer by one file-wide ``alpha / r``, with r read from lora_b. A PEFT adapter's
layer ℓ has its own s_ℓ = α_ℓ / r_ℓ (α_ℓ / √r_ℓ with rsLoRA; α_ℓ, r_ℓ from alpha_pattern, rank_pattern).
The file's alpha is α* = r · s for the default r and α, and each layer's factor is folded into its B:

    B_file = (s_ℓ · r_ℓ / α*) · B_ℓ     so that   (α* / r_ℓ) · B_file A_ℓ = s_ℓ B_ℓ A_ℓ

(a layer with the default r and α keeps B as it is). llama.cpp can't hold DoRA magnitudes, modules_to_save
copies, trained biases or embedding LoRA (its convention transposes lora_a of token_embd; not implemented
here): each is refused with a one-line ValueError naming it.

Merged (``--merge``): the base (a transformers folder or a .gguf) with the adapter folded in by
``merge_and_unload``, written as llama.cpp's converter writes a model: general.name/file_type, and under
the architecture vocab_size, context_length, embedding_length, feed_forward_length, block_count,
attention.head_count(_kv), rope.freq_base, attention.layer_norm_rms_epsilon, rope.dimension_count,
attention.key/value_length (rope.scaling.* for linear RoPE); matrices F32, F16 or Q8_0, 1-D tensors F32;
q/k rows permuted for "llama"; the base's tokenizer (its tokenizer.json, or a GGUF base's tokenizer.* keys).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ...io import gguf_adapter as gg
from ...io.gguf import read_gguf
from ...io.tensor_files import FileFormatError
from ...models.llama.checkpoint import CONFIG_NAME
from ...models.llama.configuration import LlamaConfig
from ...models.llama.gguf import config_from_gguf
from .layer import AdapterTables
from .save_and_load import ADAPTER_CONFIG_NAME, PREFIX, read_adapter

DTYPES = ("float32", "float16")                 # an adapter's tensor types in the file
MODEL_DTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}   # merged model -> LlamaFileType


def base_config(adapter_dir, base=None, named: str | None = None) -> tuple[LlamaConfig, Path]:
    """(LlamaConfig, path) of ``base`` (a transformers folder, or a .gguf model), else of ``named`` (the adapter's
    base_model_name_or_path) when that is one here; ValueError saying to pass --base otherwise."""
    if base is None:
        if not named or not (_is_gguf(named) or (Path(named) / CONFIG_NAME).is_file()):
            raise ValueError(f"{Path(adapter_dir) / ADAPTER_CONFIG_NAME}: base_model_name_or_path {named!r} is not a "
                             f"folder holding {CONFIG_NAME} or a .gguf file; pass the base model with --base")
        base = named
    if _is_gguf(base):
        return LlamaConfig.from_dict(config_from_gguf(read_gguf(base))), Path(base)
    path = Path(base) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found (--base names a transformers model folder or a .gguf file)")
    return LlamaConfig.from_json_file(path), Path(base)


def _is_gguf(path) -> bool:
    return str(path).endswith(".gguf") and Path(path).is_file()


def _refuse_what_llama_cpp_cannot_load(config, tensors, where):
    """ValueError naming the first part of the adapter a llama.cpp LoRA GGUF has no place for."""
    if config.use_dora:
        raise ValueError(f"{where}: DoRA magnitudes (use_dora) can't be exported: llama.cpp applies plain LoRA only")
    if config.modules_to_save:
        raise ValueError(f"{where}: modules_to_save {config.modules_to_save} can't be exported: a llama.cpp adapter "
                         f"holds LoRA pairs only (merge with --merge instead)")
    if config.bias != "none":
        raise ValueError(f"{where}: bias={config.bias!r} trains biases, which a llama.cpp adapter can't hold "
                         f"(merge with --merge instead)")
    for key in tensors:
        if key.endswith(".base_layer.weight"):       # PEFT's copy of an adapted embedding/head: the base's own
            continue
        if ".lora_embedding_" in key:
            raise ValueError(f"{where}: embedding LoRA ({key}) can't be exported: llama.cpp's token_embd convention "
                             f"is not implemented here (merge with --merge instead)")
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{where}: tensor {key} is not a lora_A/lora_B weight; a llama.cpp adapter holds LoRA "
                             f"pairs only")


def projection_shape(module: str, c: LlamaConfig) -> tuple[int, int] | None:
    """(D_out, D_in) of base module ``module`` ("model.layers.0.self_attn.q_proj"), or None if it is no projection."""
    d, q, kv, inner = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, \
        c.intermediate_size
    part = module.split(".", 3)[-1] if module.startswith("model.layers.") else module
    shapes = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
              "self_attn.o_proj": (d, q), "mlp.gate_proj": (inner, d), "mlp.up_proj": (inner, d),
              "mlp.down_proj": (d, inner), "lm_head": (c.vocab_size, d)}
    return shapes.get(part)


def gguf_lora_pairs(config, tensors: dict, base: LlamaConfig, dtype: str = "float32", where: str = "adapter"):
    """(file alpha α*, {gguf module name: (lora_a (r, D_in), lora_b (D_out, r))}) of a PEFT adapter: named,
    folded and permuted as llama.cpp reads them, in ``dtype``. ``tensors`` are PEFT's keys."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _refuse_what_llama_cpp_cannot_load(config, tensors, where)
    arch = gg.gguf_architecture(base.model_type)
    file_alpha = config.r * AdapterTables._scaling(config.r, config.lora_alpha, config.use_rslora)
    file_alpha = float(np.float32(file_alpha)) or float(config.r)   # float32 as llama.cpp reads it; alpha 0 means 1
    modules = sorted({k[len(PREFIX):].rsplit(".", 2)[0] for k in tensors if not k.endswith(".base_layer.weight")},
                     key=_layer_order)
    pairs = {}
    for module in modules:
        A, B = (tensors.get(f"{PREFIX}{module}.{x}.weight") for x in ("lora_A", "lora_B"))
        if A is None or B is None:
            raise ValueError(f"{where}: {module} has only one of lora_A and lora_B")
        name, shape = gg.gguf_module_name(module), projection_shape(module, base)
        if name is None or shape is None:
            raise ValueError(f"{where}: LoRA on {module} can't be exported: llama.cpp names no such projection")
        if name == "output" and base.tie_word_embeddings:
            raise ValueError(f"{where}: LoRA on lm_head can't be exported: the base ties it to the embedding, and "
                             f"llama.cpp's file has no separate output tensor for it")
        r = config.rank_for(module)
        if A.shape != (r, shape[1]) or B.shape != (shape[0], r):
            raise ValueError(f"{where}: {module} has lora_A {A.shape} and lora_B {B.shape}, expected ({r}, {shape[1]}) "
                             f"and ({shape[0]}, {r}) for r={r} on this base")
        s = AdapterTables._scaling(r, config.alpha_for(module), config.use_rslora)
        fold = s * r / file_alpha                                    # (α*/r)·fold·B A = s B A
        B = B if fold == 1.0 else B.astype(np.float64) * fold
        heads = gg.heads_to_permute(name, arch, base.num_attention_heads, base.num_key_value_heads)
        if heads is not None:
            B = gg.permute_rows(B, heads)                            # ΔW's rows are B's rows
        pairs[name] = (np.asarray(A, dtype=dtype), np.asarray(B, dtype=dtype))
    if not pairs:
        raise ValueError(f"{where}: the adapter holds no LoRA pairs")
    return file_alpha, pairs


def _layer_order(module: str):
    parts = module.split(".")
    return (int(parts[2]), module) if module.startswith("model.layers.") and parts[2].isdigit() else (1 << 30, module)


def export_gguf_adapter(adapter_dir, out, base=None, dtype: str = "float32", overwrite: bool = False) -> dict:
    """Write the PEFT adapter in ``adapter_dir`` as llama.cpp's LoRA GGUF ``out``; ``base`` is the base model's
    folder (its config.json), else adapter_config.json's base_model_name_or_path. Returns a summary."""
    config, tensors, _ = read_adapter(adapter_dir)
    base_cfg, _ = base_config(adapter_dir, base, config.base_model_name_or_path)
    alpha, pairs = gguf_lora_pairs(config, tensors, base_cfg, dtype, where=str(Path(adapter_dir)))
    arch = gg.gguf_architecture(base_cfg.model_type)
    gg.write_lora_adapter(out, arch, alpha, pairs, overwrite=overwrite)
    return {"architecture": arch, "alpha": alpha, "pairs": len(pairs), "dtype": dtype}


# -- merged: the adapter folded into its base, as a model GGUF ----------------------------------
def check_writable(c: LlamaConfig, arch: str):
    """ValueError naming what a model GGUF of ``c`` would make llama.cpp compute differently."""
    if c.rope_type not in ("default", "linear"):
        raise ValueError(f"rope_type {c.rope_type!r} can't be written as a GGUF here (llama3 RoPE needs "
                         f"llama.cpp's rope_freqs tensor); supported: default, linear")
    windows = [c.layer_window(i) for i in range(c.num_hidden_layers)]
    if any(w is not None and w < c.max_position_embeddings for w in windows):
        raise ValueError(f"sliding_window {c.sliding_window} (< max_position_embeddings {c.max_position_embeddings}) "
                         f"can't be written: llama.cpp's {arch} attends to every earlier key")


def model_metadata(c: LlamaConfig, arch: str, name: str, file_type: int) -> list:
    """The hyperparameters llama.cpp's converter writes for ``c`` (``write_gguf``'s metadata list)."""
    check_writable(c, arch)
    m = [("add_name", name), ("add_file_type", file_type), ("add_vocab_size", c.vocab_size),
         ("add_context_length", c.max_position_embeddings), ("add_embedding_length", c.hidden_size),
         ("add_feed_forward_length", c.intermediate_size), ("add_block_count", c.num_hidden_layers),
         ("add_head_count", c.num_attention_heads), ("add_head_count_kv", c.num_key_value_heads),
         ("add_rope_freq_base", float(c.rope_theta)), ("add_layer_norm_rms_eps", float(c.rms_norm_eps)),
         ("add_rope_dimension_count", c.head_dim), ("add_key_length", c.head_dim), ("add_value_length", c.head_dim)]
    if c.rope_type == "linear":
        import gguf
        m += [("add_rope_scaling_type", gguf.RopeScalingType.LINEAR),
              ("add_rope_scaling_factor", float(c.rope_scaling["factor"]))]
    return m


def model_tensors(model, dtype: str = "f16") -> dict:
    """{gguf name: array or (quantized bytes, type)} of a plain (merged) LlamaForCausalLM, in llama.cpp's order:
    q/k rows (and biases) permuted for the llama architecture; 1-D tensors float32; ``dtype`` "f32", "f16" or
    "q8_0" for the matrices (Q8_0 where the row length is a multiple of 32, else f16, as the converter does)."""
    import gguf
    c = model.config
    arch = gg.gguf_architecture(c.model_type)
    out = {}
    for key, p in model.state_dict().items():
        module, kind = key.rsplit(".", 1)
        name = gg.gguf_module_name(module)
        if name is None:
            raise ValueError(f"{key} has no llama.cpp name (a LoRA layer left unmerged?)")
        w = np.asarray(p, dtype=np.float32)
        heads = gg.heads_to_permute(name, arch, c.num_attention_heads, c.num_key_value_heads)
        if heads is not None:
            w = gg.permute_rows(w, heads)
        if w.ndim == 1 or dtype == "f32":
            out[f"{name}.{kind}"] = w
        elif dtype == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            out[f"{name}.{kind}"] = (gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                     gguf.GGMLQuantizationType.Q8_0)
        else:
            out[f"{name}.{kind}"] = w.astype(np.float16)
    return out


def write_model_gguf(model, out, dtype: str = "f16", name: str = "model", tokenizer: list = (),
                     overwrite: bool = False):
    """Write a plain LlamaForCausalLM as a llama.cpp model GGUF; ``tokenizer``: its tokenizer.ggml.* entries
    (llama.cpp needs them to run the file; ``io.gguf_adapter.tokenizer_metadata``, ``tokenizer_of_gguf``)."""
    import gguf
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"--merge type must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    arch = gg.gguf_architecture(model.config.model_type)
    metadata = model_metadata(model.config, arch, name, int(getattr(gguf.LlamaFileType, MODEL_DTYPES[dtype])))
    if dtype == "q8_0":
        metadata.append(("add_quantization_version", gguf.GGML_QUANT_VERSION))
    metadata += list(tokenizer)
    gg.write_gguf(out, arch, metadata, model_tensors(model, dtype), overwrite=overwrite)


def export_merged_gguf(adapter_dir, out, base=None, dtype: str = "f16", overwrite: bool = False) -> dict:
    """The base model (its folder, as ``export_gguf_adapter`` finds it) with the adapter merged in, as a GGUF."""
    from ...models.llama.modeling import LlamaForCausalLM
    from .model import LoraModel
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"--merge type must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    config, _, _ = read_adapter(adapter_dir)
    base_cfg, path = base_config(adapter_dir, base, config.base_model_name_or_path)
    check_writable(base_cfg, gg.gguf_architecture(base_cfg.model_type))          # before loading any weights
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype="float32")
    except FileFormatError as e:
        raise ValueError(f"--merge needs the base model's weights: {e}") from e
    tokenizer = gg.tokenizer_of_gguf(path) if _is_gguf(path) else gg.tokenizer_metadata(path, model.config.vocab_size)
    merged = LoraModel.from_pretrained(model, adapter_dir).merge_and_unload()
    write_model_gguf(merged, out, dtype, name=path.stem or "model", tokenizer=tokenizer, overwrite=overwrite)
    return {"architecture": gg.gguf_architecture(merged.config.model_type), "dtype": dtype,
            "tokenizer": bool(tokenizer)}
