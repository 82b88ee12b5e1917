"""``logits_to_keep`` (transformers' argument): the last k positions' logits, equal to the full forward's, their
backward equal to the full backward's with zero dlogits elsewhere; bad values refused; ``generate``'s prefill asks
for the last position only (the head runs on B rows, not B·T), as transformers' generate does."""
from unittest import mock

import numpy as np
import pytest

from lowrank.models.llama import LlamaConfig, LlamaForCausalLM


def _model(dtype="float64"):
    config = LlamaConfig(vocab_size=23, hidden_size=12, intermediate_size=20, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=16)
    return LlamaForCausalLM(config, dtype=dtype, seed=4)


@pytest.mark.parametrize("k", [1, 3, 5, 9])
def test_the_last_k_positions_and_their_backward(k):
    model = _model()
    ids = np.random.default_rng(0).integers(0, 23, (2, 5))
    full = model.forward(ids)                                              # (2, 5, 23)
    dl = np.random.default_rng(1).standard_normal(full.shape)
    kept = min(k, 5)
    dl[:, :5 - kept] = 0                                                   # the positions k leaves out
    model.zero_grad()
    model.backward(dl)
    expected = {n: p.grad.copy() for n, p in model.named_parameters()}
    out = model.forward(ids, logits_to_keep=k)
    assert out.shape == (2, kept, 23)
    np.testing.assert_allclose(out, full[:, 5 - kept:], rtol=1e-12, atol=1e-12)
    model.zero_grad()
    model.backward(dl[:, 5 - kept:])
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, expected[n], rtol=1e-10, atol=1e-12, err_msg=n)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_logits_to_keep_is_refused(bad):
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*logits_to_keep must be an int >= 0"):
        _model().forward(np.zeros((1, 3), np.int64), logits_to_keep=bad)


def test_logits_to_keep_with_labels_is_refused():
    ids = np.zeros((1, 3), np.int64)
    with pytest.raises(ValueError, match="logits_to_keep and labels do not go together"):
        _model().forward(ids, labels=ids, logits_to_keep=1)


def test_generate_prefills_the_last_position_only():
    model = _model("float32")
    ids = np.random.default_rng(2).integers(0, 23, (3, 6))
    with mock.patch.object(model.lm_head, "forward", wraps=model.lm_head.forward) as head:
        out = model.generate(ids, max_new_tokens=4)
    assert [c.args[0].shape[0] for c in head.call_args_list] == [3, 3, 3, 3]       # B rows at prefill, not B·T
    greedy = ids
    for _ in range(4):                                                     # the same tokens from full forwards
        greedy = np.concatenate([greedy, model.forward(greedy)[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(out, greedy)
