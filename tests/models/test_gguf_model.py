"""GGUF base models (lowrank.models.llama.gguf) against transformers loading the same file.

Tiny random transformers models of each family are written as llama.cpp's converter writes them
(tests/gguf_fixtures.py): F32, and matrices in Q8_0, Q4_0, F16, or random Q4_K/Q5_K/Q6_K blocks. Each
file loads in lowrank (``LlamaForCausalLM.from_pretrained("x.gguf")``) and in transformers (``gguf_file=``):
the weights are equal bit for bit, logits agree to float32 rounding, and so do the F32 file's logits and
the original model's (an independent check of undoing llama.cpp's q/k permutation). Llama 3's RoPE
(a rope_freqs tensor), linear RoPE and Llama's biases, which transformers' GGUF loading drops, are
checked against the original model alone. The tokenizer (``load_tokenizer("x.gguf")``) encodes and decodes as
transformers' GGUF tokenizer, and renders the file's chat template as transformers does.
"""
import gguf
import struct
import tracemalloc

import numpy as np
import pytest
import torch
import transformers
from gguf_fixtures import CHAT_TEMPLATE, TEXTS, byte_bpe, permute, sentencepiece_bpe, write_gguf

from lowrank.io.gguf import read_gguf
from lowrank.io.tensor_files import FileFormatError
from lowrank.io.tokenizer import load_tokenizer
from lowrank.models.llama import LlamaForCausalLM
from lowrank.models.llama.gguf import config_from_gguf, transformers_name, unpermute_rotary

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, attn_implementation="eager")
FAMILIES = {   # name -> (transformers class, config class, its arguments, tokenizer)
    "llama-bpe": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}, lambda: byte_bpe("llama-bpe")),
    "llama-spm": (transformers.LlamaForCausalLM, transformers.LlamaConfig, {}, sentencepiece_bpe),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig, dict(sliding_window=None),
                lambda: byte_bpe("tekken")),                  # llama.cpp files Mistral under "llama"
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, dict(tie_word_embeddings=True),
              lambda: byte_bpe("qwen2")),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config, dict(head_dim=128), lambda: byte_bpe("qwen2")),
}
IDS = np.array([[1, 5, 9, 100, 7, 3, 2, 8, 250, 11]])


def random_model(family, vocab_size, **extra):
    cls, config_cls, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config_cls(vocab_size=vocab_size, **{**SIZES, **kwargs, **extra})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def written(request, tmp_path_factory):
    """(family, folder, {qtype: file name}, the transformers model)."""
    vocab = FAMILIES[request.param][3]()
    model = random_model(request.param, len(vocab.tokens))
    folder = tmp_path_factory.mktemp(request.param)
    files = {q: write_gguf(folder / f"{q}.gguf", model, vocab, q).name for q in ("F32", "Q8_0", "Q4_0", "F16")}
    return request.param, folder, files, model


def logits_of(model, ids):
    return np.asarray(model(ids)).reshape(*ids.shape, -1)


