"""Mixed-adapter batches (PEFT's ``adapter_names=``, one adapter per row or sequence), at every level:
one LoraLinear, a DoraLinear with plain and base rows, a LoraModel over an MLP, a Llama decoder.

The oracle is the definition: a mixed batch is every row run alone with its adapter. So row b's output
equals that of x[b:b+1] run with adapter names[b] ("__base__": with the adapters disabled), and each
adapter's gradients equal the sum, over its rows, of the gradients of those rows run alone with the
same upstream gradient rows; finite differences check the mixed backward itself. Generation's mixed
batches are in tests/models/test_generate.py.
"""
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lowrank as lr
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.nn.gradcheck import gradcheck
from lowrank.tuners.lora.dora import DoraNorm
from lowrank.tuners.lora.mixed import BASE, rows_for

from test_dora import make, shapes
from test_lora_layer import CPU_BACKENDS, make_lora, randn
from test_peft_model import mlp, randomize_adapter

pytestmark = pytest.mark.filterwarnings(r"ignore:.*exceeds min\(D_in, D_out\):UserWarning")

# -- one LoraLinear ---------------------------------------------------------------------------------
def three_adapters(D_in=7, D_out=5, backend=None, ranks=(1, 3, 2)):
    """'default', 'b', 'c' of ``ranks``: different ranks and scalings, B != 0."""
    layer = make_lora(D_in, D_out, ranks[0], backend=backend)
    layer.update_layer("b", ranks[1], 5.0, init_lora_weights=False)
    layer.update_layer("c", ranks[2], 1.5, use_rslora=True, init_lora_weights=False)
    return layer


RANKS = [(1, 3, 2), (1, 8, 6)]          # the second pads the stacks to r = 8 > min(D_in, D_out) = 5


