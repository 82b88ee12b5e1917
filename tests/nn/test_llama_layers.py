"""The Llama layers (lowrank.nn) and the decoder (lowrank.models.llama): forward against slow float64
formulas, backward against central finite differences (rtol 1e-6, random upstream gradients),
and the errors a bad input or a bad checkpoint must raise."""
import json
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank.io.atomic import commit_files
from lowrank.nn.gradcheck import check_module, gradcheck
from lowrank.io.model_files import FileFormatError, tensor_file_bytes
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.nn.module import CallOrderError, Module
from lowrank.nn import attention as attention_module, dispatch
from lowrank.kernels.reference import causal_softmax
from lowrank.nn import CausalLMLoss, Embedding, LlamaAttention, LlamaMLP, RMSNorm, RotaryEmbedding, SiLU

SEED = st.integers(0, 2**16)
SMALL = settings(max_examples=16)


class WithMask(Module):
    """Binds an attention mask so check_module can call forward(x)."""

    def __init__(self, inner, mask):
        super().__init__()
        self.inner, self.mask = inner, mask

    def forward(self, x):
        return self.inner.forward(x, self.mask)

    def backward(self, dy):
        return self.inner.backward(dy)


def naive_attention(x, attn, mask):
    """Per batch, head and query, with an explicit repeat_kv and RoPE on (j, j + h/2) pairs; each head of q and k
    RMS-normalized first when the layer has q_norm/k_norm, and only the last W keys seen with a window W."""
    B, T, d = x.shape
    H, H_kv, h = attn.num_heads, attn.num_kv_heads, attn.head_dim
    lin = lambda layer, u: u @ layer.weight.data.T + (0 if layer.bias is None else layer.bias.data)
    proj = lambda layer: lin(layer, x.reshape(B * T, d))
    proj_o = lambda u: lin(attn.o_proj, u)
    q, k, v = (proj(p).reshape(B, T, -1, h) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if attn.qk_norm:
        norm = lambda u, layer: layer.weight.data * u / np.sqrt((u * u).mean(-1, keepdims=True) + layer.eps)
        q, k = norm(q, attn.q_norm), norm(k, attn.k_norm)
    W = attn.sliding_window or T

    def rope(u, t):
        out = u.copy()
        for j in range(h // 2):
            a = t * attn.rotary.rope_theta ** (-2 * j / h)
            out[j], out[j + h // 2] = u[j] * math.cos(a) - u[j + h // 2] * math.sin(a), \
                u[j + h // 2] * math.cos(a) + u[j] * math.sin(a)
        return out

    O = np.zeros((B, T, H, h))
    for b in range(B):
        for i in range(H):
            kv = i // (H // H_kv)
            for t in range(T):
                keys = [s for s in range(max(0, t - W + 1), t + 1) if mask is None or mask[b, s]]
                if not keys:
                    continue
                s = np.array([rope(q[b, t, i], t) @ rope(k[b, s, kv], s) / math.sqrt(h) for s in keys])
                p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                O[b, t, i] = sum(p[n] * v[b, s, kv] for n, s in enumerate(keys))
    return proj_o(O.reshape(B * T, H * h))


# -- layers ---------------------------------------------------------------------------------
@given(B=st.integers(1, 3), T=st.integers(1, 5), V=st.integers(1, 9), d=st.integers(1, 4), seed=SEED)
def test_embedding_gradient_is_a_scatter_add(B, T, V, d, seed):
    emb = Embedding(V, d, dtype="float64", seed=seed)
    ids = np.random.default_rng(seed).integers(0, V, (B, T))                  # repeats included
    np.testing.assert_array_equal(emb(ids), emb.weight.data[ids])

    def backward(g):
        emb.zero_grad()
        emb.forward(ids)
        assert emb.backward(g) is None
        return {"weight": emb.weight.grad}
    gradcheck(lambda: emb.forward(ids), backward, {"weight": emb.weight.data}, seed=seed)


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), eps=st.sampled_from([1e-6, 0.1]), seed=SEED,
       backend=st.sampled_from(["numpy", "numba"]))
def test_rmsnorm_matches_formula_and_finite_differences(shape, eps, seed, backend):
    """On both kernel backends: the reference's array code and Numba's row loops."""
    rng = np.random.default_rng(seed)
    norm = RMSNorm(shape[-1], eps, dtype="float64")
    norm.backend = backend
    norm.weight.data = rng.standard_normal(shape[-1])
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(norm(x), norm.weight.data * x / np.sqrt((x**2).mean(-1, keepdims=True) + eps),
                               rtol=1e-12)
    check_module(norm, x, seed=seed, rtol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_rmsnorm_computes_float32_input_in_float32(backend):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    norm = RMSNorm(5)
    norm.backend = backend
    y = norm(x)
    assert y.dtype == np.float32 and norm._cache.r.dtype == np.float32
    assert norm.backward(np.ones_like(y)).dtype == np.float32


@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=SEED)
def test_silu_matches_finite_differences(shape, seed):
    z = 3 * np.random.default_rng(seed).standard_normal(shape)
    np.testing.assert_allclose(SiLU()(z), z / (1 + np.exp(-z)), rtol=1e-12)
    check_module(SiLU(), z, seed=seed, rtol=1e-6)


@given(T=st.integers(1, 6), half=st.integers(1, 3), theta=st.sampled_from([10.0, 10000.0]),
       dtype=st.sampled_from(["float32", "float64"]))
def test_rotary_tables_hold_each_pairs_angle(T, half, theta, dtype):
    """Pair (j, j + h/2) at position t turns by t θ^(−2j/h); the attention rotates by these tables
    (test_attention_matches_naive_loops_and_finite_differences)."""
    h = 2 * half
    cos, sin = RotaryEmbedding(h, theta).tables(T, dtype)
    assert cos.dtype == sin.dtype == dtype and cos.shape == (T, h)
    angles = np.arange(T)[:, None] * theta ** (-2 * np.arange(half) / h)                     # (T, h/2)
    rtol = 1e-6 if dtype == "float32" else 1e-12
    for table, f in ((cos, np.cos), (sin, np.sin)):
        np.testing.assert_allclose(table, np.concatenate([f(angles)] * 2, axis=1), rtol=rtol, atol=rtol)


@SMALL
@given(B=st.integers(1, 2), T=st.integers(1, 7), H_kv=st.integers(1, 2), G=st.integers(1, 2),
       h=st.sampled_from([2, 4]), d=st.integers(1, 6), bias=st.booleans(), masked=st.booleans(), seed=SEED,
       backend=st.sampled_from(["numpy", "numba"]), window=st.sampled_from([None, 1, 2, 3]), qk_norm=st.booleans(),
       block=st.sampled_from([1, 2, 3, 64]))
def test_attention_matches_naive_loops_and_finite_differences(B, T, H_kv, G, h, d, bias, masked, seed, backend,
                                                             window, qk_norm, block):
    """On both kernel backends of RoPE and the softmax: the reference's array code and Numba's loops; with
    Mistral's sliding window and Qwen3's per-head q/k RMSNorm (its weights moved off ones); the queries in
    blocks of 1, 2, 3 or (here: all in one) 64."""
    rng = np.random.default_rng(seed)
    attn = LlamaAttention(d, H_kv * G, H_kv, h, rope_theta=100.0, bias=bias, qk_norm=qk_norm, sliding_window=window,
                          dtype="float64", seed=seed)
    attn.backend = backend
    for name, p in attn.named_parameters():
        if "norm" in name:
            p.data = 1 + 0.3 * rng.standard_normal(p.shape)
    mask = rng.integers(0, 2, (B, T)) if masked else None                    # rows with no visible key included
    x = rng.standard_normal((B, T, d))
    with mock.patch.object(attention_module, "QUERY_BLOCK", block):
        np.testing.assert_allclose(attn(x, mask).reshape(B * T, d), naive_attention(x, attn, mask), rtol=1e-10,
                                   atol=1e-12)
        check_module(WithMask(attn, mask), x, seed=seed, rtol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_query_whose_window_holds_only_padding_sees_no_key(backend):
    """Row 0, query 2: key 0 is a token but lies outside the window W = 1, keys 1, 2 are padding: P = 0 there,
    so the output is o_proj's bias alone, as for a row with no visible key at all."""
    rng = np.random.default_rng(0)
    attn = LlamaAttention(4, 2, 1, 2, sliding_window=1, bias=True, dtype="float64", seed=0)
    attn.backend = backend
    attn.o_proj.bias.data = rng.standard_normal(4)
    mask = np.array([[1, 0, 0], [0, 1, 0]])
    x = rng.standard_normal((2, 3, 4))
    y = attn(x, mask)
    np.testing.assert_allclose(y.reshape(6, 4), naive_attention(x, attn, mask), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(y[0, 2], attn.o_proj.bias.data)
    check_module(WithMask(attn, mask), x, seed=0, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 40])
def test_attention_blocks_skip_the_keys_their_queries_cannot_see(monkeypatch, window):
    """T = 150 in blocks of 64 queries: each block's softmax, forward's and backward's, runs over the keys up to
    its last query only (64, 128, 150 of them), and with a window W = 40 from W − 1 before its first query on."""
    attn = LlamaAttention(8, 2, 1, 4, sliding_window=window, dtype="float64", seed=0)
    attn.backend = "numpy"
    kern = dispatch.kernels_for(np.zeros(1), "numpy")
    seen = []

    def softmax(S, key_mask=None, past=0):
        seen.append((S.shape[-2], S.shape[-1], past))
        return causal_softmax(S, key_mask, past)
    monkeypatch.setattr(kern, "causal_softmax", softmax)
    x = np.random.default_rng(0).standard_normal((1, 150, 8))
    with mock.patch.object(attention_module, "QUERY_BLOCK", 64):
        attn.forward(x)
        attn.backward(np.ones_like(x))
    if window is None:            # (queries, keys, keys before the first query)
        expected = [(64, 64, 0), (64, 128, 64), (22, 150, 128)]
    else:                         # keys from 64 − 39 = 25 and 128 − 39 = 89 on
        expected = [(64, 64, 0), (64, 103, 39), (22, 61, 39)]
    assert seen == expected * 2


def test_frozen_attention_keeps_no_projection_inputs_and_computes_no_weight_gradients():
    attn = LlamaAttention(8, 4, 2, dtype="float64", seed=0)
    for p in attn.parameters():
        p.trainable = False
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    attn(x)
    assert all(getattr(attn, n)._cache.x is None for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    attn.backward(np.ones_like(x))
    assert all(p.grad is None for p in attn.parameters())


@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=3), d=st.integers(1, 5), I=st.integers(1, 6),
       bias=st.booleans(), seed=SEED, backend=st.sampled_from(["numpy", "numba"]))
def test_swiglu_mlp_matches_formula_and_finite_differences(shape, d, I, bias, seed, backend):
    """On both kernel backends of silu(g) ⊙ u: the reference's array code and Numba's loop."""
    mlp = LlamaMLP(d, I, bias=bias, dtype="float64", seed=seed)
    mlp.backend = backend
    x = np.random.default_rng(seed).standard_normal((*shape, d))
    lin = lambda l, u: u @ l.weight.data.T + (0 if l.bias is None else l.bias.data)
    g = lin(mlp.gate_proj, x)
    np.testing.assert_allclose(mlp(x), lin(mlp.down_proj, g / (1 + np.exp(-g)) * lin(mlp.up_proj, x)), rtol=1e-10)
    check_module(mlp, x, seed=seed, rtol=1e-6)


@given(B=st.integers(1, 3), T=st.integers(2, 5), V=st.integers(1, 6), seed=SEED)
def test_causal_lm_loss_matches_shifted_cross_entropy_and_finite_differences(B, T, V, seed):
    rng = np.random.default_rng(seed)
    z = 3 * rng.standard_normal((B, T, V))
    labels = rng.integers(0, V, (B, T))
    labels[rng.random((B, T)) < 0.3] = -100
    labels[0, 1] = 0                                                          # at least one counted token
    loss = CausalLMLoss()
    terms = [math.log(np.exp(z[b, t]).sum()) - z[b, t, labels[b, t + 1]]
             for b in range(B) for t in range(T - 1) if labels[b, t + 1] != -100]
    assert loss(z, labels) == pytest.approx(sum(terms) / len(terms), rel=1e-12)

    def backward(g):
        loss.forward(z, labels)
        return {"logits": g * loss.backward()}
    gradcheck(lambda: np.array(loss.forward(z, labels)), backward, {"logits": z}, seed=seed)


def test_causal_lm_loss_refuses_nothing_to_predict_and_bad_labels():
    z = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="no label to predict"):
        CausalLMLoss()(z, np.array([[5, -100, -100]]))
    with pytest.raises(ValueError, match=r"\[0, 4\).*got 7"):
        CausalLMLoss()(z, np.array([[0, 7, 1]]))
    with pytest.raises(CallOrderError):
        CausalLMLoss().backward()


# -- the whole decoder ----------------------------------------------------------------------
def tiny_config(**kw):
    base = dict(vocab_size=7, hidden_size=8, intermediate_size=6, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=8, rms_norm_eps=1e-5, initializer_range=0.5)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("tied", [False, True])
def test_two_layer_decoder_gradients_match_finite_differences(tied):
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=tied, attention_bias=tied), dtype="float64", seed=1)
    rng = np.random.default_rng(2)
    for _, p in model.named_parameters():
        p.data[...] = 0.5 * rng.standard_normal(p.shape)
    ids, mask = rng.integers(0, 7, (2, 4)), np.array([[1, 1, 1, 1], [0, 1, 1, 0]])
    params = dict(model.named_parameters())
    assert ("lm_head.weight" in params) == (not tied)

    def backward(g):
        model.zero_grad()
        model.forward(ids, mask)
        model.backward(g)
        return {n: p.grad for n, p in params.items()}
    gradcheck(lambda: model.forward(ids, mask), backward, {n: p.data for n, p in params.items()}, rtol=1e-6)


