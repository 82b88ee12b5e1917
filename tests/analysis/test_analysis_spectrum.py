"""Stable rank, effective rank and captured fraction on matrices built with a known spectrum
(U diag(s) Vᵀ, U and V random orthogonal), and the ΔW collectors on real models."""
import copy

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lowrank as lr
from lowrank.analysis.spectrum import (captured_fraction, effective_rank, full_deltas, lora_deltas,
                                       spectrum_rows, stable_rank)
from test_analysis_svd import with_spectrum

spectra = st.lists(st.floats(0.01, 10.0), min_size=1, max_size=7).map(lambda s: np.sort(s)[::-1])


@given(spectra, st.integers(0, 2**16))
def test_ranks_of_a_known_spectrum(s, seed):
    rng = np.random.default_rng(seed)
    M = with_spectrum(rng, len(s) + 2, len(s) + 1, s)
    p = s / s.sum()
    assert stable_rank(M) == pytest.approx((s ** 2).sum() / s[0] ** 2, rel=1e-9)
    assert effective_rank(M) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    for rank in (stable_rank(M), effective_rank(M)):
        assert 1 - 1e-9 <= rank <= len(s) * (1 + 1e-9)
    for r in range(1, len(s) + 2):
        assert captured_fraction(M, r) == pytest.approx((s[:r] ** 2).sum() / (s ** 2).sum(), rel=1e-9)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_n_equal_singular_values_have_both_ranks_n(n, rng):
    M = with_spectrum(rng, 9, 7, np.full(n, 2.5))
    assert stable_rank(M) == pytest.approx(n)
    assert effective_rank(M) == pytest.approx(n)
    assert captured_fraction(M, 1) == pytest.approx(1 / n)


def test_zero_matrix_and_bad_rank():
    Z = np.zeros((3, 4))
    assert stable_rank(Z) == 0.0 and effective_rank(Z) == 0.0 and captured_fraction(Z, 2) == 1.0
    with pytest.raises(ValueError, match="positive integer"):
        captured_fraction(np.eye(3), 0)


def test_deltas_of_full_and_lora_fine_tuning(rng):
    base = lr.MLP([5, 7, 3], seed=1, dtype="float64")
    tuned = copy.deepcopy(base)
    step = rng.standard_normal(tuned[0].weight.shape)
    tuned[0].weight.data = tuned[0].weight.data + step
    full = full_deltas(tuned, base, ["0", "2"])
    np.testing.assert_allclose(full["0"], step, atol=1e-12)
    np.testing.assert_array_equal(full["2"], 0.0)

    model = lr.get_lora_model(copy.deepcopy(base), lr.LoraConfig(r=2, lora_alpha=6, target_modules=["0"]))
    layer = dict(model.lora_layers())["0"]
    layer.lora_B["default"].data = rng.standard_normal(layer.lora_B["default"].shape)
    A, B = layer.lora_A["default"].data, layer.lora_B["default"].data
    got = lora_deltas(model)
    assert list(got) == ["0"]
    np.testing.assert_allclose(got["0"], 3.0 * B @ A, atol=1e-12)            # s = 6 / 2
    np.testing.assert_allclose(full_deltas(model.model, base, ["0"])["0"], 0.0)   # the base stays frozen
    rows = spectrum_rows(got, "lora", ranks=(1, 2))
    assert rows[0]["layer"] == "0" and rows[0]["shape"] == (7, 5)
    assert rows[0]["captured@2"] == pytest.approx(1.0) and rows[0]["stable_rank"] <= 2 + 1e-9
    with pytest.raises(ValueError, match="no LoRA layer holds adapter 'other'"):
        lora_deltas(model, "other")
    with pytest.raises(ValueError, match="layer '0' has weight shape"):
        full_deltas(lr.MLP([4, 7, 3]), base, ["0"])