NAMES = st.lists(st.sampled_from(["default", "b", "c", "__base__"]), min_size=1, max_size=16)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ranks", RANKS)
@given(names=NAMES, seed=st.integers(0, 2**16))
@example(names=["__base__"], seed=0)
@settings(max_examples=15)
def test_mixed_batch_rows_and_gradients_equal_one_adapter_at_a_time(backend, ranks, names, seed):
    layer = three_adapters(backend=backend, ranks=ranks)
    N = len(names)
    x, dy = randn(seed, N, 7), randn(seed + 1, N, 5)
    y, dx = layer(x, adapter_names=names), layer.backward(dy)
    mixed_grads = {n: (layer.lora_A[n].grad, layer.lora_B[n].grad) for n in ("default", "b", "c")}
    for name in set(names):
        rows = [i for i, n in enumerate(names) if n == name]
        layer.zero_grad()
        layer.set_adapter(None if name == "__base__" else name)
        np.testing.assert_allclose(y[rows], layer(x[rows]), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx[rows], layer.backward(dy[rows]), rtol=1e-12, atol=1e-12)
        if name != "__base__":                                 # Σ over its rows, computed separately
            np.testing.assert_allclose(mixed_grads[name][0], layer.lora_A[name].grad, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(mixed_grads[name][1], layer.lora_B[name].grad, rtol=1e-12, atol=1e-12)
    for unused in {"default", "b", "c"} - set(names):
        assert mixed_grads[unused] == (None, None)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_stacks_are_built_once_per_set_of_adapters_whatever_the_rows_order(backend):
    """With a stack_cache (generation, the server), a reordered batch over the same adapters, or over some of
    them, reuses the stacks (one cache entry); a set they don't hold builds its own; every row still equals its
    adapter run alone."""
    layer = three_adapters(backend=backend)
    layer.eval()
    layer.stack_cache = {}
    x = randn(0, 4, 7)
    solo = {}
    for name in ("default", "b", "c"):
        layer.set_adapter(name)
        solo[name] = layer(x)
    for names in (["b", "default", "b", "c"], ["c", "b", "default", "default"], ["default", "c", "c", "b"]):
        y = layer(x, adapter_names=names)
        for i, n in enumerate(names):
            np.testing.assert_allclose(y[i], solo[n][i], rtol=1e-12, atol=1e-12)
    assert len(layer.stack_cache) == 1
    y = layer(x, adapter_names=["b", "b", "__base__", "c"])            # a subset: the stacks of all three serve it
    assert len(layer.stack_cache) == 1
    np.testing.assert_allclose(y[[0, 1, 3]], np.stack([solo["b"][0], solo["b"][1], solo["c"][3]]), rtol=1e-12,
                               atol=1e-12)
    layer.stack_cache = {}
    layer(x, adapter_names=["b", "c", "c", "b"])
    layer(x, adapter_names=["default", "b", "c", "b"])                  # not a subset of {b, c}: its own stacks
    assert len(layer.stack_cache) == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("ranks", RANKS)
def test_mixed_batch_gradients_match_finite_differences(backend, ranks):
    layer = three_adapters(backend=backend, ranks=ranks)
    names = ["b", "__base__", "default", "b", "c", "c", "default"]
    x = randn(0, len(names), 7)
    params = {f"{t}.{n}": getattr(layer, t)[n] for t in ("lora_A", "lora_B") for n in ("default", "b", "c")}

    def backward(g):
        layer.zero_grad()
        layer(x, adapter_names=names)
        return {"x": layer.backward(g), **{k: p.grad for k, p in params.items()}}

    gradcheck(lambda: layer(x, adapter_names=names), backward,
              {"x": x, **{k: p.data for k, p in params.items()}}, rtol=1e-6)



# -- a DoraLinear: DoRA, plain and base rows ------------------------------------------------------------
@given(shapes, st.booleans(), st.booleans())
def test_mixed_batch_of_dora_plain_and_base_rows(shape, exact, bias):
    N, D_in, D_out, r, seed = shape
    layer, _ = make((1, D_in, D_out, r, seed), exact=exact, bias=bias)
    layer.update_layer("plain", r, 2.0, init_lora_weights=False)
    layer.update_layer("dora2", 1, 3.0, init_lora_weights=False, use_dora=True)
    layer.base_layer.requires_grad_(True)                    # dW = dzᵀ x (+ κ ⊙ V), db = Σ dy on DoRA rows too
    rng = np.random.default_rng(seed)
    names = [str(n) for n in rng.choice(["default", "plain", "dora2", BASE], size=N + 3)]
    x = rng.standard_normal((len(names), D_in))
    y = layer.forward(x, adapter_names=names)
    for name in set(names):
        rows = [i for i, n in enumerate(names) if n == name]
        layer.set_adapter(None if name == BASE else name)
        np.testing.assert_allclose(y[rows], layer.forward(x[rows]), rtol=1e-10, atol=1e-12)
    params = {n: p for n, p in layer.named_parameters() if p.trainable}

    def backward(g):
        layer.zero_grad()
        layer.forward(x, adapter_names=names)
        return {"x": layer.backward(g), **{n: np.zeros_like(p.data) if p.grad is None else p.grad
                                           for n, p in params.items()}}
    frozen = {n: DoraNorm(layer.get_weight_norm(n).copy(), None, None) for n in ("default", "dora2")}
    with mock.patch.object(layer, "_norm", layer._norm if exact else frozen.__getitem__):
        gradcheck(lambda: layer.forward(x, adapter_names=names), backward,
                  {"x": x, **{n: p.data for n, p in params.items()}})



# -- a LoraModel over an MLP, with modules_to_save ---------------------------------------------------
def adapter_params(model, name):
    """{parameter name: Parameter} of adapter ``name`` (LoRA factors and modules_to_save copies)."""
    return {n: p for n, p in model.named_parameters()
            if n.endswith(f".lora_A.{name}") or n.endswith(f".lora_B.{name}") or f".modules_to_save.{name}." in n}


def test_mixed_batch_equals_each_adapter_alone_forward_and_gradients():
    base = mlp()
    model = lr.get_lora_model(base, lr.LoraConfig(r=2, target_modules=["0", "2"], modules_to_save=["4"]),
                              adapter_name="a")
    model.add_adapter("b", lr.LoraConfig(r=3, target_modules=["2"], modules_to_save=["4"]))
    randomize_adapter(model, "a", 1)
    randomize_adapter(model, "b", 2)
    for p in {**adapter_params(model, "a"), **adapter_params(model, "b")}.values():
        p.trainable = True                          # train both adapters in one mixed batch
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 6))
    names = ["a", "b", "__base__", "b", "a", "a", "__base__", "b", "a"]
    dy = rng.standard_normal((9, 3))
    y = model.forward(x, adapter_names=names)
    dx = model.backward(dy)
    mixed_grads = {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}
    assert set(mixed_grads) == set(adapter_params(model, "a")) | set(adapter_params(model, "b"))
    expected_dx = np.zeros_like(x)
    for adapter in ("a", "b", "__base__"):
        rows = [i for i, n in enumerate(names) if n == adapter]
        model.zero_grad()
        if adapter == "__base__":
            with model.disable_adapter():
                y_alone = model.forward(x[rows])
                expected_dx[rows] = model.backward(dy[rows])
        else:
            model.set_adapter(adapter)
            y_alone = model.forward(x[rows])
            expected_dx[rows] = model.backward(dy[rows])
            for n, p in adapter_params(model, adapter).items():
                np.testing.assert_allclose(mixed_grads[n], p.grad, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(y[rows], y_alone, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-10, atol=1e-12)



# -- a Llama decoder ------------------------------------------------------------------------------------
TARGETS = ["q_proj", "v_proj", "down_proj"]
SEQ_NAMES = ["a", "__base__", "b", "c", "a", "b"]           # c adapts only v_proj: other layers run it as base
# float32 measured: |Δ| <= 7e-8 on logits up to 0.25 (the batch's and a single row's GEMMs round differently)
TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-5, atol=1e-6)}


