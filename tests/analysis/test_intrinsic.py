"""θ = θ₀ + P z: the hand-written dz = Pᵀ dθ matches finite differences (float64), with
P = I and d = D training z is plain training, and d90 picks the smallest d that reaches 90%."""
import copy

import numpy as np
import pytest

import lowrank as lr
from lowrank.analysis import intrinsic
from lowrank.analysis.fastfood import Fastfood
from lowrank.analysis.intrinsic import DenseProjection, SubspaceModel, d90, intrinsic_sweep, make_projection


def tiny(seed=0, sizes=(4, 5, 3)):
    return lr.MLP(list(sizes), "tanh", dtype="float64", seed=seed)


@pytest.mark.parametrize("projection,d,names", [("dense", 1, None), ("dense", 6, None), ("fastfood", 7, None),
                                                ("dense", 3, ["2"]), ("fastfood", 2, ["0.bias", "2.weight"])])
def test_dz_matches_finite_differences(projection, d, names, rng):
    sub = SubspaceModel(tiny(), d, names=names, projection=projection, seed=5)
    sub.z.data = 0.3 * rng.standard_normal(d)                   # away from θ₀
    x = rng.standard_normal((3, 4))
    errors = lr.check_module(sub, x)
    assert set(errors) == {"x", "z"}


def test_starts_at_the_pretrained_model_and_only_z_trains(rng):
    model = tiny()
    x = rng.standard_normal((5, 4))
    before = model(x)
    sub = SubspaceModel(model, 4, projection="dense")
    np.testing.assert_array_equal(sub(x), before)
    assert [p is sub.z for p in sub.parameters(trainable_only=True)] == [True]
    assert sub.D == model.num_parameters() == 4 * 5 + 5 + 5 * 3 + 3


def test_identity_projection_with_d_equal_D_is_plain_training(rng):
    x, y = rng.standard_normal((16, 4)), rng.standard_normal((16, 3))
    plain, tied = tiny(), tiny()
    D = plain.num_parameters()
    sub = SubspaceModel(tied, D, projection=DenseProjection(D, D, matrix=np.eye(D), dtype=np.float64))
    loss = lr.MSELoss()
    for model in (plain, sub):
        opt = lr.SGD(model.parameters(trainable_only=True), lr=0.1)
        for k in range(5):
            rows = slice(3 * k, 3 * k + 5)
            opt.zero_grad()
            loss(model(x[rows]), y[rows])
            model.backward(loss.backward())
            opt.step()
    sub.materialize()
    for (name, p), (_, q) in zip(plain.named_parameters(), tied.named_parameters()):
        np.testing.assert_allclose(q.data, p.data, rtol=1e-12, atol=1e-14, err_msg=name)
    assert not np.allclose(plain[0].weight.data, tiny()[0].weight.data)      # it did train


def test_chosen_parameters_only_move_and_materialize_writes_once(rng):
    model = tiny()
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not n.startswith("2.")}
    sub = SubspaceModel(model, 3, names=["2"], projection="dense")
    assert sub.D == 5 * 3 + 3
    sub.z.data = rng.standard_normal(3)
    sub.materialize()
    written = model[2].weight.data
    assert sub.materialize() is model and model[2].weight.data is written    # z unchanged: no rewrite
    for n, p in model.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.data, frozen[n], err_msg=n)
    sub.eval()
    assert not model.training and not model[0].training
    sub.train()
    assert model[0].training


def test_auto_projection_is_dense_until_the_limit(monkeypatch):
    assert isinstance(make_projection("auto", 50, 4), DenseProjection)
    monkeypatch.setattr(intrinsic, "DENSE_LIMIT", 100)
    assert isinstance(make_projection("auto", 50, 4), Fastfood)
    P = make_projection("dense", 30, 4, seed=1, dtype=np.float64).P
    np.testing.assert_allclose(np.linalg.norm(P, axis=0), 1.0)                 # unit-norm columns


@pytest.mark.parametrize("call,match", [
    (lambda: SubspaceModel(tiny(), 2, names=["9"]), r"names \['9'\] match no parameter"),
    (lambda: SubspaceModel(tiny(), 2, projection=DenseProjection(5, 2)), r"shape \(5, 2\), expected \(43, 2\)"),
    (lambda: make_projection("sparse", 5, 2), "projection must be"),
    (lambda: DenseProjection(5, 6), "1 <= d <= D"),
    (lambda: DenseProjection(5, 2, matrix=np.eye(5)), r"shape \(5, 5\), expected \(5, 2\)"),
])
def test_errors_say_what_was_expected(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sweep_and_d90():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4))
    labels = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    base = lr.MLP([4, 8, 2], "tanh", dtype="float64", seed=0)

    def train(sub):
        lr.fit(sub, lr.Adam(sub.parameters(trainable_only=True), lr=0.1), lr.CrossEntropyLoss(), X, labels,
               epochs=15, batch_size=16, progress=False)

    def accuracy(sub):
        return lr.evaluate(sub, lr.CrossEntropyLoss(), X, labels)[1]

    rows = intrinsic_sweep(lambda: copy.deepcopy(base), train, accuracy, [1, 8, 40], projection="dense")
    assert [r["d"] for r in rows] == [1, 8, 40] and all(r["projection"] == "DenseProjection" for r in rows)
    assert rows[-1]["accuracy"] > 0.9
    fake = [{"d": d, "accuracy": a} for d, a in ((1, 0.5), (4, 0.88), (16, 0.95), (64, 0.9))]
    assert d90(fake, 0.97) == 4 and d90(fake, 1.0) == 16 and d90(fake, 0.9, fraction=1.0) == 16
    assert d90(fake[:1], 0.97) is None


def test_dz_over_a_lora_model_whose_other_adapter_gets_no_gradient(rng):
    """Parameters that the forward never touches (an inactive adapter) have dθ = 0."""
    model = lr.get_lora_model(tiny(), lr.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    model.add_adapter("other", lr.LoraConfig(r=1, lora_alpha=1, target_modules=["2"]))
    sub = SubspaceModel(model, 4, projection="dense", seed=2)
    assert sub.D == model.num_parameters()
    sub.z.data = 0.3 * rng.standard_normal(4)
    lr.check_module(sub, rng.standard_normal((3, 4)))
