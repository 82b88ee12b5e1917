"""e^x that LLVM can vectorize, for the Numba loops of the softmax and SiLU (backend-private).

Numba's ``math.exp``/``np.exp`` in a loop is a call to libm's scalar exp here (no SVML), which keeps
the loop scalar. ``exp`` below is straight-line arithmetic (no call, no branch), so a loop that uses it
vectorizes and the exp joins the loop's one pass; ``config.NUMBA_VEXP`` off makes it Numba's np.exp.

    x = n ln2 + r,  n = round(x / ln2),  |r| <= ln2 / 2      (Cody and Waite: ln2 = hi + lo, n·hi exact)
    e^r = Σ_{k<=K} r^k / k!                                  (Taylor; Horner)
    e^x = e^r · 2^⌊n/2⌋ · 2^(n − ⌊n/2⌋)                        (each factor a normal float built from its bits)

Truncation: r^(K+1)/(K+1)! <= 0.347^(K+1)/(K+1)!, i.e. 5e-9 for K = 7 (float32, half an ulp is 6e-8) and
4e-18 for K = 13 (float64, 1.1e-16). Splitting 2^n in two keeps both factors normal while the result
underflows gradually to the denormals and 0, and overflows to inf, as libm does. x is clamped first to
a range just beyond where e^x is 0 or inf (the clamp cannot change the result), and a NaN comes out as
NaN. tests/kernels/test_vexp.py holds it to 2 ulps and to these edges.
"""
import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

from .. import config

_FAST = dict(fastmath=config.NUMBA_FASTMATH, error_model=config.NUMBA_ERROR_MODEL)


@intrinsic
def _float_from_bits(typingctx, bits):
    """int32 -> float32, int64 -> float64, same bits (LLVM's bitcast: free, and vectorizes)."""
    if bits not in (types.int32, types.int64):
        return None
    out = types.float32 if bits == types.int32 else types.float64

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(out))
    return out(bits), codegen


@njit(**_FAST)
def _exp32(x):
    t = min(max(x, np.float32(-110.0)), np.float32(89.0))        # e^-110 rounds to 0, e^89 to inf
    n = np.floor(t * np.float32(1.4426950408889634) + np.float32(0.5))
    r = (t - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)
    p = ((((((np.float32(1 / 5040) * r + np.float32(1 / 720)) * r + np.float32(1 / 120)) * r + np.float32(1 / 24))
             * r + np.float32(1 / 6)) * r + np.float32(0.5)) * r + np.float32(1)) * r + np.float32(1)
    n1 = np.int32(np.int32(n) >> 1)
    n2 = np.int32(np.int32(n) - n1)
    y = p * _float_from_bits(np.int32((n1 + 127) << 23)) * _float_from_bits(np.int32((n2 + 127) << 23))
    return y if x == x else x                                      # NaN in, NaN out


@njit(**_FAST)
def _exp64(x):
    t = min(max(x, -750.0), 710.0)                                  # e^-750 rounds to 0, e^710 to inf
    n = np.floor(t * 1.4426950408889634 + 0.5)
    r = (t - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10
    p = 1 / 6227020800.0                                            # 1/13!, then Horner down to 1/0!
    p = p * r + 1 / 479001600.0
    p = p * r + 1 / 39916800.0
    p = p * r + 1 / 3628800.0
    p = p * r + 1 / 362880.0
    p = p * r + 1 / 40320.0
    p = p * r + 1 / 5040.0
    p = p * r + 1 / 720.0
    p = p * r + 1 / 120.0
    p = p * r + 1 / 24.0
    p = p * r + 1 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    n1 = np.int64(np.int64(n) >> 1)
    n2 = np.int64(np.int64(n) - n1)
    y = p * _float_from_bits(np.int64((n1 + 1023) << 52)) * _float_from_bits(np.int64((n2 + 1023) << 52))
    return y if x == x else x


def exp(x):
    """e^x of a float32 or float64 scalar, in its own precision; call it from Numba code."""
    raise TypeError("numba_cpu.vexp.exp is for Numba-compiled loops; use np.exp in Python")


@overload(exp)
def _exp_impl(x):
    if not config.NUMBA_VEXP:
        return lambda x: np.exp(x)
    if x == types.float32:
        return lambda x: _exp32(x)
    if x == types.float64:
        return lambda x: _exp64(x)
    return None
