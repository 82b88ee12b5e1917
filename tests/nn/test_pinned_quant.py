"""Double quantization's offset and scale from bitsandbytes' definition, computed here.

bitsandbytes (``quantize_4bit`` with ``compress_statistics``) takes ``offset = absmax.mean()``, quantizes
``absmax − offset`` blockwise (256) with its signed dynamic map, and adds the offset back. Oracles:
the absmax values from the slow per-element NF4 reference of test_quant, their mean, and the
per-block max |absmax − mean|; the dequantization error is bounded by that scale, not by one the
code under test reports. On absmax values clustered near 1, as a real weight's blocks are, centring
makes the error about 100 times smaller than quantizing the raw values would.
"""
import numpy as np
import pytest

from lowrank.nn.quant import DYNAMIC_CODE, DYNAMIC_HALF_GAP, double_dequantize, double_quantize, quantize_nf4
from test_quant import slow_nf4


def bnb_statistics(absmax, blocksize=256):
    """(offset, per-block scale) as bitsandbytes defines them: the mean, and max |absmax − mean| per block."""
    absmax = np.asarray(absmax, np.float64)
    offset = absmax.mean()
    centred = absmax - offset
    return offset, np.array([np.abs(centred[i:i + blocksize]).max() for i in range(0, len(absmax), blocksize)])


@pytest.mark.parametrize("shape, seed", [((64, 300), 0), ((33, 777), 1)])
def test_nf4_tensor_stores_the_mean_of_its_absmax_values_and_their_centred_scales(shape, seed):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.02
    _, _, absmax = slow_nf4(w, 64)                                          # (n_blocks,) by the slow reference
    offset, scale = bnb_statistics(absmax)
    q = quantize_nf4(w, 64, double_quant=True)
    assert float(q.absmax_offset[0]) == pytest.approx(offset, rel=1e-6)
    np.testing.assert_allclose(q.absmax_scale, scale, rtol=1e-5)
    per_block = np.repeat(scale, 256)[:len(absmax)]
    assert (np.abs(q.absmax().astype(np.float64) - absmax) <= per_block * DYNAMIC_HALF_GAP + 1e-9).all()


def test_centring_on_the_mean_makes_clustered_absmax_values_a_hundred_times_more_precise():
    absmax = (1 + 0.01 * np.random.default_rng(3).uniform(-1, 1, 600)).astype(np.float32)   # near 1, ± 1 %
    offset, scale = bnb_statistics(absmax)                                  # scale about 0.01 per block
    q, stored_scale, stored_offset = double_quantize(absmax)
    assert float(stored_offset) == pytest.approx(offset, rel=1e-6)
    back = double_dequantize(q, stored_scale, stored_offset).astype(np.float64)
    bound = scale.max() * DYNAMIC_HALF_GAP + 1e-6                           # 7e-5, + float32 rounding near 1
    assert np.abs(back - absmax).max() <= bound
    # offset 0: the raw values on the dynamic map, scaled by their max, are ~100 times less precise
    raw = DYNAMIC_CODE[np.abs(DYNAMIC_CODE[:, None] - absmax / absmax.max()).argmin(axis=0)] * absmax.max()
    assert np.abs(raw - absmax).max() > 50 * bound
