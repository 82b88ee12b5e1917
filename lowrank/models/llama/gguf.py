"""A Llama-family model from a GGUF written by llama.cpp's ``convert_hf_to_gguf.py``.

The config comes from the metadata under the architecture's prefix ("llama", "qwen2", "qwen3"; llama.cpp
files Mistral under "llama"), as transformers 5.25's ``load_gguf_checkpoint`` reads it:

    {A}.block_count -> num_hidden_layers      {A}.embedding_length -> hidden_size
    {A}.feed_forward_length -> intermediate_size     {A}.context_length -> max_position_embeddings
    {A}.attention.head_count(_kv) -> num_attention_heads / num_key_value_heads
    {A}.attention.layer_norm_rms_epsilon -> rms_norm_eps      {A}.rope.freq_base -> rope_theta
    {A}.attention.key_length (else llama's rope.dimension_count) -> head_dim
    {A}.rope.scaling.type "linear" + .factor -> the linear RoPE; no ``output.weight`` -> a tied head
    a ``rope_freqs.weight`` tensor -> the llama3 RoPE it was computed from (Llama 3.1/3.2's settings only)

Tensor names map to transformers' (``GGUF_NAMES``). llama.cpp stores the rows of Llama's q and k in
its rotary layout (each head's pairs (2j, 2j+1) where transformers keeps (j, j + h/2)); its converter
permutes W (rows, cols) as ``W.reshape(H, 2, h/2, cols).swapaxes(1, 2)``, undone here by the inverse,
``W.reshape(H, h/2, 2, cols).swapaxes(1, 2)``. Qwen files keep transformers' order. The permutation moves
whole rows, so it is undone on a quantized tensor's blocks (rows, row bytes) just as on its floats.

``keep_quantized=True`` (``--method qlora`` on a GGUF) keeps each matrix the file holds in a block format
the kernels multiply (``validate.GGUF_FORMATS``) as its blocks: a linear layer becomes a ``GGUFDense``, the
embedding a ``GGUFEmbedding`` and a tied head a ``GGUFDense`` over the embedding's blocks (one copy), so
the frozen base in RAM is the file's tensors at their size; F32/F16/BF16 tensors load as floats.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ...io.gguf import read_gguf
from ...io.tensor_files import FileFormatError
from ...kernels.validate import GGUF_FORMATS
from ...nn.embedding import Embedding
from ...nn.gguf_dense import GGUFDense, GGUFEmbedding
from ...nn.layers import Dense
from ...nn.module import block_views
from .configuration import LlamaConfig

ARCHITECTURES = ("llama", "qwen2", "qwen3")      # general.architecture values lowrank loads
GGUF_NAMES = {                                    # llama.cpp's name -> transformers' (N: the layer)
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "blk.N.attn_norm": "model.layers.N.input_layernorm", "blk.N.ffn_norm": "model.layers.N.post_attention_layernorm",
    "blk.N.attn_q": "model.layers.N.self_attn.q_proj", "blk.N.attn_k": "model.layers.N.self_attn.k_proj",
    "blk.N.attn_v": "model.layers.N.self_attn.v_proj", "blk.N.attn_output": "model.layers.N.self_attn.o_proj",
    "blk.N.attn_q_norm": "model.layers.N.self_attn.q_norm", "blk.N.attn_k_norm": "model.layers.N.self_attn.k_norm",
    "blk.N.ffn_gate": "model.layers.N.mlp.gate_proj", "blk.N.ffn_up": "model.layers.N.mlp.up_proj",
    "blk.N.ffn_down": "model.layers.N.mlp.down_proj",
}
ROPE_FREQS = "rope_freqs.weight"                  # llama3 RoPE as per-frequency divisors, read into the config
LLAMA3_SETTINGS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CONFIG_KEYS = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
               "intermediate_size": "feed_forward_length", "max_position_embeddings": "context_length",
               "num_attention_heads": "attention.head_count"}


def transformers_name(gguf_name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for a name not in GGUF_NAMES."""
    m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", gguf_name)
    if m is None:
        return None
    layer, base, kind = m.groups()
    mapped = GGUF_NAMES.get(base if layer is None else f"blk.N.{base}")
    return None if mapped is None else f"{mapped.replace('.N.', f'.{layer}.')}.{kind}"


