"""BLAS calls of numba_cpu, and its one fallback: float16, which has no BLAS here, runs in the reference.

NumPy and SciPy wheels each bundle their own OpenBLAS. SciPy's is pinned to one thread on import
(``pool.pin_scipy_blas``): the rank-r GEMMs that accumulate in place (beta = 1, ``gemm_acc``) call it on
the calling thread. Every other product (``matmul``) is cut into GEMM tasks that Numba's pool runs, one
task per thread (see ``pool.py``), on ``PROVIDER``'s BLAS: SciPy's OpenBLAS or, where the ``mkl`` wheel is
installed, MKL (``mkl.py``; ``config.NUMBA_BLAS``). Without a usable pool the products are NumPy's
(``a @ b``, its BLAS threads), or with MKL the same tasks on the calling thread.

``matmul`` calls that BLAS's ``sgemm``/``dgemm`` (``sgemv``/``dgemv`` for a row or column vector) from
compiled code through their addresses (SciPy's ``scipy.linalg.cython_blas``, or MKL's), registered once as
the symbols ``lowrank_sgemm`` ... so that the cached machine code names a symbol, not an address of one
process. Operands of any strides with one unit stride per matrix go in as they are (a transposed or
head-major view is not copied), broadcast batch axes by their offsets. Numba's own ``np.dot`` calls
SciPy's BLAS too but takes only C- or F-ordered matrices, so a block of columns or a head-major view would be
copied first.
"""
import math
from typing import NamedTuple

import llvmlite.binding
import numba
import numpy as np
from numba import types
from numba.extending import get_cython_function_address
from scipy.linalg import blas

from .. import common, config, reference
from . import gemv, mkl, pool, small_m

half_to_reference = common.fallback(np.float16, reference)
"""Decorator of every dense/LoRA/BGMV/SGMV function here: float16 has neither BLAS nor Numba
arithmetic on this backend, so a float16 call runs ``reference``'s function of the same name."""


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
    """y = x Wᵀ (+ b): (N, D_in) @ (D_in, D_out) -> (N, D_out), C-contiguous. A few float32 rows (``gemv.usable``)
    and a few float64 rows (``small_m.usable``) stream W once through ``gemv.product`` and ``small_m.product``;
    the rest is BLAS."""
    if gemv.usable(x, W):
        return gemv.product(x, W, bias)
    if small_m.usable(x, W):
        return small_m.product(x, W, bias)
    y = matmul(x, W.T)                               # (N, D_in) @ (D_in, D_out)
    if bias is not None:
        y += bias
    return y


# -- products on Numba's pool -------------------------------------------------------------------
def _provider(choice: str):
    """(name, {routine: address}) of the pool's BLAS: 'mkl' (``mkl.py``) or 'scipy' (SciPy's OpenBLAS); 'auto' is
    MKL when it loads, else SciPy's."""
    if choice not in ("auto", "mkl", "scipy"):
        raise ValueError(f"numba_cpu's BLAS: LOWRANK_BLAS (config.NUMBA_BLAS) must be 'auto', 'mkl' or 'scipy', "
                         f"got {choice!r}")
    if choice != "scipy":
        try:
            return "mkl", mkl.load()
        except ImportError:
            if choice == "mkl":
                raise
    return "scipy", {name: get_cython_function_address("scipy.linalg.cython_blas", name) for name in mkl.ROUTINES}


PROVIDER, _addresses = _provider(config.NUMBA_BLAS)
"""The BLAS whose GEMM the pool's tasks call: 'mkl' or 'scipy'; chosen once, at import."""
for _name, _address in _addresses.items():
    llvmlite.binding.add_symbol(f"lowrank_{_name}", _address)
_GEMM, _GEMV = types.void(*[types.uintp] * 13), types.void(*[types.uintp] * 11)   # Fortran BLAS: all by address
_sgemm, _dgemm = (types.ExternalFunction(f"lowrank_{p}gemm", _GEMM) for p in "sd")
_sgemv, _dgemv = (types.ExternalFunction(f"lowrank_{p}gemv", _GEMV) for p in "sd")
_N, _T = ord("N"), ord("T")


