"""The on-disk cache of numba_cpu's kernels: Numba's, kept fresh against every file a kernel compiles.

Numba stamps a cached kernel with the source of its own file only, but a kernel also compiles code from
the package's other files (``vexp.exp``, the AVX2 intrinsics, ``config``'s flags), so an edit there left
the old machine code in use. ``KernelCache`` stamps each kernel with the content of all of them, so any
such edit recompiles; and it keys the serial and parallel compilations of one function apart (``pool.jit``),
which Numba's key (signature, CPU, bytecode) cannot tell from each other.
"""
import functools
import hashlib
from pathlib import Path

from numba.core.caching import FunctionCache, IndexDataCacheFile
from numba.core.dispatcher import Dispatcher

_HERE = Path(__file__).resolve().parent
SOURCES = (_HERE, _HERE.parent / "config.py", _HERE.parent / "common.py")   # this folder's files, and two shared


@functools.lru_cache(maxsize=None)
def sources_digest() -> str:
    """SHA-256 over the name and content of every file of ``SOURCES``, in a fixed order."""
    h = hashlib.sha256()
    for path in sorted(p for s in SOURCES for p in (s.glob("*.py") if s.is_dir() else [s])):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


class KernelCache(FunctionCache):
    """Numba's function cache, its index stamped with ``sources_digest()`` and its entries keyed on ``parallel``."""

    def __init__(self, py_func, parallel: bool):
        self._parallel = bool(parallel)
        super().__init__(py_func)
        stamp = (self._impl.locator.get_source_stamp(), sources_digest())
        self._cache_file = IndexDataCacheFile(self._cache_path, self._impl.filename_base, stamp)

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (self._parallel,)


def enable(kernel, parallel: bool):
    """Give a Numba dispatcher a ``KernelCache`` (what ``cache=True`` does with Numba's own); returns it.
    Under NUMBA_DISABLE_JIT the "kernel" is the Python function, and nothing is cached."""
    if isinstance(kernel, Dispatcher):
        kernel._cache = KernelCache(kernel.py_func, parallel)
    return kernel