def config_from_gguf(gguf) -> dict:
    """A transformers config dict for ``LlamaConfig.from_dict`` from a ``GGUFFile``'s metadata and tensor names;
    FileFormatError for what the file lacks or what lowrank does not load."""
    arch = gguf.require("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise FileFormatError(f"{gguf.path}: general.architecture is {arch!r}; lowrank loads GGUF models of "
                              f"architecture {', '.join(ARCHITECTURES)}")
    d = {k: gguf.require(f"{arch}.{key}", int) for k, key in CONFIG_KEYS.items()}
    layers = {int(m.group(1)) for name in gguf.tensors for m in [re.match(r"blk\.(\d+)\.", name)] if m}
    if d["num_hidden_layers"] != len(layers):                  # before anything is sized by it
        raise FileFormatError(f"{gguf.path}: {arch}.block_count is {d['num_hidden_layers']}, but the file holds "
                              f"{len(layers)} blocks (blk.N.*)")
    d["model_type"] = arch
    d["num_key_value_heads"] = gguf.get(f"{arch}.attention.head_count_kv", d["num_attention_heads"])
    d["rms_norm_eps"] = float(gguf.require(f"{arch}.attention.layer_norm_rms_epsilon", float))
    if gguf.get(f"{arch}.rope.freq_base") is not None:
        d["rope_theta"] = float(gguf.require(f"{arch}.rope.freq_base", float))
    head_dim = gguf.get(f"{arch}.attention.key_length", gguf.get("llama.rope.dimension_count"))
    if head_dim is not None:
        d["head_dim"] = head_dim
    scaling = gguf.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        factor = float(gguf.require(f"{arch}.rope.scaling.factor", float))
        d["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling != "none":
        raise FileFormatError(f"{gguf.path}: {arch}.rope.scaling.type is {scaling!r}; lowrank reads 'none' and "
                              f"'linear'")
    if ROPE_FREQS in gguf.tensors:
        head_dim = d.get("head_dim", d["hidden_size"] // d["num_attention_heads"])
        d["rope_scaling"] = llama3_rope(gguf, d.get("rope_theta", 10000.0), head_dim)
    names = set(gguf.tensors)
    d["tie_word_embeddings"] = "output.weight" not in names
    d["attention_bias"] = arch != "qwen2" and "blk.0.attn_q.bias" in names
    if arch == "llama":
        d["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    if "token_embd.weight" not in names:
        raise FileFormatError(f"{gguf.path}: no token_embd.weight tensor")
    rows = gguf.shape("token_embd.weight")[0]
    tokens = gguf.get("tokenizer.ggml.tokens")
    vocab_size = gguf.get(f"{arch}.vocab_size", rows)
    if vocab_size != rows or tokens is not None and len(tokens) != rows:
        raise FileFormatError(f"{gguf.path}: token_embd.weight has {rows} rows but the vocabulary has "
                              f"{len(tokens) if tokens is not None else vocab_size} tokens ({arch}.vocab_size: "
                              f"{gguf.get(f'{arch}.vocab_size')}); they must agree")
    d["vocab_size"] = rows
    return d


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                        original_max_position_embeddings: int) -> np.ndarray:
    """(h/2,) float32: what convert_hf_to_gguf writes as rope_freqs for a llama3 RoPE, the divisor of each
    inv_freq_j: 1 for wavelengths λ_j < L / high_freq_factor, ``factor`` for λ_j > L / low_freq_factor, and
    1 / ((1 − s) / factor + s) with s = (L / λ_j − low) / (high − low) between (L: the original context)."""
    L = original_max_position_embeddings
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)    # λ_j = 2π / inv_freq_j
    smooth = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    middle = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < L / high_freq_factor, 1.0, np.where(wavelen > L / low_freq_factor, factor, middle))


