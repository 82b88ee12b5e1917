"""lowrank's decoder against transformers' Llama (linear and llama3 RoPE), Mistral, Qwen2 and Qwen3, in float64.

Each family is a tiny random transformers model built from transformers' own config class (eager
attention, every parameter randomized, biases and norms included), saved with ``save_pretrained`` and
loaded by ``LlamaForCausalLM.from_pretrained``. transformers' float32 casts (RMSNorm, the RoPE tables,
the softmax) are widened as in test_llama_hf.py; the RoPE tables by running transformers' own
``rope_init_fn`` with ``torch.float`` standing for float64. Logits agree to 1e-10 and gradients to 1e-8
(max |difference| over the largest |expected|); sequences are longer than the sliding window, and so are
the prompts of greedy generation (tokens equal to transformers' ``generate``) and of the KV-cache checks.
"""
import json
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import transformers
from transformers import modeling_rope_utils
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.nn import attention as attention_module
from lowrank.nn.kv_cache import KVCache
from lowrank.nn.rotary import rope_inv_freq, rope_tables
from lowrank.training.accounting import activation_bytes

V, T = 13, 7
SIZES = dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
             pad_token_id=None, attn_implementation="eager")
LLAMA3 = dict(rope_type="llama3", rope_theta=500.0, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)     # h = 8: wavelengths 6.3, 30, 140, 664 cover all three cases
FAMILIES = {    # name -> (transformers config class, its arguments beyond SIZES)
    "llama-llama3": (transformers.LlamaConfig, dict(head_dim=8, rope_parameters=LLAMA3)),
    "llama-linear": (transformers.LlamaConfig, dict(rope_scaling={"type": "linear", "factor": 3.0}, rope_theta=50.0,
                                                    attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=3, head_dim=6)),
    "qwen2": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=3, max_window_layers=1,
                                             tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=6, attention_bias=True, use_sliding_window=True,
                                             sliding_window=2, max_window_layers=0)),
}
MODELING = (modeling_llama, modeling_mistral, modeling_qwen2, modeling_qwen3)
CLASSES = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}


def wider(dtype):
    return torch.promote_types(torch.float32, dtype)


def transformers_inv_freq(rotary, dtype):
    """inv_freq from transformers' own rope init function for ``rotary``'s config, computed in ``dtype``."""
    rope_type = rotary.config.rope_parameters["rope_type"]
    init = rotary.compute_default_rope_parameters if rope_type == "default" else \
        modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type]
    with mock.patch.object(torch, "float", dtype):
        inv_freq, attention_scaling = init(rotary.config)
    assert inv_freq.dtype == dtype and attention_scaling == 1.0
    return inv_freq


