"""Truncated SVD: Eckart–Young (nothing of rank r does better; the error is the tail of σ),
exact recovery of a rank-r matrix, the storage count, and choosing r for a target."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from lowrank.analysis.svd import choose_rank, singular_values, truncated_svd


def with_spectrum(rng, p, q, s):
    """U diag(s) Vᵀ (p, q) with random orthogonal U, V: a matrix whose σ we know."""
    U, _ = np.linalg.qr(rng.standard_normal((p, len(s))))
    V, _ = np.linalg.qr(rng.standard_normal((q, len(s))))
    return (U * s) @ V.T


shapes = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**16))


@given(shapes, st.data())
def test_error_is_the_tail_of_the_singular_values(shape, data):
    p, q, seed = shape
    r = data.draw(st.integers(1, min(p, q)))
    W = np.random.default_rng(seed).standard_normal((p, q))
    a = truncated_svd(W, r)
    s = np.linalg.svd(W, compute_uv=False)
    err = W - a.B @ a.C
    assert a.B.shape == (p, r) and a.C.shape == (r, q)
    tail2 = s[r] if r < len(s) else 0.0
    np.testing.assert_allclose(np.linalg.norm(err, 2) if err.size else 0.0, tail2, atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(err), np.sqrt((s[r:] ** 2).sum()), atol=1e-10)
    assert a.spectral_error == pytest.approx(tail2, abs=1e-12)
    assert a.frobenius_error == pytest.approx(np.sqrt((s[r:] ** 2).sum()), abs=1e-12)
    assert a.energy == pytest.approx((s[:r] ** 2).sum() / (s ** 2).sum())
    assert a.storage == p * r + r * q and a.dense_storage == p * q


@pytest.mark.parametrize("p,q,r", [(7, 5, 1), (6, 6, 2), (4, 9, 3)])
def test_no_perturbed_rank_r_matrix_does_better(p, q, r, rng):
    """A random search around the SVD factors (and from random starts) never finds a
    rank-r X with a smaller error in either norm: Eckart–Young."""
    W = rng.standard_normal((p, q))
    a = truncated_svd(W, r)
    best2, bestF = np.linalg.norm(W - a.matrix(), 2), np.linalg.norm(W - a.matrix())
    for _ in range(300):
        scale = rng.choice([1e-3, 1e-1, 1.0])
        B = a.B + scale * rng.standard_normal(a.B.shape)
        C = a.C + scale * rng.standard_normal(a.C.shape)
        X = B @ C
        assert np.linalg.matrix_rank(X) <= r
        assert np.linalg.norm(W - X, 2) >= best2 - 1e-12
        assert np.linalg.norm(W - X) >= bestF - 1e-12


@given(shapes, st.data())
def test_recovers_an_exactly_rank_r_matrix(shape, data):
    p, q, seed = shape
    r = data.draw(st.integers(1, min(p, q)))
    rng = np.random.default_rng(seed)
    W = with_spectrum(rng, p, q, np.sort(rng.uniform(0.5, 3.0, r))[::-1])
    a = truncated_svd(W, r)
    np.testing.assert_allclose(a.matrix(), W, atol=1e-12)
    assert a.frobenius_error < 1e-12 and a.relative_error < 1e-12


def test_float32_input_is_factored_in_float64(rng):
    W = rng.standard_normal((6, 4)).astype(np.float32)
    a = truncated_svd(W, 2)
    assert a.B.dtype == np.float64 and a.C.dtype == np.float64
    np.testing.assert_allclose(singular_values(W), np.linalg.svd(W.astype(np.float64), compute_uv=False))


def test_choose_rank_meets_the_target_with_the_fewest_directions(rng):
    s = np.array([4.0, 2.0, 1.0, 0.5, 0.25])
    W = with_spectrum(rng, 8, 6, s)
    energy = np.cumsum(s ** 2) / (s ** 2).sum()            # kept at r = 1..5
    for target in (0.5, 0.9, 0.99, 0.999, 1.0):
        r = choose_rank(W, energy=target)
        assert energy[r - 1] >= target - 1e-12 and (r == 1 or energy[r - 2] < target)
    for tol in (0.6, 0.3, 0.1, 0.01, 0.0):
        r = choose_rank(s, rel_error=tol)
        assert truncated_svd(W, r).relative_error <= tol + 1e-12
        assert r == 1 or truncated_svd(W, r - 1).relative_error > tol
    assert choose_rank(np.zeros((3, 4)), energy=0.9) == 1


@pytest.mark.parametrize("kwargs,match", [({}, "exactly one"), ({"energy": 0.9, "rel_error": 0.1}, "exactly one"),
                                          ({"energy": 1.5}, "energy must lie"),
                                          ({"rel_error": -0.1}, "rel_error must lie")])
def test_choose_rank_rejects_bad_targets(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_rank(np.ones(3), **kwargs)


@pytest.mark.parametrize("W,r,match", [(np.ones((3, 4)), 0, r"\[1, 3\]"), (np.ones((3, 4)), 4, r"\[1, 3\]"),
                                       (np.ones((3, 4)), True, "integer"), (np.ones(5), 1, "2-D")])
def test_truncated_svd_rejects_bad_rank_or_shape(W, r, match):
    with pytest.raises(ValueError, match=match):
        truncated_svd(W, r)


def test_zero_matrix_has_no_error_and_keeps_all_energy():
    a = truncated_svd(np.zeros((3, 2)), 1)
    assert a.spectral_error == 0.0 and a.relative_error == 0.0 and a.energy == 1.0