def llama3_rope(gguf, theta: float, head_dim: int) -> dict:
    """The llama3 rope_scaling whose factors are the file's rope_freqs.weight: Llama 3.1/3.2's settings
    (``LLAMA3_SETTINGS``) with factor = the largest divisor; FileFormatError for any other factors."""
    if gguf.shape(ROPE_FREQS) != (head_dim // 2,):
        raise FileFormatError(f"{gguf.path}: {ROPE_FREQS} has shape {gguf.shape(ROPE_FREQS)}, expected "
                              f"({head_dim // 2},) for head_dim {head_dim}")
    factors = gguf.dequantize(ROPE_FREQS)
    rope = {"factor": float(factors.max()), **LLAMA3_SETTINGS}
    if not np.allclose(llama3_rope_factors(theta, head_dim, **rope), factors, rtol=1e-5, atol=0):
        raise FileFormatError(f"{gguf.path}: {ROPE_FREQS} holds factors that are not llama3 RoPE with "
                              f"{LLAMA3_SETTINGS} (Llama 3.1/3.2's); lowrank reads only those")
    return {"rope_type": "llama3", **rope}


def unpermute_rotary(W: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k rows (rows, cols) or bias (rows,) back in transformers' order; ``n_heads`` = H or H_kv."""
    rows = W.shape[0]
    return W.reshape(n_heads, rows // n_heads // 2, 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def check_shapes(gguf, expected: dict) -> dict:
    """{transformers name: llama.cpp name}, every tensor of ``expected`` {name: shape} matched by name and shape
    to the file's, before anything is allocated."""
    mapped = {transformers_name(n): n for n in gguf.tensors if n != ROPE_FREQS}
    if None in mapped:
        unknown = sorted(n for n in gguf.tensors if transformers_name(n) is None and n != ROPE_FREQS)
        raise FileFormatError(f"{gguf.path}: tensors lowrank can't place in a Llama-family model: {unknown}")
    missing, unexpected = sorted(set(expected) - set(mapped)), sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise FileFormatError(f"{gguf.path}: the config asks for tensors the file lacks ({missing}) or the file holds "
                              f"tensors the config has no place for ({[mapped[n] for n in unexpected]})")
    for name, source in mapped.items():
        if gguf.shape(source) != tuple(expected[name]):
            raise FileFormatError(f"{gguf.path}: {source!r} has shape {gguf.shape(source)}, expected "
                                  f"{tuple(expected[name])} for {name} of this config")
    return {name: mapped[name] for name in expected}                    # in the model's order


def state_dict_from_gguf(gguf, config: LlamaConfig, mapped: dict, dtype) -> dict:
    """{transformers name: array in ``dtype``} of the tensors ``mapped`` {transformers name: llama.cpp name},
    dequantized, q/k rows of llama back in transformers' order; the arrays are views of one block, in
    ``mapped``'s order (``block_views``), each written once from the file."""
    views = block_views([gguf.shape(source) for source in mapped.values()], dtype)
    state = {}
    for (name, source), view in zip(mapped.items(), views):
        W = gguf.dequantize(source)
        if config.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            W = unpermute_rotary(W, config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads)
        view[...] = W
        state[name] = view
    return state


def load_config(gguf) -> LlamaConfig:
    """The LlamaConfig of a GGUF (a path or a ``GGUFFile``); errors name the file."""
    gguf = read_gguf(gguf) if isinstance(gguf, (str, Path)) else gguf
    try:
        return LlamaConfig.from_dict(config_from_gguf(gguf))
    except FileFormatError:
        raise
    except (TypeError, ValueError) as e:                         # LlamaConfig's checks, named after the file
        raise FileFormatError(f"{gguf.path}: {e}") from e


def block_tensors(gguf, mapped: dict) -> dict:
    """The part of ``mapped`` {transformers name: llama.cpp name} that are matrices in a block format the kernels
    multiply (``GGUF_FORMATS``)."""
    return {name: source for name, source in mapped.items() if name.endswith(".weight")
            and len(gguf.tensors[source].dims) == 2 and gguf.tensors[source].type_name in GGUF_FORMATS}


def keep_gguf_blocks(model, gguf, mapped: dict | None = None, *, q8_activations: bool = False) -> set:
    """Replace, in place, each layer of ``model`` whose weight the GGUF (a path or ``GGUFFile``) holds in a kernel
    block format by a layer holding the blocks (a Dense -> GGUFDense with its bias, the embedding -> GGUFEmbedding,
    a tied head -> a GGUFDense sharing the embedding's blocks); the float weights they held are dropped. With
    ``q8_activations`` the GGUFDense layers multiply as llama.cpp does (x rounded to Q8_0 blocks first). Returns
    the transformers names of the weights now held as blocks."""
    gguf = read_gguf(gguf) if isinstance(gguf, (str, Path)) else gguf
    if mapped is None:
        mapped = check_shapes(gguf, {name: p.shape for name, p in model.named_parameters()})
    config, dtype, kept = model.config, model.dtype, block_tensors(gguf, mapped)
    slots = block_views([gguf.raw(source).shape for source in kept.values()], np.uint8)   # one block for all
    for (name, source), blocks in zip(kept.items(), slots):
        module_name, layer = name[:-len(".weight")], model.get_submodule(name[:-len(".weight")])
        qtype, shape = gguf.tensors[source].type_name, gguf.shape(source)
        raw = gguf.raw(source)                                               # (rows, row bytes) uint8, mapped
        if config.model_type == "llama" and (".q_proj." in name or ".k_proj." in name):
            raw = unpermute_rotary(raw, config.num_attention_heads if ".q_proj." in name
                                   else config.num_key_value_heads)
        blocks[...] = raw                                                    # in RAM, at the file's size
        if isinstance(layer, Embedding):
            new = GGUFEmbedding(blocks, qtype, shape, dtype=dtype)
        elif isinstance(layer, Dense):
            bias = layer.bias
            new = GGUFDense(blocks, qtype, shape, None if bias is None else bias.data, dtype=dtype,
                            backend=layer.backend, q8_activations=q8_activations)
            if bias is not None:
                new.bias.trainable = bias.trainable
        else:
            raise TypeError(f"keep_gguf_blocks: {module_name} is a {type(layer).__name__}; only Dense and Embedding "
                            f"layers can hold GGUF blocks")
        model.set_submodule(module_name, new)
    embedding = model.model.embed_tokens
    if config.tie_word_embeddings and isinstance(embedding, GGUFEmbedding):
        model.lm_head = GGUFDense.tied(embedding, q8_activations=q8_activations)
    model.flatten_parameters()                  # what stays in float moves out of the old block, which is freed
    return set(kept)


def from_gguf(cls, path, *, expected_shapes, dtype="float32", allow_nonfinite: bool = False,
              keep_quantized: bool = False, q8_activations: bool = False):
    """A ``cls`` (LlamaForCausalLM) in ``dtype`` with the config and weights of the GGUF at ``path``;
    ``expected_shapes(config)`` -> {parameter name: shape} (checkpoint's, passed in by checkpoint.from_pretrained,
    which dispatches here); ``allow_nonfinite`` loads NaN/Inf weights; ``keep_quantized`` keeps block-format
    matrices as their blocks (``keep_gguf_blocks``, with ``q8_activations``), never dequantized whole.
    ``model.gguf_path`` names the file."""
    gguf = read_gguf(path)
    config = load_config(gguf)
    mapped = check_shapes(gguf, expected_shapes(config))
    model = cls(config, dtype=dtype, seed=0, init_weights=False)
    kept = keep_gguf_blocks(model, gguf, mapped, q8_activations=q8_activations) if keep_quantized else set()
    state = state_dict_from_gguf(gguf, config, {n: s for n, s in mapped.items() if n not in kept}, model.dtype)
    try:                                                         # every name is checked by check_shapes above
        model.load_state_dict(state, strict=not kept, allow_nonfinite=allow_nonfinite, assign=True)
    except ValueError as e:                                      # NaN/Inf weights, named after the file
        raise FileFormatError(f"{gguf.path}: {e}") from e
    model.gguf_path = gguf.path
    return model
