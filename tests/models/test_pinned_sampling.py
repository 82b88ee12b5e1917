"""``pick``'s sampling distribution against transformers' logits warpers, in transformers' order.

transformers' ``generate`` warps the scores with temperature, then top-k, then top-p (the order
``_get_logits_processor`` builds; the first test pins it). Oracles: that chain of transformers'
own warpers (torch) followed by a softmax, and for three hand-made cases the fractions worked out
on paper. Each case combines temperature or top-k with top-p, where applying top-p first keeps a
different set of tokens. ``pick`` draws many rows at once; a token of probability 0 must never be
drawn, and each frequency must lie within 5 standard errors of its probability.
"""
import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlamaForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from lowrank.models.llama.generation import pick

DRAWS = 40_000
P = np.array([0.4, 0.3, 0.2, 0.1])                        # logits log(P) for the cases worked out by hand
# (settings, the distribution worked out by hand, what top-p applied first would give instead)
HAND_CASES = [
    # T = 0.5: P² / ΣP² = [16, 9, 4, 1] / 30; top-p 0.75 keeps 0 and 1 (16/30 < 0.75 <= 25/30).
    # top-p on P first keeps 0, 1, 2 (0.7 < 0.75), and the temperature then gives [16, 9, 4] / 29.
    (dict(temperature=0.5, top_p=0.75), [16 / 25, 9 / 25, 0, 0], [16 / 29, 9 / 29, 4 / 29, 0]),
    # T = 2: √P / Σ√P = [.325, .282, .230, .163]; top-p 0.65 keeps 0, 1, 2 (.607 < 0.65).
    # top-p on P first keeps only 0 and 1 (0.7 >= 0.65).
    (dict(temperature=2.0, top_p=0.65), np.r_[np.sqrt(P[:3]) / np.sqrt(P[:3]).sum(), 0],
     np.r_[np.sqrt(P[:2]) / np.sqrt(P[:2]).sum(), 0, 0]),
    # top-k 2 renormalizes to [4/7, 3/7]; top-p 0.5 then keeps token 0 alone (4/7 >= 0.5).
    # top-p on P first keeps 0 and 1 (0.4 < 0.5), and top-k 2 leaves [4/7, 3/7].
    (dict(top_k=2, top_p=0.5), [1, 0, 0, 0], [4 / 7, 3 / 7, 0, 0]),
]


def transformers_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """softmax of ``logits`` (V,) after transformers' warpers, in the order its generate applies them: (V,)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    scores = warpers(torch.zeros(1, 1, dtype=torch.long), torch.tensor(logits, dtype=torch.float64)[None])
    return torch.softmax(scores, dim=-1)[0].numpy()


def assert_draws_follow(logits, expected, seed=0, **settings):
    """``pick`` on DRAWS copies of ``logits`` (V,) draws each token with the ``expected`` probability (V,)."""
    expected = np.asarray(expected, np.float64)
    tokens = pick(np.tile(logits, (DRAWS, 1)), True, rng=np.random.default_rng(seed), **settings)
    freq = np.bincount(tokens, minlength=len(logits)) / DRAWS
    never = expected == 0
    assert (freq[never] == 0).all(), f"drew tokens {np.flatnonzero(never & (freq > 0))} of probability 0"
    tolerance = 5 * np.sqrt(expected * (1 - expected) / DRAWS) + 1e-3
    np.testing.assert_array_less(np.abs(freq - expected), tolerance)


def test_transformers_generate_warps_with_temperature_then_top_k_then_top_p():
    tiny = HFLlamaForCausalLM(HFLlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1))
    processors = tiny._get_logits_processor(GenerationConfig(do_sample=True, temperature=0.5, top_k=2, top_p=0.5),
                                            input_ids_seq_length=1, device="cpu")
    assert [type(p) for p in processors] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper]


@pytest.mark.parametrize("settings, by_hand, top_p_first", HAND_CASES, ids=[str(case[0]) for case in HAND_CASES])
def test_pick_applies_top_p_after_temperature_and_top_k(settings, by_hand, top_p_first):
    logits = np.log(P)
    np.testing.assert_allclose(transformers_probs(logits, **settings), by_hand, atol=1e-12)
    assert np.abs(np.subtract(by_hand, top_p_first)).max() > 0.1          # the two orders are told apart
    assert_draws_follow(logits, by_hand, **settings)


@pytest.mark.parametrize("settings", [dict(temperature=0.7, top_p=0.8), dict(temperature=1.8, top_p=0.6),
                                      dict(top_k=5, top_p=0.7), dict(temperature=0.6, top_k=6, top_p=0.9),
                                      dict(temperature=1.5, top_k=3)], ids=str)
@pytest.mark.parametrize("seed", [1, 2])
def test_pick_draws_from_transformers_warped_distribution_on_random_logits(settings, seed):
    logits = np.random.default_rng(seed).standard_normal(12) * 1.5                                   # (V,) = (12,)
    assert_draws_follow(logits, transformers_probs(logits, **settings), seed=seed, **settings)
