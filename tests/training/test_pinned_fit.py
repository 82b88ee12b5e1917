"""``fit``'s epoch training loss weighs every row once when the last batch is short.

Oracles: the mean of known per-row losses (a batch_step that reports them), and the cross-entropy
of a frozen model computed by hand over all rows. The batches are 4 + 4 + 2 rows and the last rows'
losses differ from the rest, so a mean of batch means (a short batch weighted as a full one) misses
the expected value. (``lowrank lm``'s ``evaluate_loss``: test_pinned_lm_training.)
"""
import numpy as np

import lowrank as lr


def log_softmax_nll(logits, labels):
    """−log softmax(logits)[label] per row: (N, C), (N,) -> (N,)."""
    z = logits - logits.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), labels]


def test_fit_epoch_loss_weighs_every_row_once_when_the_last_batch_is_short():
    """batch_step returns the mean of known per-row losses; the epoch loss is their mean over all 10 rows."""
    per_row = np.arange(10, dtype=np.float64) ** 2                      # rows of very different losses
    X, y = np.zeros((10, 2)), np.zeros(10, np.int64)
    model = lr.MLP([2, 1], dtype="float64", seed=0)
    seen = []

    def batch_step(rows):
        seen.append(len(rows))
        return float(per_row[rows].mean())
    history = lr.fit(model, lr.SGD(model.parameters()), lr.BCEWithLogitsLoss(), X, y, epochs=3, batch_size=4,
                     seed=1, progress=False, batch_step=batch_step)
    assert seen == [4, 4, 2] * 3
    np.testing.assert_allclose(history.train_loss, [per_row.mean()] * 3, rtol=1e-12)     # 28.5, not a batch mean


def test_fit_epoch_loss_of_a_frozen_model_is_its_cross_entropy_over_all_rows():
    """Nothing trains (every weight frozen), so the epoch loss is the hand-computed mean over the 10 rows."""
    rng = np.random.default_rng(2)
    X, y = rng.standard_normal((10, 5)), rng.integers(0, 3, 10)
    X[8:] *= 25                                             # two rows of far larger losses, wherever shuffled
    model = lr.MLP([5, 3], dtype="float64", seed=0).requires_grad_(False)
    dense = model[0]
    expected = log_softmax_nll(X @ dense.weight.data.T + dense.bias.data, y).mean()      # (10, 5) @ (5, 3)
    history = lr.fit(model, lr.SGD(model.parameters()), lr.CrossEntropyLoss(), X, y, epochs=4, batch_size=4,
                     seed=0, progress=False)
    np.testing.assert_allclose(history.train_loss, [expected] * 4, rtol=1e-12)
