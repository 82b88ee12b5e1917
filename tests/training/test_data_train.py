"""Toy tasks and the training loop."""
import numpy as np
import pytest

import lowrank as lr
from lowrank.training.data import DATASETS, lift


@pytest.mark.parametrize("name", DATASETS)
def test_tasks_are_deterministic_balanced_and_split(name):
    a = lr.make_task(name=name, n_samples=400, n_features=5, seed=3)
    b = lr.make_task(name=name, n_samples=400, n_features=5, seed=3)
    assert np.array_equal(a.X_train, b.X_train) and np.array_equal(a.y_test, b.y_test)
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (240, 80, 80)
    assert a.X_train.shape == (240, 5) and a.X_train.dtype == np.float32
    y = np.concatenate([a.y_train, a.y_val, a.y_test])
    assert set(np.unique(y)) == {0, 1} and 0.35 < y.mean() < 0.65
    c = lr.make_task(name=name, n_samples=400, n_features=5, seed=4)
    assert not np.array_equal(a.X_train, c.X_train)


def test_lift_spreads_the_plane_over_every_feature_and_keeps_distances():
    spec = lr.TaskSpec(n_features=6)
    p = np.random.default_rng(0).standard_normal((50, 2))
    X = lift(p, spec).astype(np.float64)
    assert np.all(np.abs(X).sum(axis=0) > 0)            # every feature carries signal
    d_plane = np.linalg.norm(p[:, None] - p[None], axis=-1)
    d_lifted = np.linalg.norm(X[:, None] - X[None], axis=-1)
    np.testing.assert_allclose(d_lifted, d_plane, rtol=1e-5, atol=1e-5)   # a rotation


@pytest.mark.parametrize("kind", ["rotate", "shift", "relabel"])
def test_downstream_task_shares_the_feature_space_and_differs(kind):
    ds = lr.make_task(n_samples=300, n_features=4)
    down = lr.downstream_task(ds, kind)
    assert down.spec.embed_seed == ds.spec.embed_seed and down.n_features == ds.n_features
    assert not np.array_equal(down.X_train, ds.X_train) or not np.array_equal(down.y_train, ds.y_train)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'moon'"):
        lr.make_task(name="moon")
    with pytest.raises(ValueError, match="n_features must be >= 2"):
        lr.make_task(n_features=1)
    with pytest.raises(ValueError, match="downstream kind"):
        lr.downstream_task(lr.TaskSpec(), "flip")


def test_fit_is_deterministic_and_learns():
    ds = lr.make_task(n_samples=600, n_features=4, seed=1)

    def run():
        model = lr.MLP([4, 32, 1], seed=0)
        h = lr.fit(model, lr.Adam(model.parameters(), lr=1e-2), lr.BCEWithLogitsLoss(), ds.X_train, ds.y_train,
                   X_val=ds.X_val, y_val=ds.y_val, epochs=8, batch_size=32, seed=5, progress=False)
        return model, h

    (m1, h1), (m2, h2) = run(), run()
    assert h1.train_loss == h2.train_loss
    assert all(np.array_equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert h1.train_loss[-1] < 0.5 * h1.train_loss[0]
    assert lr.evaluate(m1, lr.BCEWithLogitsLoss(), ds.X_test, ds.y_test)[1] > 0.85


def test_fit_stops_early_at_the_target():
    ds = lr.make_task(n_samples=600, n_features=4, seed=1)
    model = lr.MLP([4, 32, 1], seed=0)
    h = lr.fit(model, lr.Adam(model.parameters(), lr=1e-2), lr.BCEWithLogitsLoss(), ds.X_train, ds.y_train,
               X_val=ds.X_val, y_val=ds.y_val, epochs=50, target_acc=0.8, progress=False)
    assert h.stopped_early and h.val_acc[-1] >= 0.8 and len(h.epoch) < 50
    assert all(acc < 0.8 for acc in h.val_acc[:-1])


def test_multiclass_training_with_cross_entropy():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 5)) * 3
    y = rng.integers(0, 3, 300)
    X = (centres[y] + rng.standard_normal((300, 5))).astype(np.float32)
    model = lr.MLP([5, 16, 3], seed=0)
    lr.fit(model, lr.Adam(model.parameters(), lr=1e-2), lr.CrossEntropyLoss(), X, y, epochs=10, progress=False)
    assert (lr.predict(model, X) == y).mean() > 0.9