def test_logits_equal_transformers(written):
    family, folder, files, original = written
    for qtype, name in files.items():
        ours = LlamaForCausalLM.from_pretrained(folder / name)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        weights = theirs.state_dict()
        for key, p in ours.named_parameters():                 # dequantized and unpermuted alike, bit for bit
            np.testing.assert_array_equal(p.data, weights[key].numpy(), err_msg=f"{qtype} {key}")
        with torch.no_grad():
            expected = theirs(torch.tensor(IDS)).logits.numpy()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(logits_of(ours, IDS), expected, atol=1e-5 * scale, rtol=0, err_msg=qtype)
        if qtype == "F32":
            with torch.no_grad():
                np.testing.assert_allclose(logits_of(ours, IDS), original(torch.tensor(IDS)).logits.numpy(),
                                           atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_model_equals_transformers(tmp_path, qtype):
    """Matrices of random K-quant blocks (widths of 256) load alike in both: equal weights, equal logits."""
    vocab = byte_bpe()
    model = random_model("llama-bpe", len(vocab.tokens), hidden_size=256, intermediate_size=256)
    path = write_gguf(tmp_path / f"{qtype}.gguf", model, vocab, qtype)
    assert {t.type_name for t in read_gguf(path).tensors.values()} == {qtype, "F32"}
    ours = LlamaForCausalLM.from_pretrained(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    weights = theirs.state_dict()
    for name, p in ours.named_parameters():
        np.testing.assert_array_equal(p.data, weights[name].numpy(), err_msg=name)
    with torch.no_grad():
        expected = theirs(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(logits_of(ours, IDS), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def test_config_from_metadata(written):
    family, folder, files, original = written
    ours = LlamaForCausalLM.from_pretrained(folder / files["Q8_0"]).config
    c = original.config
    assert ours.model_type == {"mistral": "llama"}.get(family, family.split("-")[0])
    assert (ours.hidden_size, ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads,
            ours.intermediate_size, ours.max_position_embeddings, ours.vocab_size) == \
        (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
         c.max_position_embeddings, c.vocab_size)
    assert ours.head_dim == getattr(c, "head_dim", c.hidden_size // c.num_attention_heads)
    assert ours.tie_word_embeddings == c.tie_word_embeddings
    assert ours.rope_theta == c.rope_parameters["rope_theta"] and ours.rms_norm_eps == pytest.approx(c.rms_norm_eps)


def test_tokenizer_equals_transformers(written):
    family, folder, files, _ = written
    ours = load_tokenizer(folder / files["F32"])
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=files["F32"])
    for text in TEXTS + ["<unk> <s>x</s>", "<think>hm<think>", "<|begin|><|end|>"]:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert ours.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for heads, rows, cols in ((4, 32, 5), (2, 8, 3), (1, 4, 1)):
        W = rng.standard_normal((rows, cols))
        np.testing.assert_array_equal(unpermute_rotary(permute(W, heads), heads), W)
        np.testing.assert_array_equal(unpermute_rotary(permute(W[:, 0], heads), heads), W[:, 0])      # biases


def test_names():
    assert transformers_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert transformers_name("blk.0.ffn_down.bias") == "model.layers.0.mlp.down_proj.bias"
    assert transformers_name("output.weight") == "lm_head.weight"
    assert transformers_name("token_embd.weight") == "model.embed_tokens.weight"
    assert transformers_name("rope_freqs.weight") is None and transformers_name("blk.0.attn_qkv.weight") is None


def test_llama_biases_and_linear_rope(tmp_path):
    """transformers' GGUF config has no bias or rope-scaling settings for llama: checked against the original."""
    vocab = byte_bpe()
    model = random_model("llama-bpe", len(vocab.tokens), attention_bias=True, mlp_bias=True,
                         rope_scaling={"rope_type": "linear", "factor": 3.0})
    path = write_gguf(tmp_path / "b.gguf", model, vocab, extra={
        "llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
        "llama.rope.scaling.factor": (3.0, gguf.GGUFValueType.FLOAT32)})
    ours = LlamaForCausalLM.from_pretrained(path)
    assert ours.config.attention_bias and ours.config.mlp_bias and ours.config.rope_type == "linear"
    with torch.no_grad():
        expected = model(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(logits_of(ours, IDS), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def rewrite(tmp_path, vocab, family="llama-bpe", **changes):
    model = random_model(family, len(vocab.tokens))
    for key, value in changes.items():
        setattr(vocab, key, value)
    return write_gguf(tmp_path / "x.gguf", model, vocab)


def test_vocabulary_disagreeing_with_embedding(tmp_path):
    vocab = byte_bpe()
    model = random_model("llama-bpe", len(vocab.tokens))
    vocab.tokens, vocab.types = vocab.tokens + ["extra"], vocab.types + [1]
    path = write_gguf(tmp_path / "x.gguf", model, vocab)
    with pytest.raises(FileFormatError, match="token_embd.weight has .* rows but the vocabulary has"):
        LlamaForCausalLM.from_pretrained(path)


def test_unknown_architecture_and_rope_freqs(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for step in (w.write_header_to_file, w.write_kv_data_to_file, w.write_tensors_to_file, w.close):
        step()
    with pytest.raises(FileFormatError, match="'gpt2'; lowrank loads GGUF models of architecture llama, qwen2, qwen3"):
        LlamaForCausalLM.from_pretrained(tmp_path / "g.gguf")


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_from_rope_freqs(tmp_path, factor):
    """Llama 3.1/3.2 files carry their RoPE as rope_freqs.weight, which transformers ignores: lowrank reads
    it back into the llama3 rope_scaling, checked against the original model; other factors are refused."""
    vocab = byte_bpe()
    rope = dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)        # head_dim 8: wavelengths 6.3, 167, 4443, 118000
    model = random_model("llama-bpe", len(vocab.tokens), rope_parameters=rope)
    path = write_gguf(tmp_path / "r.gguf", model, vocab)
    ours = LlamaForCausalLM.from_pretrained(path)
    assert ours.config.rope_type == "llama3" and ours.config.rope_scaling["factor"] == factor
    ids = np.arange(60)[None] % len(vocab.tokens)
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits_of(ours, ids), expected, atol=1e-5 * np.abs(expected).max(), rtol=0)
    f = read_gguf(path)
    f.dequantize = lambda name: np.array([1.0, 1.0, 2.0, factor], np.float32)   # not llama3's smooth middle
    with pytest.raises(FileFormatError, match="rope_freqs.weight holds factors that are not llama3 RoPE"):
        config_from_gguf(f)


def patch_value(path, key, fmt, value):
    """Overwrite the scalar value of metadata ``key`` in the file at ``path``."""
    field = gguf.GGUFReader(path).fields[key]
    data = bytearray(path.read_bytes())
    struct.pack_into("<" + fmt, data, field.offset + 8 + len(key) + 4, value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("key,fmt,value,words", [
    ("llama.block_count", "I", 2 ** 31, "but the file holds 2 blocks"),
    ("llama.embedding_length", "I", 2 ** 31, "has shape (325, 32), expected (325, 2147483648)"),
    ("llama.feed_forward_length", "I", 2 ** 31, "expected (2147483648, 32)"),
])
def test_absurd_sizes_refused_before_allocation(tmp_path, key, fmt, value, words):
    vocab = byte_bpe()
    path = patch_value(write_gguf(tmp_path / "x.gguf", random_model("llama-bpe", len(vocab.tokens)), vocab),
                       key, fmt, value)
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError) as e:
            LlamaForCausalLM.from_pretrained(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert words in str(e.value) and str(path) in str(e.value), str(e.value)
    assert peak < 16 * 2 ** 20, f"{peak} bytes allocated before refusing"


def test_unknown_tokenizer_model(tmp_path):
    vocab = byte_bpe()
    path = rewrite(tmp_path, vocab, model="bert")
    with pytest.raises(FileFormatError, match="tokenizer.ggml.model is 'bert'"):
        load_tokenizer(path)
