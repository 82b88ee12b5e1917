"""A model whose weights a file replaces (from_pretrained, from_gguf: ``init_weights=False``) is built under
``init_empty_weights``: its layers hold zero-strided placeholders of their shapes and dtypes, so building it
allocates and draws nothing of its weights (the random draws took 0.9 of 1.0 s loading the 135M shape)."""
import numpy as np

from benchmarks.harness import peak_bytes

from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.nn import Embedding, init_empty_weights
from lowrank.nn.layers import Dense

CONFIG = dict(vocab_size=20000, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def test_a_model_built_for_loading_allocates_nothing_of_its_weights():
    config = LlamaConfig(**CONFIG)
    weights = sum(p.data.nbytes for p in LlamaForCausalLM(config).parameters())      # 10.5 MB in float32
    assert peak_bytes(lambda: LlamaForCausalLM(config, init_weights=False)) < 0.05 * weights
    model = LlamaForCausalLM(config, init_weights=False)
    assert all(p.data.strides == (0,) * p.data.ndim for p in model.parameters())
    assert [(n, p.shape, p.dtype) for n, p in model.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in LlamaForCausalLM(config).named_parameters()]


def test_layers_built_within_hold_placeholders_and_those_after_draw_as_before():
    with init_empty_weights():
        dense, embedding = Dense(5, 3, True, dtype="float64", seed=1), Embedding(7, 4, seed=2)
    for p, shape, dtype in ((dense.weight, (3, 5), np.float64), (dense.bias, (3,), np.float64),
                            (embedding.weight, (7, 4), np.float32)):
        assert p.shape == shape and p.dtype == dtype and p.data.strides == (0,) * len(shape) and not p.data.any()
    again = Dense(5, 3, True, dtype="float64", seed=1)
    bound = 1 / np.sqrt(5)                                    # U(−1/√fan_in, 1/√fan_in), PyTorch's Linear init
    assert np.abs(again.weight.data).max() <= bound and np.unique(again.weight.data).size == 15
    np.testing.assert_array_equal(again.weight.data, Dense(5, 3, True, dtype="float64", seed=1).weight.data)
