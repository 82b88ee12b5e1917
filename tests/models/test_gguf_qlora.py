"""QLoRA on a GGUF base: the quantized matrices kept as llama.cpp's blocks (models.llama.gguf.keep_gguf_blocks,
``from_gguf(..., keep_quantized=True)``, and ``lm finetune``'s build_model for --method qlora).

Oracles: transformers loading the same file (``gguf_file=``) for the logits; the file's own tensor sizes (read
with gguf's reader) for the memory; the same LoRA over lowrank's float load of the file for the adapter's
outputs and gradients.
"""
import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_fixtures import byte_bpe, sentencepiece_bpe, write_gguf

from lowrank.app.lm_finetune import build_model
from lowrank.models.llama import LlamaForCausalLM
from lowrank.models.llama.checkpoint import expected_shapes
from lowrank.models.llama.gguf import from_gguf
from lowrank.nn.gguf_dense import GGUFDense, GGUFEmbedding
from lowrank.nn.layers import Dense
from lowrank.tuners.lora.config import LoraConfig
from lowrank.tuners.lora.layer import LoraLinear

SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, attn_implementation="eager")
IDS = np.array([[1, 5, 9, 100, 7, 3, 2, 8, 250, 11], [4, 4, 17, 30, 2, 9, 60, 1, 0, 3]])
CASES = {"llama-untied": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}, byte_bpe),
         "qwen2-tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, dict(tie_word_embeddings=True),
                        sentencepiece_bpe)}


def gguf_file(folder, case, qtype):
    cls, config_cls, kwargs, vocab_fn = CASES[case]
    vocab = vocab_fn()
    torch.manual_seed(0)
    model = cls(config_cls(vocab_size=len(vocab.tokens), **SIZES, **kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return write_gguf(folder / f"{case}-{qtype}.gguf", model, vocab, qtype)


def held_bytes(model) -> int:
    """Bytes of the distinct arrays the model's parameters hold (a shared array counted once)."""
    arrays = {id(p.data): p.data.nbytes for _, p in model.named_parameters()}
    for _, m in model.named_modules():                                     # a tied GGUF head lists no Parameter
        if isinstance(m, GGUFDense):
            arrays[id(m.weight_blocks.data)] = m.weight_blocks.data.nbytes
    return sum(arrays.values())


def file_tensor_bytes(path) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_1"])
def test_kept_blocks_are_the_files_tensors_at_their_size_and_give_transformers_logits(tmp_path, case, qtype):
    path = gguf_file(tmp_path, case, qtype)
    ours = from_gguf(LlamaForCausalLM, path, expected_shapes=expected_shapes, keep_quantized=True)
    assert isinstance(ours.model.embed_tokens, GGUFEmbedding) and isinstance(ours.lm_head, GGUFDense)
    assert not [n for n, m in ours.named_modules() if type(m) is Dense]   # every matrix is its blocks
    assert held_bytes(ours) == pytest.approx(file_tensor_bytes(path), rel=0.05)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(IDS)), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_qlora_on_a_gguf_base_trains_lora_over_the_blocks(tmp_path, case):
    """build_model(base from a .gguf, "qlora") wraps GGUFDense layers (not NF4, not floats) in LoRA; its outputs
    and LoRA gradients are those of the same adapter over the float load of the file."""
    path = gguf_file(tmp_path, case, "Q4_0")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"])
    models = [build_model(LlamaForCausalLM.from_pretrained(path), method, config) for method in ("qlora", "lora")]
    quantized, floats = models
    bases = [m.base_layer for _, m in quantized.named_modules() if isinstance(m, LoraLinear)]
    assert len(bases) == 4 * 2 and all(isinstance(b, GGUFDense) for b in bases)
    assert held_bytes(quantized) - sum(p.data.nbytes for p in quantized.parameters(trainable_only=True)) == \
        pytest.approx(file_tensor_bytes(path), rel=0.05)
    labels = np.roll(IDS, -1, axis=1)
    for model in models:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data = np.random.default_rng(len(name)).standard_normal(p.shape).astype(p.dtype) * 0.1
    losses = []
    for model in models:
        model.train()
        losses.append(model(IDS, labels=labels))
        model.backward()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.trainable} for m in models]
    assert sorted(grads[0]) == sorted(grads[1]) and all("lora_" in n for n in grads[0])
    for name, g in grads[0].items():
        np.testing.assert_allclose(g, grads[1][name], rtol=1e-3, atol=1e-5 * np.abs(grads[1][name]).max())