@pytest.fixture
def wide(monkeypatch):
    """Every family's RMSNorm, RoPE tables and eager softmax in promote_types(float32, dtype)."""
    def rms_forward(self, x):
        xf = x.to(wider(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)

    def rope_forward(self, x, position_ids):
        inv_freq = transformers_inv_freq(self, wider(x.dtype))
        freqs = position_ids[..., None].to(inv_freq.dtype) * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def eager_attention(module, q, k, v, mask, scaling, dropout=0.0, **kwargs):
        k = modeling_llama.repeat_kv(k, module.num_key_value_groups)
        v = modeling_llama.repeat_kv(v, module.num_key_value_groups)
        w = torch.matmul(q, k.transpose(2, 3)) * scaling
        if mask is not None:
            w = w + mask
        w = torch.softmax(w, dim=-1, dtype=wider(q.dtype)).to(q.dtype)
        return torch.matmul(w, v).transpose(1, 2).contiguous(), w

    for modeling in MODELING:
        prefix = {modeling_llama: "Llama", modeling_mistral: "Mistral", modeling_qwen2: "Qwen2",
                  modeling_qwen3: "Qwen3"}[modeling]
        monkeypatch.setattr(getattr(modeling, f"{prefix}RMSNorm"), "forward", rms_forward)
        monkeypatch.setattr(getattr(modeling, f"{prefix}RotaryEmbedding"), "forward", rope_forward)
        monkeypatch.setattr(modeling, "eager_attention_forward", eager_attention)


def hf_model(family, seed=0, dtype=torch.float64):
    """A tiny random transformers model of ``family``, every parameter (norms and biases too) randomized."""
    config_class, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_class(**SIZES, **extra)
    model = CLASSES[config.model_type](config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    return model.eval()


def twins(family, tmp_path, dtype="float64"):
    """(transformers model, lowrank's from its save_pretrained folder)."""
    hf = hf_model(family, dtype=getattr(torch, dtype))
    hf.save_pretrained(tmp_path)
    return hf, LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype)


def batch(seed=0):
    """ids (3, T) and a mask: row 0 full, row 1 right-padded, row 2 left-padded."""
    ids = np.random.default_rng(seed).integers(0, V, (3, T))
    mask = np.ones((3, T), dtype=np.int64)
    mask[1, 5:] = 0
    mask[2, :2] = 0
    return ids, mask


def assert_close(actual, expected, rtol):
    """Max |difference| within rtol of the largest |expected|."""
    expected = np.asarray(expected)
    err = np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("block", [64, 2])                # T = 7 in one block of queries, or in four
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_gradients_equal_transformers(tmp_path, wide, family, block, monkeypatch):
    monkeypatch.setattr(attention_module, "QUERY_BLOCK", block)
    hf, ours = twins(family, tmp_path)
    theirs = dict(hf.named_parameters())
    assert sorted(theirs) == sorted(n for n, _ in ours.named_parameters())
    ids, mask = batch()
    real = mask.astype(bool)                                   # padded rows: compared nowhere
    expected = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logits = ours(ids, mask)
    assert_close(logits[real], expected.detach().numpy()[real], 1e-10)
    g = np.random.default_rng(1).standard_normal(logits.shape) * real[..., None]
    expected.backward(torch.tensor(g))
    ours.backward(g)
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs[name].grad.numpy(), 1e-8)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_the_window_changes_the_logits(tmp_path, wide, family):
    """The same weights without the window give other logits past W tokens: the test above sees it."""
    hf, ours = twins(family, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(sliding_window=None, layer_types=None, use_sliding_window=False)
    (tmp_path / "config.json").write_text(json.dumps(config))
    full = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float64")
    ids, _ = batch()
    W = hf.config.sliding_window
    np.testing.assert_allclose(full(ids)[:, :W], ours(ids)[:, :W], rtol=1e-12, atol=1e-12)
    assert not np.allclose(full(ids)[:, W:], ours(ids)[:, W:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_equals_transformers_past_the_window(tmp_path, wide, family):
    hf, ours = twins(family, tmp_path)
    ids = np.random.default_rng(3).integers(0, V, (2, 5))      # a prompt longer than the window
    expected = hf.generate(torch.tensor(ids), attention_mask=torch.ones(2, 5, dtype=torch.long), do_sample=False,
                           max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    np.testing.assert_array_equal(ours.generate(ids, max_new_tokens=8), expected.numpy())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lowrank_save_pretrained_loads_in_transformers(tmp_path, wide, family):
    _, ours = twins(family, tmp_path / "hf")
    rng = np.random.default_rng(5)
    for _, p in ours.named_parameters():                      # new weights, so the file really carries them
        p.data = p.data + 0.1 * rng.standard_normal(p.shape)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float64,
                                                             attn_implementation="eager")
    assert type(back) is CLASSES[ours.config.model_type]
    assert LlamaConfig.from_json_file(tmp_path / "ours" / "config.json") == ours.config
    ids, mask = batch(seed=2)
    real = mask.astype(bool)
    expected = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    assert_close(ours(ids, mask)[real], expected[real], 1e-10)


@pytest.mark.parametrize("family", ["llama-llama3", "llama-linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scaled_rope_tables_equal_transformers(family, dtype):
    """float32: transformers' own buffers and tables, to float32 rounding; float64: its init run in float64."""
    hf = hf_model(family, dtype=dtype)
    rotary, c = hf.model.rotary_emb, hf.config
    positions = torch.arange(40)[None]
    if dtype == torch.float64:
        inv_freq = transformers_inv_freq(rotary, torch.float64)
        angles = positions[0, :, None].double() * inv_freq
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    else:
        cos, sin = (t[0] for t in rotary(torch.zeros(1, dtype=dtype), positions))
    rope = c.rope_parameters
    scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta", "type")}
    ours = rope_tables(40, c.head_dim, rope["rope_theta"], np.dtype(str(dtype).split(".")[1]), np,
                       rope["rope_type"], scaling)
    rtol = 1e-6 if dtype == torch.float32 else 1e-15
    assert_close(ours[0], cos.numpy(), rtol)
    assert_close(ours[1], sin.numpy(), rtol)
    default = rope_tables(40, c.head_dim, rope["rope_theta"], np.float64)
    assert not np.allclose(default[0], ours[0], atol=1e-3)     # the scaling changes the tables


@settings(max_examples=40, deadline=None)
@given(half=st.integers(1, 16), theta=st.sampled_from([10.0, 500.0, 5e5]), factor=st.floats(1.0, 32.0),
       low=st.floats(0.5, 2.0), gap=st.floats(0.5, 8.0), original=st.integers(2, 8192),
       rope_type=st.sampled_from(["linear", "llama3"]))
def test_scaled_inv_freq_equals_transformers_for_any_numbers(half, theta, factor, low, gap, original, rope_type):
    """lowrank's inv_freq against transformers' rope init function run in float64, over the three llama3 cases."""
    rope = dict(rope_type=rope_type, rope_theta=theta, factor=factor)
    if rope_type == "llama3":
        rope.update(low_freq_factor=low, high_freq_factor=low + gap, original_max_position_embeddings=original)
    config = transformers.LlamaConfig(hidden_size=2 * half, num_attention_heads=1, head_dim=2 * half,
                                      max_position_embeddings=original + 1, rope_parameters=dict(rope))
    with mock.patch.object(torch, "float", torch.float64):
        expected, _ = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type](config)
    scaling = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    np.testing.assert_allclose(rope_inv_freq(2 * half, theta, np.float64, np, rope_type, scaling), expected.numpy(),
                               rtol=1e-14, atol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stock_float32_transformers_agrees_to_float32_rounding(tmp_path, family):
    hf, ours = twins(family, tmp_path, dtype="float32")
    ids, mask = (a[:2] for a in batch())
    real = mask.astype(bool)
    expected = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    assert_close(ours(ids, mask)[real], expected[real], 1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("pieces", [[5, 1, 1, 1, 1], [1] * 9, [2, 4, 3]])
def test_windowed_cache_pieces_equal_the_full_forward_and_padding_shifts_nothing(tmp_path, family, pieces):
    """Through the KV cache, prompts longer than the window, two rows left-padded (one of them by more than W
    positions): the same logits as the training forward, and a padded row's real tokens those of the row alone."""
    _, ours = twins(family, tmp_path)
    rng = np.random.default_rng(4)
    ids, mask = rng.integers(0, V, (3, 9)), np.ones((3, 9), np.int64)
    mask[1, :4] = mask[2, :1] = 0

    def in_pieces(ids, mask, pieces):
        cache = KVCache.for_model(ours.config, len(ids), ids.shape[1], "float64")
        starts = np.cumsum([0] + pieces[:-1])
        return np.concatenate([ours(ids[:, t:t + n], attention_mask=mask[:, t:t + n], kv_cache=cache)
                               for t, n in zip(starts, pieces)], axis=1)
    real = mask.astype(bool)
    full = ours(ids, mask)
    got = in_pieces(ids, mask, pieces)
    np.testing.assert_allclose(got[real], full[real], rtol=1e-10, atol=1e-12)
    alone = ours(ids[1:2, 4:])
    np.testing.assert_allclose(full[1:2, 4:], alone, rtol=1e-10, atol=1e-12)
    assert np.isfinite(got).all() and np.isfinite(full).all()


def test_qk_norm_keeps_what_the_attention_docstring_says():
    """Frozen Qwen3 attention: the Llama figure (test_llama_memory.py) plus q_norm's and k_norm's inputs and
    1/RMS, B·T·(H + H_kv)·(h + 1) floats."""
    B, T, H, H_kv, h = 3, 6, 4, 2, 6
    config = LlamaConfig(model_type="qwen3", vocab_size=V, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=H, num_key_value_heads=H_kv, head_dim=h)
    model = LlamaForCausalLM(config, seed=0).requires_grad_(False)
    model.forward(np.random.default_rng(1).integers(0, V, (B, T)))
    llama = B * T * h * (H + 2 * H_kv) + 2 * T * h                     # rotated q, k, v and the RoPE tables
    assert activation_bytes(model.model.layers[0].self_attn) == 4 * (llama + B * T * (H + H_kv) * (h + 1))