@numba.njit(cache=True)
def _gemm(a, b, c, m, n, k, ta, lda, tb, ldb, ldc, alpha, double):
    """C (m, n) = alpha · A (m, k) B (k, n) at addresses a, b, c, as column-major BLAS sees row-major
    operands: Cᵀ (n, m) = op(B)ᵀ (n, k) · op(A)ᵀ (k, m); GEMV when m or n is 1 (GEMM is slow there).

    The scalars BLAS reads by address live in this call's own buffers (its own function: a parallel
    loop hoists allocations out and shares them), read once more after the call: Numba frees an array
    after its last use, and taking ``.ctypes.data`` is one."""
    ints = np.empty(7, np.int32)
    ch = np.empty(2, np.uint8)
    if m == 1:                                 # Cᵀ (n,) = op(B)ᵀ (n, k) · aᵀ (k,): GEMV on B
        ch[0] = tb
        ints[0], ints[1] = (n, k) if tb == _N else (k, n)
        ints[2], ints[3], ints[4] = ldb, 1 if ta == _N else lda, 1     # lda, incx, incy
        x, mat, gemv = a, b, True
    elif n == 1:                               # C (m,) = op(A) (m, k) · b (k,): GEMV on A
        ch[0] = _T if ta == _N else _N
        ints[0], ints[1] = (k, m) if ta == _N else (m, k)
        ints[2], ints[3], ints[4] = lda, ldb if tb == _N else 1, ldc
        x, mat, gemv = b, a, True
    else:
        ch[0], ch[1] = tb, ta
        ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = n, m, k, ldb, lda, ldc
        x, mat, gemv = a, b, False
    pi, pch = ints.ctypes.data, ch.ctypes.data
    sd, ss = np.empty(2, np.float64), np.empty(2, np.float32)      # alpha, beta = 0
    sd[0], sd[1], ss[0], ss[1] = alpha, 0.0, alpha, 0.0
    pd, ps = sd.ctypes.data, ss.ctypes.data
    if gemv and double:        # trans, m, n, alpha, A, lda, x, incx, beta, y, incy
        _dgemv(pch, pi, pi + 4, pd, mat, pi + 8, x, pi + 12, pd + 8, c, pi + 16)
    elif gemv:
        _sgemv(pch, pi, pi + 4, ps, mat, pi + 8, x, pi + 12, ps + 4, c, pi + 16)
    elif double:               # transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc
        _dgemm(pch, pch + 1, pi, pi + 4, pi + 8, pd, mat, pi + 12, x, pi + 16, pd + 8, c, pi + 20)
    else:
        _sgemm(pch, pch + 1, pi, pi + 4, pi + 8, ps, mat, pi + 12, x, pi + 16, ps + 4, c, pi + 20)
    return ints[0] + ch[0] + int(sd[0]) + int(ss[0])


@pool.jit(cache=True)
def _gemm_tasks(pa, pb, pc, tasks, k, ta, lda, tb, ldb, ldc, alpha, double):
    """``_gemm`` for each task t = (a offset, b offset, c offset, m, n), offsets in items."""
    size = 8 if double else 4
    for t in numba.prange(tasks.shape[0]):
        _gemm(pa + size * tasks[t, 0], pb + size * tasks[t, 1], pc + size * tasks[t, 2], tasks[t, 3], tasks[t, 4],
              k, ta, lda, tb, ldb, ldc, alpha, double)


