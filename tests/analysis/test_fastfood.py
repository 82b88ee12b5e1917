"""Fastfood P = √(L/D)·(H G Π H B / √(L‖G‖²))[:D, :d]: the fast transform equals the explicit
matrix product, M has unit-norm rows and columns, E[PᵀP] = I, and the backward is Pᵀ."""
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, strategies as st

from lowrank.analysis import fastfood
from lowrank.analysis.fastfood import Fastfood, fwht


def dense(F):
    """P (D, d), one matvec per column."""
    return np.stack([F.matvec(np.eye(F.d, dtype=F.dtype)[j]) for j in range(F.d)], axis=1)


def explicit(F):
    """The formula of the module docstring, as dense matrices."""
    L = F.L
    H = scipy.linalg.hadamard(L).astype(np.float64)
    Pi = np.zeros((L, L))
    Pi[np.arange(L), F.perm] = 1.0                           # (Π y)_i = y_perm[i]
    M = H @ np.diag(F.G) @ Pi @ H @ np.diag(F.B) / np.sqrt(L * np.sum(F.G.astype(np.float64) ** 2))
    return np.sqrt(L / F.D) * M[:F.D, :F.d]


@pytest.mark.parametrize("fine", [1, 2, 4, 32])
@pytest.mark.parametrize("L", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_fwht_is_the_hadamard_matrix(L, fine, rng, monkeypatch):
    """Every split between the H_fine product and the butterflies (radix 4, plus one radix-2
    level when log₂(L / fine) is odd) gives the same H."""
    monkeypatch.setattr(fastfood, "FINE", fine)
    H = scipy.linalg.hadamard(L)
    x = rng.standard_normal((L, 3))
    np.testing.assert_allclose(fwht(x), H @ x, atol=1e-12)
    np.testing.assert_allclose(fwht(x[:, 0]), H @ x[:, 0], atol=1e-12)
    np.testing.assert_allclose(fwht(fwht(x)), L * x, atol=1e-10)          # H Hᵀ = L·I


def test_fwht_rejects_other_lengths():
    with pytest.raises(ValueError, match="power of 2, got 12"):
        fwht(np.ones(12))


dims = st.integers(1, 40).flatmap(lambda D: st.tuples(st.just(D), st.integers(1, D), st.integers(0, 2**16)))


@given(dims)
def test_fast_transform_equals_the_explicit_product_and_backward_is_its_transpose(dims):
    D, d, seed = dims
    F = Fastfood(D, d, seed=seed, dtype=np.float64)
    assert F.L >= D and F.L < 2 * D + (D == 1) and F.L & (F.L - 1) == 0
    P = explicit(F)
    np.testing.assert_allclose(dense(F), P, atol=1e-12)
    rng = np.random.default_rng(seed)
    z, v = rng.standard_normal(d), rng.standard_normal(D)
    np.testing.assert_allclose(F.rmatvec(v), P.T @ v, atol=1e-12)
    assert F.matvec(z) @ v == pytest.approx(z @ F.rmatvec(v), rel=1e-10, abs=1e-12)   # ⟨Pz, v⟩ = ⟨z, Pᵀv⟩


@pytest.mark.parametrize("L", [1, 2, 8, 64])
def test_square_fastfood_has_unit_norm_rows_and_columns(L):
    M = dense(Fastfood(L, L, seed=L, dtype=np.float64))          # D = d = L: P = M exactly
    np.testing.assert_allclose(np.linalg.norm(M, axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(M, axis=1), 1.0, atol=1e-12)


def test_on_average_the_columns_are_orthonormal():
    """E_G[PᵀP] = I_d: the same as a dense projection with unit-norm Gaussian columns
    (P from the explicit formula, which the test above ties to the fast transform)."""
    D, d, seeds = 12, 5, 600
    Ps = [explicit(Fastfood(D, d, seed=s, dtype=np.float64)) for s in range(seeds)]
    mean = sum(P.T @ P for P in Ps) / seeds
    np.testing.assert_allclose(mean, np.eye(d), atol=0.08)


def test_float32_in_float32_out_and_shape_errors():
    F = Fastfood(100, 7, seed=3)
    assert F.shape == (100, 7) and F.L == 128
    assert F.matvec(np.ones(7, np.float32)).dtype == np.float32
    assert F.rmatvec(np.ones(100, np.float32)).dtype == np.float32
    with pytest.raises(ValueError, match=r"z must have shape \(7,\)"):
        F.matvec(np.ones(8, np.float32))
    with pytest.raises(ValueError, match=r"v must have shape \(100,\)"):
        F.rmatvec(np.ones(99, np.float32))
    with pytest.raises(ValueError, match="1 <= d <= D"):
        Fastfood(5, 6)