def tiny_llama(dtype, seed=0):
    config = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config, dtype=dtype, seed=seed)


def lora_llama(dtype):
    """Adapters a (r=4), b (r=2, alpha 6) on q/v/down_proj and c (r=3) on v_proj, all B factors random."""
    model = lr.get_lora_model(tiny_llama(dtype), lr.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
                              adapter_name="a")
    model.add_adapter("b", lr.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS))
    model.add_adapter("c", lr.LoraConfig(r=3, lora_alpha=3, target_modules=["v_proj"]))
    rng = np.random.default_rng(1)
    for _, layer in model.lora_layers():
        for B in (layer.lora_B[n] for n in layer.lora_B):
            B.data = (0.3 * rng.standard_normal(B.shape)).astype(B.dtype)
    return model


def batch(dtype, B=len(SEQ_NAMES), T=7, seed=2):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 37, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :2] = mask[4, :3] = 0                             # left padding on two rows
    return ids, mask, rng.standard_normal((B, T, 37)).astype(dtype)


def adapter_grads(model, name):
    return {n: p for n, p in model.named_parameters()
            if n.endswith(f".lora_A.{name}") or n.endswith(f".lora_B.{name}")}


def run_alone(model, name, ids, mask):
    if name == "__base__":
        with model.disable_adapter():
            return model.forward(ids, attention_mask=mask)
    model.set_adapter(name)
    return model.forward(ids, attention_mask=mask)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_batch_logits_equal_each_sequence_alone(dtype):
    model = lora_llama(dtype)
    ids, mask, _ = batch(dtype)
    mixed = model.forward(ids, adapter_names=SEQ_NAMES, attention_mask=mask)          # (B, T, V)
    assert mixed.shape == (len(SEQ_NAMES), 7, 37) and mixed.dtype == dtype
    for b, name in enumerate(SEQ_NAMES):
        alone = run_alone(model, name, ids[b:b + 1], mask[b:b + 1])
        np.testing.assert_allclose(mixed[b], alone[0], **TOL[dtype])
    base = run_alone(model, "__base__", ids, mask)
    for b in (1,):                                                                 # the "__base__" row
        np.testing.assert_allclose(mixed[b], base[b], **TOL[dtype])
    for b in (0, 2, 3):                                                            # the adapters do change rows
        assert np.abs(mixed[b] - base[b]).max() > 1e-3 * np.abs(base[b]).max()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_mixed_batch_gives_each_adapter_the_gradient_of_its_own_rows(dtype):
    model = lora_llama(dtype)
    ids, mask, dlogits = batch(dtype)
    for name in "abc":
        for p in adapter_grads(model, name).values():
            p.trainable = True                                 # train all three adapters in one mixed batch
    model.zero_grad()
    model.forward(ids, adapter_names=SEQ_NAMES, attention_mask=mask)
    model.backward(dlogits)
    mixed = {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}
    assert set(mixed) == set().union(*(adapter_grads(model, n) for n in "abc"))
    scale = max(float(np.abs(g).max()) for g in mixed.values())
    for name in "abc":
        model.zero_grad()
        model.set_adapter(name)                                # only ``name`` trainable: grads sum over its rows
        for b in [b for b, n in enumerate(SEQ_NAMES) if n == name]:
            model.forward(ids[b:b + 1], attention_mask=mask[b:b + 1])
            model.backward(dlogits[b:b + 1])
        for n, p in adapter_grads(model, name).items():
            np.testing.assert_allclose(mixed[n], p.grad, rtol=TOL[dtype]["rtol"],
                                       atol=TOL[dtype]["atol"] * 10 * scale)


