"""LoRA on the Llama decoder: LoraEmbedding (PEFT's embedding layout) against its one-hot formula and
finite differences, the decoder with LoRA on q/v/down_proj and embed_tokens against finite differences
(float64, rtol 1e-6, random upstream gradients), and what injection wraps ("all-linear" never the head)."""
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lowrank as lr
from lowrank.nn import Embedding
from lowrank.nn.gradcheck import gradcheck
from lowrank.tuners.lora.dora import DoraLinear, set_exact_norm_grad
from lowrank.tuners.lora.embedding import LoraEmbedding

SEED = st.integers(0, 2**16)
SMALL = settings(max_examples=15, deadline=None)
pytestmark = pytest.mark.filterwarnings(r"ignore:.*exceeds min\(:UserWarning")


def naive_lora_embedding(W, A, B, s, ids):
    """y = W[ids] + s · onehot(ids) Aᵀ Bᵀ, the dense one-hot product written out."""
    onehot = np.eye(W.shape[0])[ids]                                   # (..., V)
    return W[ids] + s * onehot @ A.T @ B.T                             # (..., V) @ (V, r) @ (r, d)


def random_lora_embedding(V, d, r, alpha, rslora, seed, dtype="float64"):
    rng = np.random.default_rng(seed)
    layer = LoraEmbedding(Embedding(V, d, dtype=dtype, seed=seed), r=r, lora_alpha=alpha, use_rslora=rslora, seed=seed)
    layer.lora_embedding_A["default"].data = rng.standard_normal((r, V)).astype(dtype)    # A = 0 at init
    return layer, rng


@SMALL
@example(V=3, d=2, r=5, B=1, T=1, alpha=4, rslora=False, seed=0)       # r > min(V, d), one token
@example(V=5, d=4, r=1, B=2, T=3, alpha=1, rslora=True, seed=1)
@given(V=st.integers(1, 7), d=st.integers(1, 6), r=st.integers(1, 9), B=st.integers(1, 3), T=st.integers(1, 4),
       alpha=st.sampled_from([1, 4, 16]), rslora=st.booleans(), seed=SEED)
def test_lora_embedding_matches_its_formula_and_finite_differences(V, d, r, B, T, alpha, rslora, seed):
    layer, rng = random_lora_embedding(V, d, r, alpha, rslora, seed)
    ids = rng.integers(0, V, (B, T))                                   # repeats: the scatter-add must add them
    A, Bm = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    s = alpha / (np.sqrt(r) if rslora else r)
    assert layer.scaling["default"] == pytest.approx(s)
    np.testing.assert_allclose(layer.forward(ids), naive_lora_embedding(layer.weight.data, A.data, Bm.data, s, ids),
                               rtol=1e-12, atol=1e-12)

    def backward(g):
        layer.zero_grad()
        layer.forward(ids)
        assert layer.backward(g) is None                               # ids get no gradient
        return {"A": A.grad, "B": Bm.grad}
    gradcheck(lambda: layer.forward(ids), backward, {"A": A.data, "B": Bm.data}, seed=seed)
    assert layer.weight.grad is None and not layer.weight.trainable    # the frozen base: no gradient at all


def test_peft_init_zero_A_normal_B_starts_at_the_base():
    base = Embedding(50, 40, seed=0)
    layer = LoraEmbedding(base, r=6, lora_alpha=12, seed=1)
    A, B = layer.lora_embedding_A["default"].data, layer.lora_embedding_B["default"].data
    assert A.shape == (6, 50) and B.shape == (40, 6) and A.dtype == B.dtype == np.float32
    assert not A.any() and abs(B.std() - 1) < 0.1                     # A = 0, B ~ N(0, 1): PEFT's (and loralib's)
    ids = np.arange(50).reshape(5, 10)
    np.testing.assert_array_equal(layer.forward(ids), base.weight.data[ids])
    other = LoraEmbedding(Embedding(50, 40, seed=0), r=6, init_lora_weights=False, seed=1)
    assert other.lora_embedding_A["default"].data.any()                # False: both random, as PEFT
    with pytest.raises(ValueError, match=r"LoraEmbedding '<root>' adapter 'x'.*PiSSA is defined for linear"):
        layer.update_layer("x", 2, 2, init_lora_weights="pissa")


