"""The on-disk cache of numba_cpu's kernels: Numba's, kept fresh against every file a kernel compiles.

Numba stamps a cached kernel with the source of its own file only, but a kernel also compiles code from
the package's other files (``vexp.exp``, the AVX2 intrinsics, ``config``'s flags), so an edit there left
the old machine code in use. ``KernelCache`` stamps each kernel with the content of all of them, so any
such edit recompiles; and it keys the serial and parallel compilations of one function apart (``pool.jit``),
which Numba's key (signature, CPU, bytecode) cannot tell from each other.

Where the compiled kernels go (``cache_dir()`` says which, once this module is imported): Numba's order,
the first writable of

    $NUMBA_CACHE_DIR                          when set
    kernels/numba_cpu/__pycache__             beside the installed sources (Numba's default)
    $XDG_CACHE_HOME/numba or ~/.cache/numba   the user's cache, when the install folder is read-only

and when none is writable (a read-only install and home), ``<temp dir>/lowrank-numba-<uid>``, a folder
only this user may write, so importing the kernels never fails for want of a cache.
"""
import functools
import hashlib
import inspect
import os
import stat
import tempfile
from pathlib import Path

import numba
from numba.core.caching import CacheImpl, FunctionCache, IndexDataCacheFile
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


def cache_dir() -> str:
    """The folder Numba caches this package's kernels in (found as Numba finds it, for a function of this file)."""
    for locator in CacheImpl._locator_classes:
        found = locator.from_function(cache_dir, inspect.getfile(cache_dir))
        if found is not None:
            return found.get_cache_path()
    raise RuntimeError("no writable folder for Numba's cache")


def _private_temp_dir() -> str:
    """``<temp dir>/lowrank-numba-<uid>``, created 0700; refused if another user owns it or may write to it
    (its files are machine code this process would run)."""
    path = os.path.join(tempfile.gettempdir(), f"lowrank-numba-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PermissionError(f"{path} is not a folder that only this user may write")
    return path


def _ensure_writable_cache():
    """Point Numba at a private temporary folder when neither its folder, the sources' nor the user's is writable."""
    try:
        cache_dir()
    except RuntimeError:
        try:
            numba.config.CACHE_DIR = _private_temp_dir()
        except OSError:
            pass                    # nowhere to write: the kernels' import says so (dispatch falls back to NumPy)


_ensure_writable_cache()
