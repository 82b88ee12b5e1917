"""Intel MKL as the BLAS of the pool's products, when the ``mkl`` wheel is installed (``pip install "lowrank[mkl]"``).

``blas.matmul`` calls GEMM from compiled code by address, one call per pool thread, so any Fortran BLAS with
32-bit integers serves. MKL's GEMM is faster than OpenBLAS's at a transformer layer's shapes, most of all when
the operands come cold from memory, as in a training step (``benchmarks/real_model.py``). It is loaded through
its one dynamic library, ``libmkl_rt``, set to its sequential layer (the pool supplies the threads: a second
pool would spin against it) and to 32-bit integers (LP64), as SciPy's BLAS takes them.
"""
import ctypes
import glob
import os
import sys

SEQUENTIAL, LP64 = 1, 0        # mkl_service.h: MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64
ROUTINES = ("sgemm", "dgemm", "sgemv", "dgemv")
SONAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")    # by name: the loader's own search path


def _folders() -> list:
    """The environments' lib folders, where the ``mkl`` wheel puts libmkl_rt."""
    return [os.path.join(prefix, "lib") for prefix in dict.fromkeys((sys.prefix, sys.base_prefix))]


def library_paths() -> list:
    """Where libmkl_rt may be: the environment's lib folder, then by name on the loader's search path (dlopen
    searches it; ctypes.util.find_library would start ldconfig at every import, 10-20 ms)."""
    found = [path for folder in _folders() for path in sorted(glob.glob(os.path.join(folder, "libmkl_rt.so*")))]
    return found + list(SONAMES)


def load(paths=None) -> dict:
    """{routine: address} of MKL's Fortran sgemm, dgemm, sgemv and dgemv (``ROUTINES``), MKL set sequential and
    LP64, from the first of ``paths`` (default ``library_paths()``) that loads.

    Raises ImportError, saying where it looked, when none loads or MKL refuses those settings."""
    paths = library_paths() if paths is None else paths
    errors = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            if os.sep in path or "cannot open shared object file" not in str(e):   # not merely absent by name
                errors.append(f"{path}: {e}")
            continue
        if lib.MKL_Set_Threading_Layer(SEQUENTIAL) != SEQUENTIAL or lib.MKL_Set_Interface_Layer(LP64) != LP64:
            errors.append(f"{path}: MKL refused its sequential layer with 32-bit integers")
            continue
        return {name: ctypes.cast(getattr(lib, f"{name}_"), ctypes.c_void_p).value for name in ROUTINES}
    where = "; ".join(errors) or f"no libmkl_rt.so* in {', '.join(_folders())} nor on the loader's path"
    raise ImportError(f"MKL was asked for as numba_cpu's BLAS (LOWRANK_BLAS=mkl) but cannot be loaded: {where}. "
                      f"Install it with: pip install \"lowrank[mkl]\" (x86-64 only), or set LOWRANK_BLAS=scipy")