def test_merge_adds_the_transposed_update_and_unmerge_takes_it_back():
    layer, rng = random_lora_embedding(9, 5, 3, 6, False, seed=3, dtype="float32")
    W0 = layer.weight.data.copy()
    ids = rng.integers(0, 9, (2, 7))
    y = layer.forward(ids)
    delta = layer.delta_weight("default")
    assert delta.shape == (5, 9)                                       # s·B·A (d, V), LoraLinear's layout
    layer.merge()
    np.testing.assert_allclose(layer.weight.data, W0 + delta.T, rtol=0, atol=0)
    np.testing.assert_allclose(layer.forward(ids), y, rtol=1e-6, atol=1e-6)
    layer.unmerge()
    bound = 4 * np.finfo(np.float32).eps * np.abs(W0 + delta.T).max()          # one rounding each way
    np.testing.assert_allclose(layer.weight.data, W0, rtol=0, atol=bound)


def test_a_merged_adapter_still_gets_the_unmerged_gradients():
    layer, rng = random_lora_embedding(6, 4, 2, 2, False, seed=4)
    ids, g = rng.integers(0, 6, (2, 3)), rng.standard_normal((2, 3, 4))
    layer.forward(ids)
    layer.backward(g)
    grads = [p.grad for p in (layer.lora_embedding_A["default"], layer.lora_embedding_B["default"])]
    layer.zero_grad()
    layer.merge()
    layer.forward(ids)
    layer.backward(g)
    for p, want in zip((layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]), grads):
        np.testing.assert_allclose(p.grad, want, rtol=1e-12)


def test_mixed_batch_rows_equal_their_own_adapter_and_gradients_split_by_rows():
    layer, rng = random_lora_embedding(8, 4, 2, 2, False, seed=5)
    layer.update_layer("b", 3, 5, init_lora_weights=False)
    ids, g = rng.integers(0, 8, (3, 4)), rng.standard_normal((3, 4, 4))
    names = ["b", "__base__", "default"]
    alone = {}
    for n in ("default", "b", None):
        layer.set_adapter(n)
        alone[n] = layer.forward(ids)
    layer.row_adapters = names                                          # one name per sequence
    y = layer.forward(ids)
    for i, n in enumerate(names):
        np.testing.assert_allclose(y[i], alone[None if n == "__base__" else n][i], rtol=1e-12)
    layer.backward(g)
    A, Bm = layer.lora_embedding_A["b"], layer.lora_embedding_B["b"]
    s = layer.scaling["b"]
    onehot = np.eye(8)[ids[0]]                                          # (T, V): only row 0 uses "b"
    np.testing.assert_allclose(Bm.grad, s * g[0].T @ (onehot @ A.data.T), rtol=1e-12)
    np.testing.assert_allclose(A.grad, s * (onehot.T @ g[0] @ Bm.data).T, rtol=1e-12)
    layer.row_adapters = ["b"] * 5
    with pytest.raises(ValueError, match=r"5 entries for ids of shape \(3, 4\).*per sequence, 3, or per token, 12"):
        layer.forward(ids)


# -- the decoder --------------------------------------------------------------------------------------------
def tiny_config(**kw):
    base = dict(vocab_size=7, hidden_size=8, intermediate_size=6, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=8, rms_norm_eps=1e-5, initializer_range=0.5)
    return lr.LlamaConfig(**{**base, **kw})


def randomize(lora_model, seed=0):
    """Every adapter tensor random and non-zero (B = 0, or A = 0 for the embedding, would hide a wrong gradient)."""
    rng = np.random.default_rng(seed)
    for name, p in lora_model.named_parameters():
        if ".lora_" in name:
            p.data = (0.5 * rng.standard_normal(p.shape) + (1.0 if "magnitude" in name else 0.0)).astype(p.dtype)


QV_DOWN_EMBED = ["embed_tokens", "q_proj", "v_proj", "down_proj"]


@pytest.mark.parametrize("extra", [{}, dict(use_rslora=True, rank_pattern={"v_proj": 3},
                                                 alpha_pattern={"embed_tokens": 5}),
                                   dict(use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])],
                         ids=["lora", "rslora-patterns", "dora"])
