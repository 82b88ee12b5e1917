"""One thread pool for numba_cpu's products and loops: Numba's, when it is safe and fast to use.

NumPy's BLAS keeps its own worker threads, and after each GEMM they spin a while (OpenBLAS's
THREAD_TIMEOUT) waiting for the next one; a Numba parallel loop started in that window fights them
for the cores. So when the pool is usable, every product of this backend runs on it (``blas.matmul``:
``np.dot`` calls on SciPy's single-threaded BLAS, one per Numba thread) and so do the row loops
(``jit``: each compiled serial and parallel); NumPy's BLAS is then never woken by a kernel, and
nothing spins against the pool. Tiny work stays off it (``config.NUMBA_POOL_MIN_MACS`` and
``NUMBA_POOL_MIN_ELEMENTS``): starting the threads would cost more than the work.

Usable means (``threads()`` > 1):
    config.NUMBA_PARALLEL is on, Numba may use more than one thread (``numba.set_num_threads``),
    its threading layer is 'omp' or 'tbb' (pools that keep their workers ready; 'workqueue' wakes
    them for every loop), and this is the process that started the pool (GNU OpenMP's pool does not
    survive fork(): a forked child that starts a parallel loop is aborted by Numba, so a child uses
    the serial paths).
Otherwise the products are NumPy's (its BLAS threads) and the loops serial, as without a pool.
"""
import contextlib
import functools
import os
from pathlib import Path

import numba
import scipy
import scipy.linalg  # noqa: F401  (loads SciPy's own BLAS, so that it is pinned below)
from threadpoolctl import ThreadpoolController

from .. import config
from . import cache

_started = None              # (pid, threading layer) of the process that started Numba's pool here


def layer() -> str:
    """Numba's threading layer, starting its pool on the first call ('' if it cannot start)."""
    global _started
    if _started is None:
        try:
            from numba.np.ufunc import parallel
            parallel._launch_threads()
            name = numba.threading_layer()
        except Exception:        # no threading layer at all: serial
            name = ""
        _started = (os.getpid(), name)
    return _started[1]


_count = None               # numba.get_num_threads without its locks, once Numba's threads are launched


def _numba_threads() -> int:
    """numba.get_num_threads() (the calling thread's count). Numba's own takes two locks to check that its
    threads are launched, 0.8 us a call, several hundred calls a decode step; once they are, the count is
    read directly (the C function Numba itself reads it with)."""
    global _count
    if _count is not None:
        return _count()
    n = numba.get_num_threads()                              # launches Numba's threads
    from numba.np.ufunc import parallel
    _count = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
    return n


def threads() -> int:
    """How many pool threads a kernel may use now: Numba's thread count when the pool is usable, else 1."""
    if not config.NUMBA_PARALLEL:
        return 1
    n = _numba_threads()
    if n < 2:
        return 1
    if _started is not None and _started[0] != os.getpid():  # a forked child of the process that started it
        return 1
    return n if layer() in ("omp", "tbb") else 1


def pin_scipy_blas(threads: int = config.SCIPY_BLAS_THREADS) -> list:
    """Give the BLAS that SciPy bundles for itself ``threads`` threads; returns the libraries pinned.

    ``blas.gemm_acc`` calls GEMM through ``scipy.linalg.blas`` on the calling thread, and Numba's
    ``np.dot`` (``blas.matmul``) calls SciPy's BLAS once per pool thread. NumPy and SciPy wheels each
    bundle their own OpenBLAS, and two thread pools that spin between calls fight over the cores; so
    SciPy's own copy never starts threads of its own, the pool supplies them. A shared BLAS (one
    library for both) is left alone.
    """
    own = Path(scipy.__file__).resolve().parent.parent / "scipy.libs"
    pinned = [lib for lib in ThreadpoolController().lib_controllers
              if lib.user_api == "blas" and Path(lib.filepath).resolve().parent == own]
    for lib in pinned:
        lib.set_num_threads(threads)
    return [lib.filepath for lib in pinned]


PINNED_BLAS = pin_scipy_blas()


def chunks(rows: int) -> int:
    """How many chunks a kernel splits ``rows`` rows into for the pool: 1 on one thread, else 4 a thread
    (at most ``rows``), so that threads finishing early take more."""
    n = threads()
    return 1 if n <= 1 else min(4 * n, rows)


@contextlib.contextmanager
def limit(n: int):
    """Within: every CPU thread pool the kernels use limited to ``n`` threads, restored after: Numba's
    (this pool; numba.set_num_threads, per calling thread) and, through threadpoolctl, NumPy's BLAS
    and every OpenMP pool. SciPy's own BLAS stays at one thread (``pin_scipy_blas``): the pool's
    products call it, one per pool thread. Numba first: starting its OpenMP layer resets other
    OpenMP pools (torch's), so threadpoolctl must come after it to leave them limited."""
    from threadpoolctl import threadpool_limits
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    old = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=n):
            pin_scipy_blas()
            yield
    finally:
        numba.set_num_threads(old)


def jit(**options):
    """Decorator: ``f`` compiled twice by Numba, serial and with its ``prange`` loops on the pool; a call
    runs the parallel one while the pool is usable (``threads()`` > 1), ``config.NUMBA_POOL_LOOPS`` is on
    and its first argument, the array the loop walks, has ``config.NUMBA_POOL_MIN_ELEMENTS`` elements or
    more; else the serial one. ``cache=True`` keeps both on disk (``cache.KernelCache`` keys them apart)."""
    cached = options.pop("cache", False)

    def decorate(f):
        serial = numba.njit(**options)(f)
        parallel = numba.njit(parallel=True, **options)(f)
        if cached:
            cache.enable(serial, parallel=False)
            cache.enable(parallel, parallel=True)

        def run(*args):
            big = getattr(args[0], "size", 0) >= config.NUMBA_POOL_MIN_ELEMENTS
            return (parallel if big and config.NUMBA_POOL_LOOPS and threads() > 1 else serial)(*args)
        functools.update_wrapper(run, f)
        run.serial, run.parallel = serial, parallel
        return run
    return decorate
