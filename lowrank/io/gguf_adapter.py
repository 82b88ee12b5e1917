"""llama.cpp's side of a model and its LoRA adapters: GGUF names, the q/k row permutation, and writing a
GGUF file (with the ``gguf`` package's GGUFWriter, all or nothing).

What llama.cpp's converters write (``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``):

    general.architecture        "llama" (Llama, Mistral), "qwen2", "qwen3"
    model.embed_tokens          token_embd          model.norm                     output_norm
    lm_head                     output (absent when tied)
    model.layers.N.<part>       blk.N.<LAYER_NAMES[part]>
    adapter pair                blk.N.attn_q.weight.lora_a (r, D_in), blk.N.attn_q.weight.lora_b (D_out, r)

llama.cpp's "llama" architecture rotates pairs of adjacent rows, transformers' pairs row i with row
i + h/2 of each head, so the converter permutes the rows of q (H heads) and k (H_kv heads), and of a LoRA
pair only lora_b's rows (the rows of ΔW = B A are B's rows). Qwen2 and Qwen3 keep transformers' order.
Tensors are written in NumPy order: the file's ggml shape is the reverse, as ``gguf`` handles it.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .atomic import commit

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}   # model_type -> arch
PERMUTED_ARCHITECTURES = ("llama",)          # archs whose q/k rows the converter permutes (undo_permute)
LAYER_NAMES = {                              # transformers' name inside model.layers.N -> llama.cpp's in blk.N
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}
MODEL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
ADAPTER_TYPE = "lora"


def gguf_module_name(name: str) -> str | None:
    """llama.cpp's name of transformers module ``name`` ("model.layers.3.mlp.up_proj" -> "blk.3.ffn_up"), or None."""
    if name in MODEL_NAMES:
        return MODEL_NAMES[name]
    parts = name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        part = LAYER_NAMES.get(".".join(parts[3:]))
        return None if part is None else f"blk.{int(parts[2])}.{part}"
    return None


def gguf_architecture(model_type: str) -> str:
    """general.architecture for a transformers ``model_type``; ValueError for one llama.cpp's converter doesn't map."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} has no llama.cpp architecture here; supported: "
                         f"{', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k order: rows (H·h, ...) -> each head's rows (2, h/2) read as (h/2, 2)."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"can't permute {rows} rows for {n_head} heads: need a multiple of 2 × heads")
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_to_permute(gguf_name: str, arch: str, n_head: int, n_kv_head: int) -> int | None:
    """The head count whose rows llama.cpp permutes in tensor ``gguf_name`` (blk.N.attn_q/attn_k), else None."""
    if arch not in PERMUTED_ARCHITECTURES:
        return None
    part = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    return {"attn_q": n_head, "attn_k": n_kv_head}.get(part)


def write_gguf(path, arch: str, metadata: list, tensors: dict, overwrite: bool = False):
    """Write a GGUF file at ``path`` as one atomic commit.

    metadata   [(writer method name, *arguments)] in order, e.g. ("add_float32", "adapter.lora.alpha", 16.0),
               or a function of the writer (gguf's ``SpecialVocab.add_to_gguf``)
    tensors    {name: array} in order, or {name: (array, raw_dtype)} for bytes already quantized
    """
    import gguf                                    # the writer is only needed here

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) / "out.gguf"
        writer = gguf.GGUFWriter(tmp, arch)
        for item in metadata:
            if callable(item):
                item(writer)
            else:
                getattr(writer, item[0])(*item[1:])
        for name, tensor in tensors.items():
            array, raw_dtype = tensor if isinstance(tensor, tuple) else (tensor, None)
            writer.add_tensor(name, np.ascontiguousarray(array), raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        data = tmp.read_bytes()
    commit(path.parent, {path: data}, overwrite=overwrite)


def write_lora_adapter(path, arch: str, lora_alpha: float, pairs: dict, overwrite: bool = False):
    """A llama.cpp LoRA adapter GGUF: {gguf module name: (lora_a (r, D_in), lora_b (D_out, r))}, already
    permuted and with every layer's scaling folded so that ``lora_alpha / r`` is its scale."""
    metadata = [("add_type", "adapter"), ("add_string", "adapter.type", ADAPTER_TYPE),
                ("add_float32", "adapter.lora.alpha", float(lora_alpha))]
    tensors = {}
    for name, (lora_a, lora_b) in pairs.items():
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise ValueError(f"{name}: lora_a {lora_a.shape} and lora_b {lora_b.shape} are not a (r, D_in), "
                             f"(D_out, r) pair")
        tensors[f"{name}.weight.lora_a"] = lora_a
        tensors[f"{name}.weight.lora_b"] = lora_b
    write_gguf(path, arch, metadata, tensors, overwrite=overwrite)


def tokenizer_metadata(folder, vocab_size: int) -> list:
    """The ``tokenizer.ggml.*`` entries (``write_gguf`` metadata) for the tokenizer.json in ``folder``, as llama.cpp's
    converter writes them with ``gguf``'s vocab classes: byte-level BPE as "gpt2" (with its merges), BPE with
    byte fallback (SentencePiece-style) as "llama"; padded to ``vocab_size`` with [PADi] tokens. [] when the
    folder has no tokenizer.json. The pre-tokenizer is written as "default": the converter's choice of a
    named llama.cpp pre-tokenizer (by hashing a test string's tokens) is not reproduced."""
    import gguf

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return []
    for kind in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            vocab = kind(folder)
            break
        except (FileNotFoundError, TypeError):      # what gguf's classes raise for a tokenizer of the other kind
            continue
    else:
        raise ValueError(f"{folder / 'tokenizer.json'}: neither a byte-level BPE nor a BPE with byte fallback; "
                         f"gguf's vocab classes (and so llama.cpp's converter) can't write it")
    tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens()))
    if len(tokens) > vocab_size:
        raise ValueError(f"{folder / 'tokenizer.json'}: {len(tokens)} tokens, more than the model's vocab_size "
                         f"{vocab_size}")
    pads = range(len(tokens), vocab_size)
    tokens += [f"[PAD{i}]".encode() for i in pads]
    scores += [-1000.0] * len(pads)
    types += [gguf.TokenType.USER_DEFINED] * len(pads)
    special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
    entries = [("add_tokenizer_model", vocab.tokenizer_model), ("add_tokenizer_pre", "default"),
               ("add_token_list", tokens), ("add_token_types", types)]
    if vocab.tokenizer_model == "llama":
        entries.append(("add_token_scores", scores))
    return [*entries, special.add_to_gguf]


def tokenizer_of_gguf(path) -> list:
    """The ``tokenizer.*`` key-values of the GGUF model at ``path``, as ``write_gguf`` metadata (types kept)."""
    from .gguf import read_gguf

    fields = read_gguf(path).reader.fields
    return [("add_key_value", key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
            for key, f in fields.items() if key.startswith("tokenizer.")]
