"""The LoRA paper's subspace similarity φ(i, j) = ‖U_iᵀU_j‖_F² / min(i, j): 1 for the same
subspace, 0 for orthogonal ones, symmetric, in [0, 1], and equal to the direct formula."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from lowrank.analysis.similarity import similarity_grid, subspace_similarity, top_directions
from test_analysis_svd import with_spectrum


def direct_phi(M1, M2, i, j, side="right"):
    """φ from the definition: SVD each, slice, multiply, square, sum."""
    pick = (lambda M: np.linalg.svd(M)[2].T) if side == "right" else (lambda M: np.linalg.svd(M)[0])
    U1, U2 = pick(M1)[:, :i], pick(M2)[:, :j]
    return np.sum((U1.T @ U2) ** 2) / min(i, j)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(5, 11), st.integers(0, 2**16))
def test_grid_matches_the_definition_and_is_symmetric(r1, r2, D, seed):
    rng = np.random.default_rng(seed)
    A1, A2 = rng.standard_normal((r1, D)), rng.standard_normal((r2, D))       # two lora_A's
    g = similarity_grid(A1, A2)
    assert g.shape == (r1, r2)
    for i in range(1, r1 + 1):
        for j in range(1, r2 + 1):
            assert g[i - 1, j - 1] == pytest.approx(direct_phi(A1, A2, i, j), abs=1e-10)
    np.testing.assert_allclose(similarity_grid(A2, A1), g.T, atol=1e-12)
    assert g.min() >= 0 and g.max() <= 1


def test_identical_subspace_scores_one_and_orthogonal_zero(rng):
    Q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    A = (Q[:, :4] * [4.0, 3.0, 2.0, 1.0]).T               # (4, 12), row space = Q[:, :4]
    g = similarity_grid(A, A)
    np.testing.assert_allclose(g, 1.0, atol=1e-12)                             # one span contains the other
    B = rng.standard_normal((3, 4)) @ Q[:, 4:8].T          # row space inside span Q[:, 4:8] ⟂ A's
    np.testing.assert_allclose(similarity_grid(A, B), 0.0, atol=1e-12)
    assert subspace_similarity(Q[:, :4], Q[:, :2]) == pytest.approx(1.0)
    assert subspace_similarity(Q[:, :4], Q[:, 4:6]) == pytest.approx(0.0, abs=1e-12)


def test_left_side_compares_output_spaces(rng):
    M1 = with_spectrum(rng, 10, 6, [3.0, 2.0, 1.0])
    M2 = with_spectrum(rng, 10, 8, [2.0, 1.0])
    g = similarity_grid(M1, M2, 3, 2, side="left")
    for i in (1, 2, 3):
        for j in (1, 2):
            assert g[i - 1, j - 1] == pytest.approx(direct_phi(M1, M2, i, j, "left"), abs=1e-10)


def test_random_subspaces_score_near_max_ij_over_D(rng):
    D, i, j = 400, 4, 8
    scores = [subspace_similarity(top_directions(rng.standard_normal((i, D))),
                                  top_directions(rng.standard_normal((j, D)))) for _ in range(50)]
    assert np.mean(scores) == pytest.approx(max(i, j) / D, rel=0.2)


@pytest.mark.parametrize("call,match", [
    (lambda: top_directions(np.ones((3, 4)), 4), r"k must lie in \[1, 3\]"),
    (lambda: top_directions(np.ones((3, 4)), side="up"), "side must be"),
    (lambda: top_directions(np.ones(4)), "2-D"),
    (lambda: subspace_similarity(np.ones((4, 2)), np.ones((5, 2))), "same D"),
    (lambda: similarity_grid(np.ones((2, 4)), np.ones((2, 5))), "different spaces"),
])
def test_errors_name_what_was_expected(call, match):
    with pytest.raises(ValueError, match=match):
        call()
