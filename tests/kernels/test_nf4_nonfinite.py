"""NaN and Inf pass through the NF4 kernels as IEEE arithmetic says they do (the project's
policy: never assume them away). Every Numba path is forced in turn: the element-by-element
GEMV, the aligned GEMV/GEMVᵀ, the AVX2 ones, and the tiles handed to BLAS; each must give
the NumPy reference's NaN/±Inf pattern exactly, and stay finite where the input is."""
from unittest import mock

import numpy as np
import pytest

from lowrank.kernels import config
from lowrank.kernels.numba_cpu import nf4 as numba_nf4, nf4_avx2
from lowrank.kernels.reference import nf4 as reference_nf4

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")   # NaN is the point
NAN, INF = float("nan"), float("inf")
# (D_in, blocksize, AVX2 on?): element-by-element GEMV (odd rows), aligned (blocksize 8), AVX2 (32)
LAYOUTS = [(21, 6, False), (32, 8, False), (64, 32, False)] + ([(64, 32, True)] if nf4_avx2.AVAILABLE else [])


def nf4_weight(D_out, D_in, blocksize):
    """Codes that include 0 (q = 7), +1 and −1, so Inf·0 = NaN and +Inf + −Inf = NaN both occur."""
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (D_out * D_in + 1) // 2, dtype=np.uint8)
    packed[0] = 0x7F                                        # q = 7 (0.0) then q = 15 (+1.0)
    absmax = rng.uniform(0.5, 2, -(-D_out * D_in // blocksize)).astype(np.float32)
    return packed, absmax


def same_pattern(got, ref):
    """Bit-for-bit NaN / +Inf / −Inf positions; finite values finite."""
    for test in (np.isnan, np.isposinf, np.isneginf, np.isfinite):
        np.testing.assert_array_equal(test(got), test(ref), err_msg=test.__name__)


@pytest.mark.parametrize("D_in, blocksize, avx2", LAYOUTS)
@pytest.mark.parametrize("N, gemv_max_n", [(1, 1), (3, 0)])            # fused GEMV, then tiles + BLAS
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_nonfinite_inputs_come_out_as_ieee_says(D_in, blocksize, avx2, N, gemv_max_n, dtype, bad):
    D_out = 5
    packed, absmax = nf4_weight(D_out, D_in, blocksize)
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((N, D_in)).astype(dtype), rng.standard_normal((N, D_out)).astype(dtype)
    x[0, 1], dy[0, 2] = bad, bad                            # row 0 non-finite, the other rows finite
    shape = (D_out, D_in)
    with mock.patch.multiple(config, NF4_AVX2=avx2, NF4_GEMV_MAX_N=gemv_max_n, NF4_TILE_ROWS=2,
                             NF4_POOL_TILE_ROWS=2):
        y = numba_nf4.nf4_matmul(x, packed, absmax, shape, blocksize)
        dx = numba_nf4.nf4_matmul_dx(dy, packed, absmax, shape, blocksize)
    y_ref = reference_nf4.nf4_matmul(x, packed, absmax, shape, blocksize)
    dx_ref = reference_nf4.nf4_matmul_dx(dy, packed, absmax, shape, blocksize)
    same_pattern(y, y_ref)
    same_pattern(dx, dx_ref)
    assert not np.isfinite(y[0]).any() and not np.isfinite(dx[0]).any()      # the bad value reached every output
    assert np.isfinite(y[1:]).all() and np.isfinite(dx[1:]).all()


def test_numba_fastmath_flags_keep_nan_and_inf_and_live_in_config():
    """One place (config.NUMBA_FASTMATH), used by every Numba kernel, without nnan / ninf / 'fast'."""
    assert isinstance(config.NUMBA_FASTMATH, set)
    assert not config.NUMBA_FASTMATH & {"fast", "nnan", "ninf"}
    for name in ("_gemv", "_gemv_aligned", "_gemv_t_aligned"):
        kernel = getattr(numba_nf4, name)                      # compiled twice, serial and parallel (pool.jit)
        for compiled in (kernel.serial, kernel.parallel):
            assert compiled.targetoptions.get("fastmath") == config.NUMBA_FASTMATH, name
