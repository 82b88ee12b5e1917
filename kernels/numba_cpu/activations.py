"""Numba CPU activation kernels: ``reference/activations.py``'s SwiGLU gate (the semantics are there).

NumPy makes six passes for the forward and eleven for the backward, with fresh (N, I) temporaries;
here one loop reads g, u (and dy) once, with ``vexp.exp`` for e^−g (it vectorizes; Numba's own
exp is a scalar libm call). ``python -m benchmarks.elementwise`` times both against the reference.
"""
import numpy as np
from numba import prange

from .. import config, validate
from . import pool
from .blas import c, half_to_reference
from .vexp import exp

_JIT = dict(cache=True, fastmath=config.NUMBA_FASTMATH, error_model=config.NUMBA_ERROR_MODEL)


@pool.jit(**_JIT)
def _forward(g, u, one, y):
    """y = g σ u with σ = 1 / (1 + e^−g); ``one`` in the arrays' dtype keeps float32 arithmetic float32."""
    for i in prange(g.shape[0]):
        y[i] = g[i] / (one + exp(-g[i])) * u[i]


@pool.jit(**_JIT)
def _backward(dy, g, u, one, dg, du):
    for i in prange(g.shape[0]):
        s = one / (one + exp(-g[i]))
        du[i] = dy[i] * g[i] * s
        dg[i] = dy[i] * u[i] * s * (one + g[i] * (one - s))


# -- SiLU and multiply (SwiGLU) ---------------------------------------------------------------
@half_to_reference
def silu_and_mul(g, u):
    """One loop: y = g u / (1 + e^−g)."""
    validate.silu_and_mul(g, u)
    y = np.empty(g.shape, g.dtype)
    _forward(c(g).reshape(-1), c(u).reshape(-1), g.dtype.type(1), y.reshape(-1))
    return y


@half_to_reference
def silu_and_mul_backward(dy, g, u):
    """One loop writing dg and du."""
    validate.silu_and_mul(g, u, dy)
    dg, du = np.empty(g.shape, g.dtype), np.empty(g.shape, g.dtype)
    _backward(c(dy).reshape(-1), c(g).reshape(-1), c(u).reshape(-1), g.dtype.type(1), dg.reshape(-1),
              du.reshape(-1))
    return dg, du
