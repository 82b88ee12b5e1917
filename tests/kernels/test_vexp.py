"""numba_cpu's vectorizable e^x (kernels/numba_cpu/vexp.py): accuracy in ulps against exp in extended
precision, IEEE's answers at the edges (0 and inf past the range, gradual underflow, NaN), and its switch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from numba import njit  # a required dependency: never skipped

from lowrank.kernels import config
from lowrank.kernels.numba_cpu import vexp

DTYPES = [np.float32, np.float64]


@njit(fastmath=config.NUMBA_FASTMATH, error_model=config.NUMBA_ERROR_MODEL)
def _apply(x, y):
    for i in range(x.shape[0]):
        y[i] = vexp.exp(x[i])


def exp_of(x):
    y = np.empty_like(x)
    _apply(x, y)
    return y


def exact(x):
    return np.exp(x.astype(np.longdouble))            # 64-bit mantissa on x86: 11 bits beyond float64


@pytest.mark.parametrize("dtype", DTYPES)
def test_within_two_ulps_over_the_normal_range(dtype):
    info = np.finfo(dtype)
    lo, hi = float(np.log(info.tiny)), float(np.log(info.max))
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(lo, hi, 200_000), rng.uniform(-1, 1, 50_000),
                        np.arange(-20, 21) * np.log(2)]).astype(dtype)       # and the range reduction's seams
    ulps = np.abs(exp_of(x) - exact(x)) / (exact(x) * info.eps / 2)
    assert ulps.max() <= 2, f"{dtype.__name__}: {ulps.max():.2f} ulps at x = {x[ulps.argmax()]!r}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_edges_are_ieee(dtype):
    info = np.finfo(dtype)
    big, small = float(np.log(info.max)), float(np.log(info.smallest_subnormal))
    x = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, big * 1.001, 1e30, small * 1.01, -1e30], dtype)
    want = np.array([0.0, np.inf, np.nan, 1.0, 1.0, np.inf, np.inf, 0.0, 0.0], dtype)
    np.testing.assert_array_equal(exp_of(x), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_underflow_is_gradual(dtype):
    """Below the normal range e^x goes through the denormals to 0 as libm's does, to within 2 of the
    smallest denormal (each of the two 2^n factors is a normal float; only the last product rounds)."""
    info = np.finfo(dtype)
    lo, tiny = float(np.log(info.smallest_subnormal)), float(np.log(info.tiny))
    x = np.linspace(lo - 1, tiny + 1, 20_001).astype(dtype)
    err = np.abs(exp_of(x).astype(np.longdouble) - exact(x)) / np.longdouble(info.smallest_subnormal)
    assert err.max() <= 2
    assert (exp_of(x)[x > lo + 1] > 0).all()          # no flush to zero in the denormal range


def test_plain_python_call_says_where_it_belongs():
    with pytest.raises(TypeError, match="Numba-compiled"):
        vexp.exp(1.0)


SWITCH = """
import json, re, numpy as np
from lowrank.kernels import config, reference
config.NUMBA_VEXP = {on}
from lowrank.kernels.numba_cpu import activations
g = np.linspace(-30, 30, 1001, dtype=np.float32)
u = np.cos(g)
y = activations.silu_and_mul(g, u)
k = activations._forward.serial
print(json.dumps({{"err": float(np.abs(y - reference.silu_and_mul(g, u)).max()),
                   "llvm_exp": "llvm.exp" in k.inspect_llvm(k.signatures[0])}}))
"""


@pytest.mark.parametrize("on", [True, False])
def test_the_switch_picks_this_exp_or_numbas(on, tmp_path):
    """config.NUMBA_VEXP: SwiGLU's loop computes e^x with this exp (no call left in its code) or with Numba's
    np.exp (LLVM's exp intrinsic, a libm call per element), equal to the reference either way. In a fresh
    process with its own Numba cache: the switch is read when a kernel compiles."""
    out = subprocess.run([sys.executable, "-c", SWITCH.format(on=on)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["llvm_exp"] is not on
    assert got["err"] <= 1e-5
