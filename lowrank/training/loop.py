"""A minibatch training loop for any model with ``forward``/``backward`` and any optimizer.

Binary tasks use one logit per row with ``BCEWithLogitsLoss``; multi-class tasks use C
logits with ``CrossEntropyLoss``. Deterministic for a given seed: the only randomness
is the shuffling order (and dropout masks, which layers draw from their own seeds).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ..nn.device import get_array_module
from ..nn.losses import BCEWithLogitsLoss, CrossEntropyLoss, Loss


@dataclass
class History:
    """Per-epoch records; the plots and reports read these lists."""

    epoch: list = field(default_factory=list)
    train_loss: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    stopped_early: bool = False

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.median(self.seconds)) if self.seconds else 0.0


def targets_for(loss_fn: Loss, y, logits_like=None):
    """Labels in the form ``loss_fn`` expects: (N, 1) floats for BCE, int classes for CE."""
    xp = get_array_module(logits_like) if logits_like is not None else np
    y = xp.asarray(y)
    if isinstance(loss_fn, BCEWithLogitsLoss):
        dtype = logits_like.dtype if logits_like is not None else np.float32
        return y.reshape(-1, 1).astype(dtype)
    if isinstance(loss_fn, CrossEntropyLoss):
        return y.astype(np.int64)
    return y


def predict(model, X, batch_size: int = 4096, **forward_kwargs):
    """Class predictions: logit > 0 for one output, argmax for several."""
    model.eval()
    preds = []
    for i in range(0, X.shape[0], batch_size):
        kw = {k: v[i:i + batch_size] for k, v in forward_kwargs.items()}
        z = model.forward(X[i:i + batch_size], **kw)
        preds.append((z[:, 0] > 0).astype(np.int64) if z.shape[1] == 1 else z.argmax(axis=1))
    xp = get_array_module(X)
    return xp.concatenate(preds) if preds else xp.zeros(0, np.int64)


def evaluate(model, loss_fn: Loss, X, y, batch_size: int = 4096) -> tuple[float, float]:
    """(mean loss, accuracy) over (X, y), in eval mode."""
    model.eval()
    total, correct = 0.0, 0
    xp = get_array_module(X)
    y = xp.asarray(y)
    for i in range(0, X.shape[0], batch_size):
        z = model.forward(X[i:i + batch_size])
        yb = y[i:i + batch_size]
        total += loss_fn.forward(z, targets_for(loss_fn, yb, z)) * len(yb)
        loss_fn._cache = None
        pred = (z[:, 0] > 0).astype(np.int64) if z.shape[1] == 1 else z.argmax(axis=1)
        correct += int((pred == yb).sum())
    n = X.shape[0]
    return total / n, correct / n


def _progress(total: int, show: bool | None, desc: str):
    """A tqdm bar on a terminal for long runs; nothing otherwise (or when asked)."""
    if show is None:
        show = sys.stderr.isatty() and total >= 20
    if not show:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False)


def local_step(model, optimizer, loss_fn: Loss, X, y) -> float:
    """One training step on (X, y): forward, loss, backward, optimizer step; returns the mean loss."""
    optimizer.zero_grad()
    z = model.forward(X)
    loss = loss_fn.forward(z, targets_for(loss_fn, y, z))
    model.backward(loss_fn.backward())
    optimizer.step()
    return loss


def _check_rows(x_name: str, X, y_name: str, y):
    """ValueError unless X and y are both given, with the same number (>= 1) of rows."""
    if X is None or y is None:
        raise ValueError(f"fit: {x_name} and {y_name} go together; got only {y_name if X is None else x_name}")
    n, m = len(X), len(y)
    if n == 0:
        raise ValueError(f"fit: no {'training' if x_name == 'X' else 'validation'} data: {x_name} has 0 rows")
    if n != m:
        raise ValueError(f"fit: {x_name} has {n} rows but {y_name} has {m}; they must match row for row")


def fit(model, optimizer, loss_fn: Loss, X, y, *, X_val=None, y_val=None, epochs: int = 10,
        batch_size: int = 64, seed: int = 0, target_acc: float | None = None,
        progress: bool | None = None, desc: str = "train", batch_step=None) -> History:
    """Train ``model`` in minibatches; returns a History.

    target_acc: stop early once validation accuracy reaches it (needs X_val, y_val).
    batch_step: ``rows -> mean loss`` for one minibatch (default: ``local_step`` on X[rows]);
                DataParallel.fit passes one that trains this rank's shard over MPI.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"fit: epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    if target_acc is not None and X_val is None:
        raise ValueError("fit: target_acc needs validation data (X_val, y_val)")
    _check_rows("X", X, "y", y)
    if X_val is not None or y_val is not None:
        _check_rows("X_val", X_val, "y_val", y_val)
    xp = get_array_module(X)
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    history = History()
    bar = _progress(epochs, progress, desc)
    for epoch in range(1, epochs + 1):
        model.train()
        start, total = time.perf_counter(), 0.0
        order = xp.asarray(rng.permutation(n))
        for i in range(0, n, batch_size):
            rows = order[i:i + batch_size]
            loss = (local_step(model, optimizer, loss_fn, X[rows], y[rows]) if batch_step is None
                    else batch_step(rows))
            total += loss * len(rows)
        history.seconds.append(time.perf_counter() - start)
        history.epoch.append(epoch)
        history.train_loss.append(total / n)
        if X_val is not None:
            vl, va = evaluate(model, loss_fn, X_val, y_val)
            history.val_loss.append(vl)
            history.val_acc.append(va)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total / n:.4f}", **({"val_acc": f"{history.val_acc[-1]:.3f}"} if X_val is not None else {}))
        if target_acc is not None and history.val_acc[-1] >= target_acc:
            history.stopped_early = True
            break
    if bar is not None:
        bar.close()
    model.eval()
    return history
