"""The one dispatch point between layers and kernels.

Layers call ``kernels_for(x, layer.backend)`` and get a module with the kernel API
(``lowrank.kernels.api.API``). The backend is chosen per layer (``layer.backend``), else
globally (``set_backend``), else automatically: the fastest available for the
input's device (Numba on the CPU when importable, CuPy on the GPU). When Numba fails to
import, 'auto' runs the NumPy reference and says so once, with a RuntimeWarning.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

from ..kernels import backends as kernels
from .device import is_cupy_array

BACKENDS = ("auto", *kernels.MODULES)          # "auto", then the built-in ones: numpy, numba, cupy
_default = "auto"
_loaded: dict = {}          # backend name -> kernel module, or the ImportError that kept it out
_warned: set = set()        # backends whose absence 'auto' has already warned about


def _check(name):
    if name not in BACKENDS and not kernels.is_backend(name):        # registered or installed ones too
        raise ValueError(f"backend must be one of {BACKENDS} or a name registered with "
                         f"lowrank.register_backend {tuple(kernels.registered())}, got {name!r}")


def set_backend(name: str):
    """Set the global kernel backend ('auto', 'numpy', 'numba', 'cupy' or a registered name)."""
    global _default
    _check(name)
    _default = name


def get_backend() -> str:
    return _default


@contextmanager
def use_backend(name: str):
    """Temporarily set the global backend: ``with use_backend("numpy"): ...``."""
    old = _default
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def available(name: str) -> bool:
    """True when backend ``name`` can be loaded on this machine."""
    try:
        _load(name)
        return True
    except ImportError:
        return False


def _load(name):
    if name not in kernels.MODULES:               # a registered backend: the registry holds it
        return kernels.load(name)
    if name not in _loaded:
        try:
            _loaded[name] = kernels.load(name)
        except ImportError as e:
            _loaded[name] = e
    if isinstance(_loaded[name], ImportError):
        raise ImportError(f"kernel backend {name!r} is not available here: {_loaded[name]}") from _loaded[name]
    return _loaded[name]


def _cpu_auto():
    """'auto' on the CPU: numba, else numpy with a RuntimeWarning (once) naming why numba is missing."""
    if available("numba"):
        return "numba"
    if "numba" not in _warned:
        _warned.add("numba")
        warnings.warn(f"lowrank: the Numba kernels failed to load ({_loaded['numba']!r}), so every CPU kernel "
                      f"runs on the NumPy reference, without the fused Numba kernels: slower. Fix what the error "
                      f"names (the Numba install, or LOWRANK_BLAS), or set_backend('numpy') to choose this.",
                      RuntimeWarning, stacklevel=3)
    return "numpy"


def kernels_for(x, backend: str | None = None):
    """The kernel module for array ``x`` under ``backend`` (None = the global setting)."""
    name = backend or _default
    if type(x) is np.ndarray and name != "cupy":     # a host array, a CPU backend loaded before: every call of a
        module = _loaded.get("numba" if name == "auto" else name)      # decode step, so one lookup
        if module is not None and not isinstance(module, ImportError):
            return module
    _check(name)
    on_gpu = is_cupy_array(x)
    if name == "auto":
        name = "cupy" if on_gpu else _cpu_auto()
    elif on_gpu and name == "numba":
        raise ValueError("backend 'numba' runs on the CPU; this input is a CuPy array (use 'cupy' or 'auto')")
    elif not on_gpu and name == "cupy":
        raise ValueError("backend 'cupy' needs CuPy arrays; move the model with .to('gpu') first")
    return _load(name)
