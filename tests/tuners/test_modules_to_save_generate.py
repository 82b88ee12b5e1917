"""modules_to_save of a decoder layer's parts (its MLP and norms, the final norm; the head beside them) through a
decode step: the cached path asks the MLP and the norms for their inference forward, which a ModulesToSave
wrapper must give too (it raised AttributeError before), and the tokens equal greedy decoding by full forwards
without a cache."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.nn import LlamaMLP, RMSNorm
from lowrank.tuners.lora.modules_to_save import ModulesToSave

CONFIG = dict(vocab_size=53, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)


def greedy_without_cache(model, ids, n):
    for _ in range(n):
        ids = np.concatenate([ids, model.forward(ids)[:, -1].argmax(-1)[:, None]], axis=1)
    return ids


@pytest.mark.parametrize("saved", [["mlp"], ["mlp", "lm_head"], ["input_layernorm", "post_attention_layernorm"],
                                   ["norm", "mlp"]])
def test_generate_runs_the_saved_copies_with_the_tokens_of_full_forwards(saved):
    model = lr.get_lora_model(lr.LlamaForCausalLM(lr.LlamaConfig(**CONFIG), seed=0),
                              lr.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=saved))
    wrappers = [m for _, m in model.named_modules() if isinstance(m, ModulesToSave)]
    assert wrappers
    rng = np.random.default_rng(1)
    for w in wrappers:                                    # the copies differ from the originals: they must run
        for _, p in w.modules_to_save["default"].named_parameters():
            p.data = (p.data + 0.3 * rng.standard_normal(p.shape)).astype(p.dtype)
    ids = rng.integers(0, 53, (2, 4))
    out = model.generate(ids, max_new_tokens=5)
    inner = [w for w in wrappers if isinstance(w.original_module, (LlamaMLP, RMSNorm))]
    assert all(m._cache is None for w in inner for _, m in w.named_modules())        # nothing kept for a backward
    np.testing.assert_array_equal(out, greedy_without_cache(model, ids, 5))
