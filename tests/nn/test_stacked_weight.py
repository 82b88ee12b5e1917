"""stacked_weight and the inference paths that use it: q/k/v (LlamaAttention.forward_cached) and gate/up
(LlamaMLP.forward_inference) in one product each when their weights lie one after another in memory, the same
numbers as the layers one by one, and the layers one by one whenever the weights can't be stacked."""
from unittest import mock

import numpy as np
import pytest

from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.nn.kv_cache import KVCache
from lowrank.nn.layers import Dense, stacked_weight
from lowrank.tuners.lora.config import LoraConfig
from lowrank.tuners.lora.model import get_lora_model

SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=64)


def model(**kw):
    return LlamaForCausalLM(LlamaConfig(**{**SIZES, **kw}), seed=0).eval()


def separate(m):
    """The same model with every parameter its own array: nothing stacks."""
    for _, p in m.named_parameters():
        p.data = p.data.copy()
    return m


def test_the_stacked_view_is_the_weights_one_after_another():
    m = model()
    attn, mlp = m.model.layers[1].self_attn, m.model.layers[1].mlp
    W = stacked_weight(attn.q_proj, attn.k_proj, attn.v_proj)
    np.testing.assert_array_equal(W, np.concatenate([attn.q_proj.weight.data, attn.k_proj.weight.data,
                                                     attn.v_proj.weight.data]))
    assert not W.flags.writeable and np.shares_memory(W, attn.v_proj.weight.data)
    np.testing.assert_array_equal(stacked_weight(mlp.gate_proj, mlp.up_proj),
                                  np.concatenate([mlp.gate_proj.weight.data, mlp.up_proj.weight.data]))


def test_nothing_stacks_apart_wrapped_or_with_a_bias():
    m = model()
    attn = m.model.layers[0].self_attn
    assert stacked_weight(attn.k_proj, attn.q_proj) is None                       # not in that order in memory
    assert stacked_weight(attn.q_proj, attn.o_proj) is None                       # v and k lie between
    attn.k_proj.weight.data = attn.k_proj.weight.data.copy()                      # one of them moved out
    assert stacked_weight(attn.q_proj, attn.k_proj, attn.v_proj) is None
    assert stacked_weight(Dense(4, 3, True, seed=0)) is None                       # a bias
    qwen2 = model(model_type="qwen2")                                             # q/k/v biases
    a2 = qwen2.model.layers[0].self_attn
    assert stacked_weight(a2.q_proj, a2.k_proj, a2.v_proj) is None
    lora = get_lora_model(model(), LoraConfig(r=2, target_modules=["q_proj", "gate_proj"]))
    layer = lora.get_base_model().model.layers[0]
    assert stacked_weight(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj) is None
    assert stacked_weight(layer.mlp.gate_proj, layer.mlp.up_proj) is None


@pytest.mark.parametrize("kw", [{}, dict(model_type="qwen3"), dict(model_type="mistral", sliding_window=3)])
def test_cached_forwards_give_the_layers_numbers_with_two_products_fewer_a_layer(kw):
    stacked, apart = model(**kw), separate(model(**kw))
    ids = np.random.default_rng(0).integers(0, 97, (2, 7))
    calls = []
    real, real_inference = Dense.forward, Dense.forward_inference

    def counting(self, x):
        calls.append(self)
        return real(self, x)

    def counting_inference(self, x):
        calls.append(self)
        return real_inference(self, x)
    out = {}
    for name, m in (("stacked", stacked), ("apart", apart)):
        cache = KVCache.for_model(m.config, 2, 12)
        m.forward(ids, kv_cache=cache)                                              # prefill
        calls.clear()
        with mock.patch.object(Dense, "forward", counting), \
                mock.patch.object(Dense, "forward_inference", counting_inference):
            out[name] = m.forward(ids[:, :1], kv_cache=cache)                       # one decode step
        out[name + " calls"] = len(calls)
    np.testing.assert_allclose(out["stacked"], out["apart"], rtol=1e-5, atol=1e-6)
    layers = SIZES["num_hidden_layers"]
    assert out["apart calls"] == 7 * layers + 1                                    # q k v o gate up down, the head
    assert out["stacked calls"] == 2 * layers + 1                                  # o and down alone, the head


