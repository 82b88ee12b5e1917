"""What several backends share that is not an input check (those are in ``validate``), in one place.

    NF4_CODE         the 16 NormalFloat-4 values, index = the 4-bit code
    xp               numpy, or cupy for a CuPy array
    sigmoid          σ(x) = 1 / (1 + e^−x) in one buffer, on NumPy or CuPy arrays
    silu_slope       silu'(z) = σ(z) (1 + z (1 − σ(z))) from z and σ(z)
    adapters_in      the distinct adapter ids of a per-row index, −1 left out
    segment_index    SGMV segments expanded to a per-row index
    fallback         the decorator by which a backend sends one dtype to another backend, declared once
    round_q8_0       x rounded to llama.cpp's Q8_0 blocks, as its CPU products round their activations
"""
import functools

import numpy as np

NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
"""The 16 NormalFloat-4 values (QLoRA, bitsandbytes), index = the 4-bit code."""


def host(a):
    """``a`` as a NumPy array (copied from the device for a CuPy array)."""
    return np.asarray(a.get() if hasattr(a, "get") else a)


def xp(a):
    """numpy, or cupy for a CuPy array (so the reference also runs on the GPU)."""
    if type(a).__module__.startswith("cupy"):
        import cupy
        return cupy
    return np


def sigmoid(x):
    """Numerically stable logistic function on NumPy or CuPy arrays (lowrank's layers use it too)."""
    m = xp(x)
    with np.errstate(over="ignore"):           # e^-x = inf for x < -88 (float32) gives 1/inf = 0: σ underflows
        e = m.exp(-x)                         # to 0 there anyway; elsewhere this is exact to rounding
    if not e.shape:                           # a scalar
        return 1 / (1 + e)
    e += 1
    return m.reciprocal(e, out=e)             # 1 / (1 + e^-x), in one buffer


def silu_slope(z, s):
    """silu'(z) = σ (1 + z (1 − σ)) in one fresh buffer, given s = σ(z) (SiLU's and SwiGLU's backward)."""
    d = 1 - s
    d *= z
    d += 1
    d *= s
    return d


def adapters_in(index):
    """The distinct adapter ids used by ``index``, without −1 (host ints)."""
    return [int(k) for k in np.unique(host(index)) if k >= 0]


def segment_index(indptr, seg_index):
    """Per-row index of SGMV segments: rows indptr[t]:indptr[t+1] use seg_index[t]; (N,) like seg_index."""
    return xp(seg_index).repeat(seg_index, np.diff(host(indptr)).tolist())


def fallback(dtype, backend, check=None):
    """Decorator: a call whose first argument (x, dy) has ``dtype`` runs ``backend``'s function of
    the same name instead, after ``check(fn, args, kwargs)`` when given. Each backend names its
    fallback once with this; the function it decorates never sees that dtype."""
    dtype = np.dtype(dtype)

    def decorate(fn):
        other, lead = getattr(backend, fn.__name__), fn.__code__.co_varnames[0]

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if np.dtype((args[0] if args else kwargs[lead]).dtype) != dtype:
                return fn(*args, **kwargs)
            if check is not None:
                check(fn, args, kwargs)
            return other(*args, **kwargs)
        return run
    return decorate


def round_q8_0(x):
    """x̃ = x rounded to Q8_0 blocks (``reference/gguf.py`` states it), float32.   x (N, D_in) -> x̃ (N, D_in), D_in = 32k."""
    x32 = xp(x).asarray(x, np.float32).reshape(x.shape[0], x.shape[1] // 32, 32)       # (N, D_in / 32, 32)
    d = xp(x).abs(x32).max(axis=2, keepdims=True, initial=np.float32(0)) / np.float32(127)
    with np.errstate(divide="ignore"):
        v = x32 * xp(x).where(d == 0, np.float32(0), np.float32(1) / d)
    a = xp(x).abs(v)
    q = xp(x).sign(v) * (xp(x).floor(a) + xp(x).floor(np.float32(2) * (a - xp(x).floor(a))))   # ties away from 0
    q = q.astype(np.int8).astype(np.float32)                                  # the int8 codes (no −0)
    return (d.astype(np.float16).astype(np.float32) * q).reshape(x.shape)
