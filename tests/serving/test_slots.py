"""Per-row KV-cache slots: a decode step where each row sits at its own position gives every row the
tokens ``generate`` gives it alone, in every family's attention (GQA, Mistral's sliding window on every
layer, Qwen2's from a layer on, Qwen3's q/k norms), for rows that join the running batch at different
steps with prompts of different lengths (float64, so the batch's rounding can't flip a token)."""
import numpy as np
import pytest

from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.serving.engine import Engine, Request
from lowrank.tuners.lora.mixed import BASE

SIZES = dict(vocab_size=41, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=40)
FAMILIES = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=3),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", head_dim=8, attention_bias=True),
}


@pytest.mark.parametrize("together", [False, True], ids=["one-per-step", "prefilled-together"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_at_their_own_positions_decode_as_they_do_alone(family, together):
    model = LlamaForCausalLM(LlamaConfig.from_dict({**SIZES, **FAMILIES[family]}), dtype="float64", seed=3)
    model.eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 41, n).tolist() for n in (5, 2, 9, 3, 7)]
    new = [12, 6, 15, 9, 4]
    engine = Engine(model, max_batch=5 if together else 3)
    got = [[] for _ in prompts]
    for i, (p, n) in enumerate(zip(prompts, new)):
        engine.submit(Request(p, BASE, n, lambda kind, value, i=i: got[i].append(value) if kind == "token" else None))
        if not together:
            engine.step()                               # one joins per step, while the others decode
    while engine.rows or engine.waiting:
        engine.step()
    for p, n, g in zip(prompts, new, got):
        alone = np.asarray(model.generate(np.asarray([p]), max_new_tokens=n))[0, len(p):].tolist()
        assert g == alone