def test_forward_inference_keeps_nothing_and_checks_its_input():
    mlp = model().model.layers[0].mlp
    x = np.random.default_rng(1).standard_normal((3, 48)).astype(np.float32)
    y = mlp.forward(x)
    np.testing.assert_allclose(mlp.forward_inference(x), y, rtol=1e-5, atol=1e-6)
    assert mlp._cache is None                                                      # forward's was dropped
    with pytest.raises(ValueError, match="mlp.*expects input of shape"):
        mlp.forward_inference(np.zeros((3, 47), np.float32))


def test_weights_adjacent_in_a_files_map_stack_too(tmp_path):
    """A float32 checkpoint loads as views of the file's map; a file holds gate_proj then up_proj (names in order),
    so those stack, and q/k/v (stored k, o, q, v) don't."""
    model().save_pretrained(tmp_path / "m")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    mlp, attn = loaded.model.layers[0].mlp, loaded.model.layers[0].self_attn
    W = stacked_weight(mlp.gate_proj, mlp.up_proj)
    assert W is not None and np.shares_memory(W, mlp.up_proj.weight.data)
    np.testing.assert_array_equal(W, np.concatenate([mlp.gate_proj.weight.data, mlp.up_proj.weight.data]))
    assert stacked_weight(attn.q_proj, attn.k_proj, attn.v_proj) is None


def test_the_servers_decode_step_stacks_too():
    from lowrank.serving import slots
    stacked, apart = model(), separate(model())
    prompts = [[5, 9, 3], [7, 1]]
    out = {}
    for name, m in (("stacked", stacked), ("apart", apart)):
        cache = slots.SlotCache(m.config, 2, 8)
        slots.prefill(m, cache, prompts, [0, 1])
        with mock.patch.object(Dense, "forward", autospec=True, side_effect=Dense.forward) as spy, \
                mock.patch.object(Dense, "forward_inference", autospec=True,
                                  side_effect=Dense.forward_inference) as spy_inference:
            out[name] = slots.decode_step(m, cache, [4, 6])
        out[name + " calls"] = spy.call_count + spy_inference.call_count
    np.testing.assert_allclose(out["stacked"], out["apart"], rtol=1e-5, atol=1e-6)
    layers = SIZES["num_hidden_layers"]
    assert (out["apart calls"], out["stacked calls"]) == (7 * layers + 1, 2 * layers + 1)


def test_the_view_kept_between_steps_follows_replaced_and_updated_weights():
    """stacked_product keeps the stacked view for its module while the layers hold the same arrays: a weight
    updated in place shows through the view, a weight replaced by a new array is never read from the old view."""
    from lowrank.nn.layers import stacked_product
    from lowrank.nn.dispatch import kernels_for
    mlp = model().model.layers[0].mlp
    x = np.random.default_rng(2).standard_normal((2, 48)).astype(np.float32)
    kern = kernels_for(x, None)
    one_by_one = lambda: np.concatenate([mlp.gate_proj.forward(x), mlp.up_proj.forward(x)], axis=1)  # noqa: E731
    np.testing.assert_allclose(stacked_product(kern, x, mlp, mlp.gate_proj, mlp.up_proj), one_by_one(), rtol=1e-5,
                               atol=1e-6)
    mlp.up_proj.weight.data *= 2                                                   # in place: the view sees it
    np.testing.assert_allclose(stacked_product(kern, x, mlp, mlp.gate_proj, mlp.up_proj), one_by_one(), rtol=1e-5,
                               atol=1e-6)
    mlp.up_proj.weight.data = mlp.up_proj.weight.data * 3                         # a new array: no longer adjacent
    assert stacked_product(kern, x, mlp, mlp.gate_proj, mlp.up_proj) is None
    mlp.flatten_parameters()                                                       # adjacent again, new arrays
    np.testing.assert_allclose(stacked_product(kern, x, mlp, mlp.gate_proj, mlp.up_proj), one_by_one(), rtol=1e-5,
                               atol=1e-6)