def test_decoder_lora_gradients_match_finite_differences(extra):
    model = lr.LlamaForCausalLM(tiny_config(), dtype="float64", seed=1)
    lm = lr.get_lora_model(model, lr.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": QV_DOWN_EMBED, **extra}))
    randomize(lm)
    set_exact_norm_grad(lm)                     # DoRA: the exact gradient (PEFT's detaches the norm)
    rng = np.random.default_rng(2)
    ids, mask = rng.integers(0, 7, (2, 4)), np.array([[1, 1, 1, 1], [0, 1, 1, 0]])
    params = {n: p for n, p in lm.named_parameters() if p.trainable}
    assert all(".lora_" in n for n in params) and len(params) == (18 if "use_dora" in extra else 14)

    def backward(g):
        lm.zero_grad()
        lm.model.forward(ids, mask)
        lm.backward(g)
        assert all(p.grad is None for p in lm.parameters() if not p.trainable)    # frozen: no gradient buffers
        return {n: p.grad for n, p in params.items()}
    gradcheck(lambda: lm.model.forward(ids, mask), backward, {n: p.data for n, p in params.items()}, rtol=1e-6)


def test_injection_wraps_embeddings_and_projections_by_name_with_patterns():
    model = lr.LlamaForCausalLM(tiny_config(), seed=0)
    config = lr.LoraConfig(r=2, lora_alpha=4, target_modules=QV_DOWN_EMBED, use_rslora=True,
                           rank_pattern={"embed_tokens": 5, r"layers\.1\.self_attn\.q_proj": 3},
                           alpha_pattern={"v_proj": 8})
    layers = dict(lr.get_lora_model(model, config).lora_layers())
    assert sorted(layers) == sorted([f"model.layers.{i}.{m}" for i in (0, 1)
                                     for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
                                    + ["model.embed_tokens"])
    emb = layers["model.embed_tokens"]
    assert isinstance(emb, LoraEmbedding) and emb.r["default"] == 5
    assert emb.scaling["default"] == pytest.approx(4 / 5 ** 0.5)
    assert emb.lora_embedding_A["default"].shape == (5, 7) and emb.lora_embedding_B["default"].shape == (8, 5)
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == 3
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == pytest.approx(8 / 2 ** 0.5)
    assert model.lm_head.weight is not emb.weight and type(model.model.embed_tokens) is LoraEmbedding


def test_dora_on_the_projections_and_a_clear_error_on_the_embedding():
    model = lr.LlamaForCausalLM(tiny_config(), seed=0)
    lm = lr.get_lora_model(model, lr.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    assert all(isinstance(l, DoraLinear) for _, l in lm.lora_layers()) and len(lm.lora_layers()) == 4
    with pytest.raises(ValueError, match="'model.embed_tokens' is an embedding: lowrank implements DoRA for linear"):
        lm.add_adapter("e", lr.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], use_dora=True))
    assert "e" not in lm.peft_config and type(model.model.embed_tokens) is Embedding    # all or nothing


@pytest.mark.parametrize("tied", [False, True])
def test_all_linear_adapts_every_projection_but_never_the_head(tied):
    model = lr.LlamaForCausalLM(tiny_config(tie_word_embeddings=tied), seed=0)
    lm = lr.get_lora_model(model, lr.LoraConfig(r=2, target_modules="all-linear"))
    names = sorted(n for n, _ in lm.lora_layers())
    assert names == sorted(f"model.layers.{i}.{m}" for i in (0, 1) for m in
                           ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert type(model.lm_head).__name__ == ("TiedLMHead" if tied else "Dense")
    if tied:                                                            # a tied head is never wrapped, even by name
        with pytest.raises(TypeError, match=r"\['lm_head'\], which are not Dense layers or embeddings"):
            lm.add_adapter("head", lr.LoraConfig(r=2, target_modules=["lm_head"]))
    else:                                                               # named explicitly, PEFT adapts it too
        lm.add_adapter("head", lr.LoraConfig(r=2, target_modules=["lm_head"]))
        assert "lm_head" in dict(lm.lora_layers())


def test_an_embedding_adapter_over_tied_weights_changes_the_input_side_and_refuses_to_merge():
    model = lr.LlamaForCausalLM(tiny_config(tie_word_embeddings=True), dtype="float64", seed=0)
    lm = lr.get_lora_model(model, lr.LoraConfig(r=2, target_modules=["embed_tokens"]))
    randomize(lm)
    emb, ids = model.model.embed_tokens, np.random.default_rng(1).integers(0, 7, (2, 5))
    assert emb.tied_to == ("lm_head",) and model.lm_head.weight is emb.weight
    h = lm.forward(ids)
    W = emb.weight.data.copy()
    with pytest.raises(ValueError, match=r"shared with \['lm_head'\] \(tied word embeddings\)"):
        lm.merge_and_unload()
    np.testing.assert_array_equal(emb.weight.data, W)
    np.testing.assert_array_equal(lm.forward(ids), h)


def test_adapter_management_covers_the_embedding():
    model = lr.LlamaForCausalLM(tiny_config(), dtype="float64", seed=0)
    ids = np.random.default_rng(1).integers(0, 7, (2, 5))
    y_base = model.forward(ids)
    lm = lr.get_lora_model(model, lr.LoraConfig(r=2, target_modules=QV_DOWN_EMBED))
    lm.add_adapter("other", lr.LoraConfig(r=3, target_modules=["embed_tokens"]))
    randomize(lm)
    emb = model.model.embed_tokens
    lm.set_adapter("other")
    assert emb.active_adapter == "other" and emb.lora_embedding_A["other"].trainable
    assert not emb.lora_embedding_A["default"].trainable
    lm.set_adapter("default")
    y = lm.forward(ids)
    assert not np.allclose(y, y_base)
    with lm.disable_adapter():
        np.testing.assert_allclose(lm.forward(ids), y_base, rtol=1e-12)
    lm.delete_adapter("other")
    assert list(emb.lora_embedding_A) == ["default"]
    merged = lm.merge_and_unload()
    assert type(merged.model.embed_tokens) is Embedding
    np.testing.assert_allclose(merged.forward(ids), y, rtol=1e-10, atol=1e-12)


def test_a_mixed_batch_through_the_decoder_gives_each_sequence_its_adapter():
    model = lr.LlamaForCausalLM(tiny_config(), dtype="float64", seed=0)
    lm = lr.get_lora_model(model, lr.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj", "v_proj"]))
    lm.add_adapter("b", lr.LoraConfig(r=3, lora_alpha=6, target_modules=["embed_tokens", "down_proj"]))
    randomize(lm)
    ids, names = np.random.default_rng(3).integers(0, 7, (3, 5)), ["b", "__base__", "default"]
    y = lm.forward(ids, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            with lm.disable_adapter():
                alone = lm.forward(ids)
        else:
            lm.set_adapter(name)
            alone = lm.forward(ids)
        np.testing.assert_allclose(y[i], alone[i], rtol=1e-12, atol=1e-14)


def test_adapter_files_use_peft_embedding_keys_and_round_trip(tmp_path):
    model = lr.LlamaForCausalLM(tiny_config(), seed=0)
    lm = lr.get_lora_model(model, lr.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    randomize(lm)
    ids = np.random.default_rng(1).integers(0, 7, (2, 5))
    lm.save_pretrained(tmp_path)
    from safetensors.numpy import load_file
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(["base_model.model.model.embed_tokens.lora_embedding_A",
                           "base_model.model.model.embed_tokens.lora_embedding_B"]
                          + [f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{f}.weight"
                             for i in (0, 1) for f in "AB"])
    back = lr.LoraModel.from_pretrained(lr.LlamaForCausalLM(tiny_config(), seed=0), tmp_path)
    np.testing.assert_array_equal(back.forward(ids), lm.forward(ids))


def test_a_wrong_embedding_tensor_shape_is_named(tmp_path):
    model = lr.LlamaForCausalLM(tiny_config(), seed=0)
    lm = lr.get_lora_model(model, lr.LoraConfig(r=2, target_modules=["embed_tokens"]))
    lm.save_pretrained(tmp_path)
    other = lr.LlamaForCausalLM(tiny_config(vocab_size=9), seed=0)
    with pytest.raises(ValueError, match=r"lora_embedding_A of embedding 'model.embed_tokens', \(r, V\) with r=2"):
        lr.LoraModel.from_pretrained(other, tmp_path)
