"""lowrank's Llama against transformers' LlamaForCausalLM (eager attention), both ways through files.

transformers computes three things in float32 even in a float64 model: RMSNorm, the RoPE tables
and the attention softmax. lowrank computes them in the wider of float32 and the model's dtype,
so against stock transformers it agrees to float32 rounding (test_stock_transformers_...), and
against transformers with those three casts widened the same way (the ``wide`` fixture: the same
code with ``float32`` replaced by ``promote_types(float32, dtype)``) to float64 rounding.
"""
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from lowrank.io.model_files import FileFormatError
from lowrank.models.llama import LlamaForCausalLM
from lowrank.nn import CausalLMLoss

V, T = 13, 6


@pytest.fixture
def wide(monkeypatch):
    """transformers' Llama with its float32 casts widened to promote_types(float32, dtype)."""
    wider = lambda dtype: torch.promote_types(torch.float32, dtype)

    def rms_forward(self, x):
        xf = x.to(wider(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(x.dtype)

    def rope_forward(self, x, position_ids):
        h, theta = 2 * self.inv_freq.shape[0], self.config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, h, 2, dtype=wider(x.dtype)) / h)
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

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_forward)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rope_forward)
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager_attention)


def hf_model(tied=False, heads=4, kv_heads=2, bias=False, seed=0, dtype=torch.float64):
    """A tiny random transformers Llama, every parameter (norms and biases too) randomized."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=4,
                                      max_position_embeddings=32, rope_theta=500.0, tie_word_embeddings=tied,
                                      attention_bias=bias, mlp_bias=bias, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


def batch(seed=0):
    """ids (3, T) and a mask: row 0 full, row 1 right-padded, row 2 left-padded."""
    ids = np.random.default_rng(seed).integers(0, V, (3, T))
    mask = np.ones((3, T), dtype=np.int64)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    return ids, mask


def assert_close(actual, expected, rtol):
    """Max |difference| within rtol of the largest |expected|."""
    expected = np.asarray(expected)
    err = np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


CASES = [dict(tied=False), dict(tied=True), dict(tied=False, heads=4, kv_heads=4, bias=True),
         dict(tied=True, heads=2, kv_heads=1)]


@pytest.mark.parametrize("case", CASES, ids=["untied-gqa", "tied-gqa", "mha-bias", "tied-mqa"])
def test_logits_and_gradients_equal_torch_autograd(tmp_path, wide, case):
    hf = hf_model(**case)
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float64")
    ids, mask = batch()
    real = mask.astype(bool)                                   # padded rows: compared nowhere, no real token sees them
    expected = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logits = ours(ids, mask)
    assert_close(logits[real], expected.detach().numpy()[real], 1e-10)

    g = np.random.default_rng(1).standard_normal(logits.shape) * real[..., None]
    expected.backward(torch.tensor(g))
    ours.backward(g)
    theirs = dict(hf.named_parameters())
    assert sorted(theirs) == sorted(n for n, _ in ours.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs[name].grad.numpy(), 1e-8)


def test_causal_lm_loss_and_its_gradients_equal_torch(tmp_path, wide):
    hf = hf_model(tied=True)
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float64")
    ids, mask = batch()
    labels = np.where(mask == 1, ids, -100)
    labels[2, 2] = -100                                        # left-padded row's first real token: no real predecessor
    out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    logits = out.logits[:, :-1].reshape(-1, V)     # transformers' own loss runs in float32; torch's in float64
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=-100)
    loss_fn = CausalLMLoss()
    loss = loss_fn(ours(ids, mask), labels)
    assert loss == pytest.approx(expected.item(), rel=1e-12)
    assert loss == pytest.approx(out.loss.item(), rel=1e-6)
    expected.backward()
    ours.backward(loss_fn.backward())
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert_close(p.grad, theirs[name].grad.numpy(), 1e-8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stock_transformers_agrees_to_float32_rounding(tmp_path, dtype):
    """Without the left-padded row: stock float64 transformers softmaxes a fully masked row in float32,
    where the float64 mask value is −inf, and its NaNs reach the real tokens through the next layer."""
    hf = hf_model(dtype=getattr(torch, dtype))
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    ids, mask = (a[:2] for a in batch())
    real = mask.astype(bool)
    expected = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    assert_close(ours(ids, mask)[real], expected[real], 1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_lowrank_save_pretrained_loads_in_transformers(tmp_path, wide, tied):
    hf = hf_model(tied=tied)
    hf.save_pretrained(tmp_path / "hf")
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype="float64")
    rng = np.random.default_rng(5)
    for _, p in ours.named_parameters():                      # new weights, so the file really carries them
        p.data = p.data + 0.1 * rng.standard_normal(p.shape)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float64,
                                                          attn_implementation="eager")
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    ids, mask = batch(seed=2)
    real = mask.astype(bool)
    expected = back(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    assert_close(ours(ids, mask)[real], expected[real], 1e-10)


def test_sharded_checkpoint_from_transformers_loads(tmp_path, wide):
    hf = hf_model()
    hf.save_pretrained(tmp_path, max_shard_size="4KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float64")
    ids, _ = batch()
    assert_close(ours(ids), hf(torch.tensor(ids)).logits.detach().numpy(), 1e-10)


def load_half_precision(tmp_path, torch_dtype):
    hf = hf_model(tied=True, dtype=torch_dtype)
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():                   # upcast exactly
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p.data, theirs[name].detach().to(torch.float32).numpy())
    hf32 = hf.to(torch.float32)
    ids, mask = batch()
    real = mask.astype(bool)
    expected = hf32(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    assert_close(ours(ids, mask)[real], expected[real], 1e-4)


def test_float16_checkpoint_loads_upcast(tmp_path):
    load_half_precision(tmp_path, torch.float16)


def test_bfloat16_checkpoint_loads_upcast(tmp_path):
    load_half_precision(tmp_path, torch.bfloat16)


def test_float64_checkpoint_is_not_narrowed_silently(tmp_path):
    hf_model().save_pretrained(tmp_path)
    narrowing = r"model\.safetensors: '[\w.]+' \(parameter\) has dtype float64; the model takes float32"
    with pytest.raises(FileFormatError, match=narrowing):
        LlamaForCausalLM.from_pretrained(tmp_path, dtype="float32")
