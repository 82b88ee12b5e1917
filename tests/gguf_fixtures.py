"""Tiny GGUF files built offline as llama.cpp's ``convert_hf_to_gguf.py`` writes them, from a random
transformers model and a tokenizer trained here: metadata keys, tokenizer arrays, q/k rows permuted
for llama, 1-D tensors in F32 and matrices in the requested type (F32, F16, BF16 or a block format
through ``gguf.quants.quantize``).

- ``byte_bpe()``: a byte-level BPE ("gpt2" model) with Llama 3-like special tokens.
- ``sentencepiece_bpe()``: a SentencePiece-style BPE ("llama" model): <unk>, <s>, </s>, the 256 byte
  tokens <0xXX>, then pieces with scores -rank, and no merges (as llama.cpp writes such a vocabulary).
- ``write_gguf(path, model, tokenizer, qtype)`` writes ``model`` (a transformers ...ForCausalLM).
"""
from __future__ import annotations

import json
import math

import gguf
import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! Hello, lowrank.",
          "naïve café — 東京 🙂",
          "def f(x):\n    return x * 2  # twice", "  leading spaces and\ttabs\n\nnew lines", "3.14159 2718 42",
          "It's we'll they've I'm don't", "LoRA adapters train W + BA with r << d."] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot|>{% endfor %}"
                 "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
TEXTS = ["Hello world!", " leading space", "naïve café — 東京 🙂", "<|eot|>inside<|start|>text", "x*2\n\n  y",
         "unseen ZQXJ words ÿ", "", "  ", "It's 3.14159"]
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


class Vocab:
    """What the GGUF's tokenizer keys hold: model, pre, tokens, types, scores, merges, special ids."""

    def __init__(self, model, pre, tokens, types, scores=None, merges=None, bos=None, eos=None, unk=None,
                 add_bos=None):
        self.model, self.pre, self.tokens, self.types = model, pre, tokens, types
        self.scores, self.merges = scores, merges
        self.bos, self.eos, self.unk, self.add_bos = bos, eos, unk, add_bos


def byte_bpe(pre="llama-bpe", vocab_size=320) -> Vocab:
    """A byte-level BPE trained on CORPUS; specials <|begin|>, <|end|>, <|eot|>, <|start|> (CONTROL) and
    <think> (USER_DEFINED) after the learned tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    specials = ["<|begin|>", "<|end|>", "<|eot|>", "<|start|>"]
    types = [NORMAL] * len(tokens) + [CONTROL] * len(specials) + [USER_DEFINED]
    tokens = tokens + specials + ["<think>"]
    return Vocab("gpt2", pre, tokens, types, merges=merges, bos=tokens.index("<|begin|>"),
                 eos=tokens.index("<|end|>"), add_bos=True)


def sentencepiece_bpe(vocab_size=400) -> Vocab:
    """A SentencePiece-style BPE ("▁" for spaces, byte fallback) trained on CORPUS, laid out as a
    sentencepiece model: <unk>, <s>, </s>, <0x00>..<0xFF>, then pieces by rank with score -rank."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>"] + bytes_ + [p for p in pieces if p not in bytes_]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return Vocab("llama", "default", tokens, types, scores=scores, bos=1, eos=2, unk=0)


def llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel rope_freqs for a llama3 rope_parameters: each inv_freq's divisor."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high:
            factors.append(1)
        elif wavelen > old_context_len / low:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


K_SCALES = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(-2, None)}   # each block's f16 d (and dmin)


def random_k_blocks(rows: int, cols: int, qtype: str, rng) -> np.ndarray:
    """(rows, cols / 256 * block bytes) uint8: random K-quant blocks whose f16 scales are small and finite
    (gguf quantizes no K-quant, so these stand for a model's weights)."""
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    raw = rng.integers(0, 256, (rows, cols // 256, block_bytes), dtype=np.uint8)
    n = len(range(block_bytes)[K_SCALES[qtype]]) // 2
    top = 0.0002 if qtype == "Q6_K" else 0.004                # Q6_K multiplies d by int8 sub-block scales
    scales = rng.uniform(top / 8, top, (rows, cols // 256, n)).astype(np.float16)
    raw[..., K_SCALES[qtype]] = scales.view(np.uint8).reshape(rows, cols // 256, 2 * n)
    return raw.reshape(rows, -1)


def permute(W: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: transformers' q/k rows -> llama.cpp's rotary layout."""
    return W.reshape(n_heads, 2, W.shape[0] // n_heads // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    base, kind = name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, i, rest = base.split(".", 3)
        return f"blk.{i}.{HF_TO_GGUF[rest]}.{kind}"
    return f"{HF_TO_GGUF[base]}.{kind}"


def write_gguf(path, model, vocab: Vocab, qtype="F32", name="tiny", extra=None):
    """Write ``model`` (transformers) with ``vocab`` as llama.cpp's converter would, matrices in ``qtype``
    (a K-quant: random blocks in place of the model's matrices)."""
    c = model.config
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[c.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(len(vocab.tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    for key, value in (("bos", vocab.bos), ("eos", vocab.eos), ("unk", vocab.unk)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(value)
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra or {}).items():
        w.add_key_value(key, *value)
    if c.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(c.rope_parameters, head_dim))
    qt, rng = gguf.GGMLQuantizationType[qtype], np.random.default_rng(0)
    for hf_name, p in model.state_dict().items():
        W = p.detach().to(dtype=torch.float32).numpy()
        if arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            W = permute(W, c.num_attention_heads if ".q_proj." in hf_name else c.num_key_value_heads)
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        block = gguf.GGML_QUANT_SIZES[qt][0]
        if W.ndim == 1 or W.shape[-1] % block:
            w.add_tensor(gguf_name(hf_name), W)                       # norms and odd widths stay F32
        elif qtype == "F32":
            w.add_tensor(gguf_name(hf_name), W)
        elif qtype in K_SCALES:
            w.add_tensor(gguf_name(hf_name), random_k_blocks(*W.shape, qtype, rng), raw_dtype=qt)
        else:
            w.add_tensor(gguf_name(hf_name), gguf.quants.quantize(W, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
