"""A GGUF base multiplied as llama.cpp multiplies it (``q8_activations``: each quantized layer's input rounded to
Q8_0 blocks first) and its decode step's stacked products (q/k/v and gate/up in one GGUF product each), against
an oracle built from gguf's own Q8_0 quantizer."""
from unittest import mock

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from test_gguf_qlora import IDS, gguf_file

from lowrank.models.llama import LlamaForCausalLM
from lowrank.nn.gguf_dense import GGUFDense
from lowrank.nn.kv_cache import KVCache


def ggufs_rounding(x):
    q8 = GGMLQuantizationType.Q8_0
    return quants.dequantize(quants.quantize(np.asarray(x, np.float32), q8), q8).astype(x.dtype)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_q8_activations_round_every_quantized_layers_input_as_ggufs_quantizer_does(tmp_path, qtype):
    path = gguf_file(tmp_path, "qwen2-tied", qtype)
    ours = LlamaForCausalLM.from_pretrained(path, keep_quantized=True, q8_activations=True)
    plain = LlamaForCausalLM.from_pretrained(path, keep_quantized=True)
    layers = [m for _, m in ours.named_modules() if isinstance(m, GGUFDense)]
    assert layers and all(m.q8_activations for m in layers) and "q8_activations=True" in repr(ours.lm_head)
    assert not any(m.q8_activations for _, m in plain.named_modules() if isinstance(m, GGUFDense))
    real = GGUFDense._product

    def rounded_first(self, kernels, x, b, *rest):                     # the oracle: gguf rounds, then the float path
        return real(self, kernels, ggufs_rounding(x), b, *rest)
    got = np.asarray(ours(IDS))
    with mock.patch.object(GGUFDense, "_product", rounded_first):
        want = np.asarray(plain(IDS))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(got - np.asarray(plain(IDS))).max() > 1e-4 * np.abs(want).max()   # the rounding shows


@pytest.mark.parametrize("q8", [False, True])
def test_a_decode_step_stacks_the_gguf_blocks_of_qkv_and_gate_up(tmp_path, q8):
    """keep_gguf_blocks lays the blocks out in model order, so q/k/v and gate/up are one GGUF product each: 4 a
    layer and the head instead of 7 and the head, with the numbers of the layers one by one."""
    path = gguf_file(tmp_path, "llama-untied", "Q4_0")
    model = LlamaForCausalLM.from_pretrained(path, keep_quantized=True, q8_activations=q8).eval()
    cache = KVCache.for_model(model.config, 2, 16)
    model.forward(IDS, kv_cache=cache)                                              # prefill
    calls = []
    real = GGUFDense._product

    def counting(self, kernels, x, b, blocks=None, shape=None):
        calls.append(shape or self.shape)
        return real(self, kernels, x, b, blocks, shape)
    with mock.patch.object(GGUFDense, "_product", counting):
        stacked = np.asarray(model.forward(IDS[:, :1], kv_cache=cache))
    c = model.config
    h = c.hidden_size // c.num_attention_heads
    qkv, gate_up = (c.num_attention_heads + 2 * c.num_key_value_heads) * h, 2 * c.intermediate_size
    assert calls.count((qkv, c.hidden_size)) == calls.count((gate_up, c.hidden_size)) == c.num_hidden_layers
    assert len(calls) == 4 * c.num_hidden_layers + 1
    apart = LlamaForCausalLM.from_pretrained(path, keep_quantized=True, q8_activations=q8).eval()
    for _, m in apart.named_modules():                                              # each its own array: no stack
        if isinstance(m, GGUFDense) and "weight_blocks" in m._parameters:
            m.weight_blocks.data = m.weight_blocks.data.copy()
    cache = KVCache.for_model(apart.config, 2, 16)
    apart.forward(IDS, kv_cache=cache)
    calls.clear()
    with mock.patch.object(GGUFDense, "_product", counting):
        one_by_one = np.asarray(apart.forward(IDS[:, :1], kv_cache=cache))
    assert len(calls) == 7 * c.num_hidden_layers + 1
    np.testing.assert_allclose(stacked, one_by_one, rtol=1e-5, atol=1e-6 * np.abs(one_by_one).max())


def test_keep_quantized_is_for_gguf_files(tmp_path):
    with pytest.raises(ValueError, match="keep_quantized and q8_activations are for a .gguf file"):
        LlamaForCausalLM.from_pretrained(tmp_path, keep_quantized=True)