def test_model_kwargs_pass_through_and_the_mlp_path_is_unchanged():
    model = lora_llama("float64")
    ids, mask, dlogits = batch("float64")
    model.set_adapter("a")
    plain = LlamaForCausalLM.forward(model.model, ids, attention_mask=mask)
    np.testing.assert_array_equal(model.forward(ids, attention_mask=mask), plain)
    assert model.backward(dlogits) is None                     # ids get no gradient
    assert all(p.grad is not None for p in adapter_grads(model, "a").values())
    mlp = lr.get_lora_model(lr.MLP([3, 5, 2], seed=0), lr.LoraConfig(r=2, target_modules=["0"]))
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_array_equal(mlp.forward(x), mlp.forward(x, adapter_names=["default"] * 4))


def test_mixed_batch_errors_name_the_problem():
    model = lora_llama("float64")
    ids, mask, _ = batch("float64")
    with pytest.raises(ValueError, match="adapter_names has 2 entries for 6 rows"):
        model.forward(ids, adapter_names=["a", "b"], attention_mask=mask)
    with pytest.raises(ValueError, match=r"unknown adapters \['z'\]"):
        model.forward(ids, adapter_names=["z"] * 6)
    with pytest.raises(TypeError, match="one per sequence"):
        model.forward(ids[:1], adapter_names="a")
    assert all(layer.row_adapters is None for _, layer in model.lora_layers())   # cleared after errors too
    with pytest.raises(ValueError, match="3 sequences can't be spread over 7 rows"):
        rows_for(["a", "b", "a"], 7, "q_proj")
    assert rows_for(["a", "b"], 6) == ["a"] * 3 + ["b"] * 3


def test_mixed_batch_with_a_modules_to_save_head_uses_each_sequences_copy():
    """A trained lm_head copy per adapter (modules_to_save) sees B·T rows: each sequence's tokens go
    through its own adapter's copy, exactly as when the sequence runs alone."""
    model = lr.get_lora_model(tiny_llama("float64"), lr.LoraConfig(r=2, target_modules=["q_proj"],
                                                                   modules_to_save=["lm_head"]))
    head = model.model.lm_head.modules_to_save["default"]
    head.weight.data = head.weight.data + 0.5                        # the copy differs from the frozen head
    ids = np.random.default_rng(0).integers(0, 37, (2, 7))
    mixed = model.forward(ids, adapter_names=["default", "__base__"])
    np.testing.assert_allclose(mixed[0], run_alone(model, "default", ids[:1], np.ones((1, 7)))[0], rtol=1e-12)
    np.testing.assert_allclose(mixed[1], run_alone(model, "__base__", ids[1:], np.ones((1, 7)))[0], rtol=1e-12)
    assert np.abs(mixed[0] - run_alone(model, "__base__", ids[:1], np.ones((1, 7)))[0]).max() > 0.1