def _blas_view(a):
    """(a, trans, ld): how column-major BLAS reads the row-major matrices a (..., rows, cols) as their
    transposes, from their strides in items; a C-contiguous copy when no matrix axis has unit stride."""
    rows, cols = a.shape[-2:]
    if any(st % a.itemsize for st in a.strides):
        a = np.ascontiguousarray(a)
    s0, s1 = (st // a.itemsize for st in a.strides[-2:])
    if (s1 == 1 or cols == 1) and (rows == 1 or s0 >= max(1, cols)):
        return a, _N, s0 if rows > 1 else max(1, cols)
    if (s0 == 1 or rows == 1) and (cols == 1 or s1 >= max(1, rows)):
        return a, _T, s1 if cols > 1 else max(1, rows)
    a = np.ascontiguousarray(a)
    return a, _N, max(1, cols)


def _batch_strides(a, batch):
    """The strides in items of ``a``'s batch axes broadcast to ``batch`` (0 where it repeats a matrix)."""
    lead = a.shape[:-2]
    pad = len(batch) - len(lead)
    return [0] * pad + [st // a.itemsize if n > 1 else 0 for n, st in zip(lead, a.strides[:-2])]


@numba.njit(cache=True)
def _split_tasks(batch, sa, sb, M, N, K, a_row, b_col, threads, min_macs):
    """The GEMM tasks (a offset, b offset, c offset, m, n) in items: one per matrix of the batch (C order),
    each cut in blocks when there are fewer matrices than threads and the product is big enough: blocks
    of rows of A and C (``a_row`` items apart) or, when N > M, of columns of B and C (``b_col`` apart),
    so that the operand every block reads whole is the smaller one."""
    count = 1
    for n in batch:
        count *= n
    split = 1
    if count < threads and M * N * K >= min_macs * threads:
        split = min(-(-threads // count), max(M, N))
    by_rows = M >= N
    side = M if by_rows else N
    tasks = np.empty((count * split, 5), np.int64)
    for i in range(count):
        rest, a0, b0 = i, 0, 0
        for ax in range(batch.size - 1, -1, -1):           # unravel i over the batch axes
            j = rest % batch[ax]
            rest //= batch[ax]
            a0 += j * sa[ax]
            b0 += j * sb[ax]
        for t in range(split):
            lo, hi = side * t // split, side * (t + 1) // split
            row = i * split + t
            tasks[row, 0] = a0 + (lo * a_row if by_rows else 0)
            tasks[row, 1] = b0 + (0 if by_rows else lo * b_col)
            tasks[row, 2] = i * M * N + (lo * N if by_rows else lo)
            tasks[row, 3] = hi - lo if by_rows else M
            tasks[row, 4] = N if by_rows else hi - lo
    return tasks


_PLANS: dict = {}        # (shapes, strides, dtypes, threads, threshold) -> _Plan
_MAX_PLANS = 512


class _Plan(NamedTuple):
    shape: tuple           # the output's (..., M, N)
    tasks: object          # ``_split_tasks``'s tasks; None where NumPy's product runs
    K: int = 0
    ta: int = _N           # how BLAS reads A and B (``_blas_view``)
    lda: int = 1
    tb: int = _N
    ldb: int = 1
    copy_a: bool = False   # True: BLAS cannot read a (no unit stride in its matrices), its C-ordered copy goes in
    copy_b: bool = False   # the same for b


def matmul(a, b, alpha=1.0, out=None):
    """alpha · a @ b (NumPy's matmul: broadcast batch axes): a (..., M, K), b (..., K, N) -> (..., M, N), C-contiguous,
    written into ``out`` when given (C-contiguous, that shape and dtype: a buffer the caller reuses). Shapes are the
    caller's to check (``validate.matmul``).

    On the pool, GEMM tasks (``_split_tasks``): a matrix each, or blocks of one when there are fewer
    matrices than threads. Without a usable pool (with MKL: the tasks on this thread), for float16 and mixed
    dtypes, and below ``config.NUMBA_POOL_MIN_MACS``: NumPy's ``a @ b``. A layer calls the same shapes every
    step, so the plan of a (shapes, strides, dtypes, threads) is kept (``_PLANS``).
    """
    n_threads = pool.threads()
    key = (a.shape, a.strides, b.shape, b.strides, a.dtype.char, b.dtype.char, n_threads, config.NUMBA_POOL_MIN_MACS)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(a, b, n_threads)
    if plan.tasks is None:
        y = np.matmul(a, b, out=out)
        return y if alpha == 1.0 else np.multiply(y, a.dtype.type(alpha), out=y)
    a = np.ascontiguousarray(a) if plan.copy_a else a
    b = np.ascontiguousarray(b) if plan.copy_b else b
    out = np.empty(plan.shape, a.dtype) if out is None else out
    run = _gemm_tasks.parallel if plan.tasks.shape[0] > 1 and n_threads > 1 else _gemm_tasks.serial
    run(a.ctypes.data, b.ctypes.data, out.ctypes.data, plan.tasks, plan.K, plan.ta, plan.lda, plan.tb, plan.ldb,
        plan.shape[-1], float(alpha), a.dtype == np.float64)
    return out


def _make_plan(a, b, n_threads):
    """The ``_Plan`` of a @ b: GEMM tasks on the pool, or (tasks None) NumPy's product."""
    M, K = a.shape[-2:]
    N = b.shape[-1]
    batch = a.shape[:-2] if a.shape[:-2] == b.shape[:-2] else np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    numpy = _Plan(batch + (M, N), None)
    if ((n_threads < 2 and PROVIDER == "scipy") or a.dtype != b.dtype or a.dtype not in (np.float32, np.float64)
            or math.prod(batch) * M * N * K < max(1, config.NUMBA_POOL_MIN_MACS)):
        return numpy
    a2, ta, lda = _blas_view(a)
    b2, tb, ldb = _blas_view(b)
    if max(M, N, K, lda, ldb) >= 2**31:                # BLAS's int is 32 bits
        return numpy
    tasks = _split_tasks(np.array(batch, np.int64), np.array(_batch_strides(a2, batch), np.int64),
                         np.array(_batch_strides(b2, batch), np.int64), M, N, K,
                         lda if ta == _N else 1, 1 if tb == _N else ldb, n_threads, config.NUMBA_POOL_MIN_MACS)
    return _Plan(batch + (M, N), tasks, K, ta, lda, tb, ldb, a2 is not a, b2 is not b)