def test_lora_wraps_the_projections_by_name():
    from lowrank.tuners.lora.config import LoraConfig
    from lowrank.tuners.lora.model import get_lora_model
    model = LlamaForCausalLM(tiny_config(), dtype="float64", seed=0)
    lora = get_lora_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = np.random.default_rng(0).integers(0, 7, (2, 5))
    lora.backward(np.ones_like(lora.forward(ids)))
    trained = sorted(n for n, p in lora.named_parameters() if p.grad is not None)
    assert len(trained) == 8 and all(".self_attn.q_proj.lora_" in n or ".self_attn.v_proj.lora_" in n for n in trained)


# -- bad inputs -----------------------------------------------------------------------------
def test_bad_inputs_raise_errors_that_name_the_problem():
    model = LlamaForCausalLM(tiny_config(), seed=0)
    with pytest.raises(ValueError, match=r"Embedding 'model.embed_tokens'.*\[0, 7\).*got id 7"):
        model(np.array([[1, 7]]))
    with pytest.raises(ValueError, match="got id -1"):
        model(np.array([[-1, 2]]))
    with pytest.raises(TypeError, match="integer array of token ids"):
        model(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="T=9 exceeds max_position_embeddings=8"):
        model(np.zeros((1, 9), int))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, T\) = \(1, 3\).*\(3,\)"):
        model(np.zeros((1, 3), int), np.ones(3))
    with pytest.raises(ValueError, match="0 \\(padding\\) or 1"):
        model(np.zeros((1, 3), int), np.array([[1, 2, 1]]))
    with pytest.raises(CallOrderError):
        LlamaForCausalLM(tiny_config(), seed=0).backward(np.zeros((1, 2, 7)))


