"""``lowrank lm``'s training bookkeeping: the window order, the validation loss, the learning-rate
schedule, the logged training loss.

Oracles: the windows each epoch actually trains (identified by their first token); the next-token
cross-entropy written out in NumPy, window by window, averaged over every token (the last batch of
the validation windows is short); the schedule the ``--warmup`` help promises (linear warm-up to
the peak, then cosine decay to 10 % of it) as values worked out by hand at its landmarks; and each
step's training loss recomputed in NumPy from the model's logits just before that step, averaged
over the steps since the last stage line.
"""
import math

import numpy as np
import pytest

import lowrank.app.lm as lm
from lowrank.app.lm import evaluate_loss, lr_factor, train_steps
from lowrank.models.llama import LlamaConfig, LlamaForCausalLM
from lowrank.training.text import Batcher, cut_windows

V, T = 13, 6


def tiny_llama():
    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(config, dtype="float64", seed=0)


def next_token_nll(logits, ids):
    """−log softmax(logits[b, t])[ids[b, t + 1]] per predicted token: logits (B, T+1, V), ids (B, T+1) -> (B, T)."""
    z = logits[:, :-1].astype(np.float64)
    log_z = np.log(np.exp(z - z.max(axis=2, keepdims=True)).sum(axis=2)) + z.max(axis=2)
    return log_z - np.take_along_axis(z, ids[:, 1:, None], axis=2)[..., 0]


# -- the window order ----------------------------------------------------------------------------
def test_batcher_draws_a_new_order_each_epoch_so_every_window_is_trained():
    """25 windows in batches of 6: each epoch trains 24 and leaves one out, a different one as the order changes."""
    windows = cut_windows(np.arange(101, dtype=np.int64), 4)               # window i starts with token 4·i
    batcher = Batcher(windows, 6, seed=0)
    epochs = []
    for _ in range(8):
        epoch = np.concatenate([batcher.next() for _ in range(4)])[:, 0] // 4    # window ids, in training order
        assert len(set(epoch)) == len(epoch) == 24
        epochs.append(epoch)
    assert batcher.epoch == 7
    orders = {tuple(e) for e in epochs}
    left_out = {(set(range(25)) - set(e)).pop() for e in epochs}
    assert len(orders) == 8                                                    # a new order every epoch
    assert len(left_out) > 1 and set(np.concatenate(epochs)) == set(range(25))    # the left-over one changes


# -- the validation loss ------------------------------------------------------------------------
def test_evaluate_loss_is_the_mean_over_every_token_when_the_last_batch_is_short():
    model = tiny_llama()
    windows = np.random.default_rng(0).integers(0, V, (7, T + 1))
    windows[-1] = 3                                         # the short batch's window: a loss unlike the others
    per_token = np.concatenate([next_token_nll(model.forward(w[None]), w[None]) for w in windows])   # (7, T)
    expected = per_token.mean()
    batch_means = [per_token[i:i + 3].mean() for i in range(0, 7, 3)]                    # batches of 3, 3, 1
    assert abs(np.mean(batch_means) - expected) > 1e-3     # a mean of batch means is told apart
    assert evaluate_loss(model, windows, batch_size=3) == pytest.approx(expected, rel=1e-10)
    assert evaluate_loss(model, windows, batch_size=7) == pytest.approx(expected, rel=1e-10)


# -- the learning-rate schedule and the logged loss ---------------------------------------------
STEPS, WARMUP, PEAK, EVAL_EVERY = 9, 3, 0.01, 4


@pytest.fixture(scope="module")
def run():
    """train_steps on a tiny decoder, recording each step's lr and its loss recomputed in NumPy."""
    model = tiny_llama()
    train = np.random.default_rng(0).integers(0, V, (10, T + 1))
    val = np.random.default_rng(1).integers(0, V, (3, T + 1))
    lrs, losses = [], []
    real_step = lm.lm_step

    def spy(stepped, optimizer, X, labels, attention_mask=None):
        lrs.append(optimizer.param_groups[0]["lr"])
        losses.append(next_token_nll(stepped.forward(X), X).mean())            # before the step changes the model
        return real_step(stepped, optimizer, X, labels, attention_mask)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm, "lm_step", spy)
        history = train_steps(model, Batcher(train, 2, seed=0), val, steps=STEPS, lr=PEAK, warmup=WARMUP,
                              eval_every=EVAL_EVERY)
    return history, np.array(lrs), np.array(losses)


def test_lr_warms_up_linearly_then_decays_by_a_cosine_to_a_tenth_of_the_peak(run):
    _, lrs, _ = run
    assert len(lrs) == STEPS
    np.testing.assert_allclose(lrs[:WARMUP], PEAK * np.array([1, 2, 3]) / 3, rtol=1e-12)    # steps 1..3
    # after the warm-up, progress p = (step − 3) / 6 and lr = peak · (0.1 + 0.9 · (1 + cos πp) / 2):
    # p = 1/2 at step 6 gives 0.55 · peak, p = 1 at the last step gives 0.1 · peak (not 0).
    assert lrs[6 - 1] == pytest.approx(0.55 * PEAK, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.1 * PEAK, rel=1e-12)
    p = np.arange(1, 7) / 6
    np.testing.assert_allclose(lrs[WARMUP:], PEAK * (0.1 + 0.45 * (1 + np.cos(np.pi * p))), rtol=1e-12)


@pytest.mark.parametrize("steps, warmup, landmarks", [
    (100, 10, {1: 0.1, 5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1}),
    (1050, 50, {50: 1.0, 300: 0.1 + 0.45 * (1 + math.sqrt(0.5)), 550: 0.55, 1050: 0.1}),
    (20, 0, {10: 0.55, 20: 0.1})])
def test_lr_factor_landmarks(steps, warmup, landmarks):
    for step, factor in landmarks.items():
        assert lr_factor(step, steps, warmup) == pytest.approx(factor, rel=1e-12), step


def test_the_logged_train_loss_is_the_mean_over_the_steps_since_the_last_stage_line(run):
    history, _, losses = run
    assert history["step"] == [4, 8, 9]
    expected = [losses[0:4].mean(), losses[4:8].mean(), losses[8:9].mean()]
    np.testing.assert_allclose(history["train_loss"], expected, rtol=1e-10)
    assert abs(history["train_loss"][1] - losses[:8].mean()) > 1e-4        # not a running mean since step 1
