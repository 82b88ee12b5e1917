"""BLAS calls of numba_cpu, and its one fallback: float16, which has no BLAS here, runs in the reference.

NumPy and SciPy wheels each bundle their own OpenBLAS. The big products go through NumPy's
(``x @ W.T``); the rank-r GEMMs that accumulate in place (beta = 1) through SciPy's, which
is pinned to one thread on import (``pin_scipy_blas``).
"""
from pathlib import Path

import numpy as np
import scipy
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

from .. import common, config, reference

half_to_reference = common.fallback(np.float16, reference)
"""Decorator of every dense/LoRA/BGMV/SGMV function here: float16 has neither BLAS nor Numba
arithmetic on this backend, so a float16 call runs ``reference``'s function of the same name."""


def pin_scipy_blas(threads: int = config.SCIPY_BLAS_THREADS) -> list:
    """Give the BLAS that SciPy bundles for itself ``threads`` threads; returns the libraries pinned.

    ``gemm_acc`` calls GEMM through ``scipy.linalg.blas``. NumPy and SciPy wheels each bundle
    their own OpenBLAS, and two thread pools that spin between calls fight over the cores:
    x·Wᵀ in NumPy's BLAS followed by a rank-8 GEMM in SciPy's took 10.7 ms instead of 0.55 ms
    (64×200 @ 200×2000, r = 8, 2 cores). A rank-r product is too small to need threads, so
    SciPy's own copy runs on the calling thread. A shared BLAS (one library for both) is left alone.
    """
    own = Path(scipy.__file__).resolve().parent.parent / "scipy.libs"
    pinned = [lib for lib in ThreadpoolController().lib_controllers
              if lib.user_api == "blas" and Path(lib.filepath).resolve().parent == own]
    for lib in pinned:
        lib.set_num_threads(threads)
    return [lib.filepath for lib in pinned]


PINNED_BLAS = pin_scipy_blas()


def c(a):
    """``a`` as a C-contiguous array (an explicit copy only when it is not one already)."""
    return np.ascontiguousarray(a)


def gemm_acc(C, P, Q, alpha):
    """C += alpha · P @ Q through BLAS GEMM with beta = 1: P (m, k), Q (k, n), C (m, n).

    In place when C is C-contiguous (every caller here); otherwise BLAS works on a copy
    that is written back. Operands of any layout are passed transposed, not copied, when possible.
    """
    if C.size == 0 or P.shape[1] == 0:
        return C
    gemm = blas.get_blas_funcs("gemm", dtype=C.dtype)
    a, ta = (Q.T, 0) if Q.T.flags.f_contiguous else (Q, 1)     # C.T (n, m) += Qᵀ (n, k) Pᵀ (k, m)
    b, tb = (P.T, 0) if P.T.flags.f_contiguous else (P, 1)
    out = gemm(alpha, a, b, beta=1.0, c=C.T, trans_a=ta, trans_b=tb, overwrite_c=1)
    if not np.shares_memory(out, C):          # BLAS had to copy C: write the result back
        C[...] = out.T
    return C


def base_product(x, W, bias):
    """y = x Wᵀ (+ b) through BLAS. (N, D_in) @ (D_in, D_out) -> (N, D_out), C-contiguous."""
    y = c(x @ W.T)                                   # (N, D_in) @ (D_in, D_out)
    if bias is not None:
        y += bias
    return y