def test_config_reads_both_rope_forms_and_refuses_what_it_cannot_compute():
    new = {**tiny_config().to_dict(), "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"},
           "some_future_field": 1, "torch_dtype": "bfloat16"}
    c = LlamaConfig.from_dict(new)
    assert (c.rope_theta, c.dtype, c.head_dim) == (500.0, "bfloat16", 2)
    old = {k: v for k, v in new.items() if k != "rope_parameters"} | {"rope_theta": 250.0}
    assert LlamaConfig.from_dict(old).rope_theta == 250.0
    assert LlamaConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="hidden_act 'gelu'.*only 'silu'"):
        LlamaConfig.from_dict({**new, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope_type 'llama3' lacks factor, low_freq_factor"):
        LlamaConfig.from_dict({**new, "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3"}})
    with pytest.raises(ValueError, match="rope_type 'dynamic'.*supported: default, linear, llama3"):
        LlamaConfig.from_dict({**old, "rope_scaling": {"type": "dynamic", "factor": 2.0}})


def write_checkpoint(folder, model, tensors=None, shards=None):
    """config.json + model.safetensors, or shards + an index when ``shards`` maps name -> file."""
    tensors = dict(model.state_dict()) if tensors is None else tensors
    files = {"config.json": json.dumps(model.config.to_dict()).encode()}
    if shards is None:
        files["model.safetensors"] = tensor_file_bytes(tensors)
    else:
        for f in set(shards.values()):
            files[f] = tensor_file_bytes({n: a for n, a in tensors.items() if shards[n] == f})
        files["model.safetensors.index.json"] = json.dumps({"weight_map": shards}).encode()
    commit_files(folder, files)


def test_checkpoint_roundtrip_single_and_sharded(tmp_path):
    model = LlamaForCausalLM(tiny_config(), dtype="float64", seed=3)
    model.save_pretrained(tmp_path / "one")
    names = [n for n, _ in model.named_parameters()]
    write_checkpoint(tmp_path / "sharded", model, shards={n: f"model-{i % 3}.safetensors" for i, n in enumerate(names)})
    ids = np.random.default_rng(0).integers(0, 7, (2, 5))
    for folder in ("one", "sharded"):
        back = LlamaForCausalLM.from_pretrained(tmp_path / folder, dtype="float64")
        np.testing.assert_array_equal(back(ids), model(ids))


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "tied_head", "shard_mismatch"])
def test_bad_checkpoints_name_the_file_and_tensor(tmp_path, problem):
    tied = problem == "tied_head"
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=tied), seed=0)
    tensors = dict(model.state_dict())
    shards = None
    if problem == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif problem in ("extra", "tied_head"):
        tensors["lm_head.weight" if tied else "model.layers.0.self_attn.rotary.inv_freq"] = np.ones((7, 8), np.float32)
    elif problem == "shape":
        tensors["model.norm.weight"] = np.ones(9, np.float32)
    else:
        shards = {n: "a.safetensors" for n in tensors} | {"model.norm.weight": "b.safetensors"}
    write_checkpoint(tmp_path, model, tensors, shards)
    if problem == "shard_mismatch":                       # b.safetensors holds more than the index says
        (tmp_path / "b.safetensors").write_bytes(tensor_file_bytes({n: tensors[n] for n in list(tensors)[-2:]}))
    expected = {"missing": r"config\.json does not match the checkpoint beside it: missing tensors "
                           r"\['model.layers.1.mlp.up_proj.weight'\]",
                "extra": r"unexpected tensors \['model.layers.0.self_attn.rotary.inv_freq'\]",
                "shape": r"model\.safetensors: 'model.norm.weight' has shape \(9,\), but config\.json \(.*\) gives \(8,\)",
                "tied_head": r"unexpected tensors \['lm_head.weight'\].*tie_word_embeddings",
                "shard_mismatch": r"b\.safetensors: the index lists \['model.norm.weight'\]"}[problem]
    with pytest.raises(FileFormatError, match=expected):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_loading_into_a_model_is_all_or_nothing(tmp_path):
    from lowrank.models.llama.checkpoint import load_weights
    model = LlamaForCausalLM(tiny_config(), seed=0)
    tensors = {n: a + 1 for n, a in model.state_dict().items()}
    tensors["model.norm.weight"] = np.ones(9, np.float32)
    write_checkpoint(tmp_path, model, tensors)
    before = {n: a.copy() for n, a in model.state_dict().items()}
    with pytest.raises(FileFormatError):
        load_weights(model, tmp_path)
    for n, a in model.state_dict().items():
        np.testing.assert_array_equal(a, before[n])
    with pytest.raises(FileFormatError, match="config.json: file not found"):
        LlamaForCausalLM.from_pretrained(tmp_path / "nowhere")
