"""Tiny random transformers Llamas built offline: one with a byte-level BPE tokenizer and a ChatML chat
template (the tokenizer trained here with ``tokenizers``), for the commands that read a model folder, and
a bare checkpoint for the PEFT interop tests."""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                   "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                   "{% endif %}")
TEXT = ["def add(x, y):\n    return x + y\n", "The quick brown fox jumps over the lazy dog.",
        "user: what is two plus two? assistant: four.", "for i in range(10):\n    print(i)\n"] * 4


def bpe_tokenizer(vocab_size: int = 320) -> tokenizers.Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer) trained on TEXT, the ChatML tokens first (ids 0, 1, 2)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHATML_TOKENS,
                                                      show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tiny_llama(folder: Path, seed: int = 0, context: int = 64, chat_template: str = CHATML_TEMPLATE,
               vocab_size: int | None = None) -> Path:
    """A random 2-layer transformers Llama (GQA 4 over 2 heads, d = 32) saved in ``folder`` with a ChatML
    BPE tokenizer; ``vocab_size`` overrides the embedding's rows (default: the tokenizer's)."""
    folder = Path(folder)
    tok = bpe_tokenizer()
    config = transformers.LlamaConfig(vocab_size=vocab_size or tok.get_vocab_size(), hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=context,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": context, "chat_template": chat_template}))
    return folder


def random_llama_checkpoint(folder: Path, vocab_size: int, tied: bool) -> Path:
    """A random 2-layer transformers Llama (d = 32, GQA 4 over 2 heads, context 32, eager attention; the head
    tied to the embedding or not) saved in ``folder`` without a tokenizer; every weight randomized, 0.2 · N(0, 1)
    around 0 (norms around 1), so that no factor or layer is the identity."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=tied, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return Path(folder)
