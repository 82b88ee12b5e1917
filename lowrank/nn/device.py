"""The one module that owns the NumPy/CuPy choice.

Library code asks ``xp = get_array_module(x)`` and writes its math once on ``xp``.
Nothing else in lowrank imports cupy; importing lowrank never touches a GPU.
"""
from __future__ import annotations

import numpy as np

_cupy = None          # the cupy module once imported, False when unavailable


def cupy_module():
    """The cupy module, or None when cupy is not installed or no GPU is usable."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
            _cupy = cupy if cupy.is_available() else False
        except Exception:                   # ImportError, or a CUDA driver error
            _cupy = False
    return _cupy or None


def is_cupy_array(x) -> bool:
    """True for a cupy.ndarray, without importing cupy when it was never loaded."""
    return type(x).__module__.startswith("cupy")


def get_array_module(*arrays):
    """numpy, or cupy when any of ``arrays`` lives on the GPU."""
    for a in arrays:
        if is_cupy_array(a):
            return cupy_module()
    return np


def device_of(x) -> str:
    """'gpu' for a CuPy array, 'cpu' otherwise."""
    return "gpu" if is_cupy_array(x) else "cpu"


def to_device(x, device: str):
    """Copy ``x`` to ``device`` ('cpu' or 'gpu'); a no-op when it is already there."""
    if device == "cpu":
        return x.get() if is_cupy_array(x) else x
    if device == "gpu":
        cp = cupy_module()
        if cp is None:
            raise RuntimeError("to('gpu'): no usable CuPy/CUDA device; install lowrank[gpu] on a GPU machine")
        return cp.asarray(x)
    raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")


def erf(x):
    """Elementwise error function on NumPy or CuPy arrays (for the exact GELU)."""
    if is_cupy_array(x):
        from cupyx.scipy.special import erf as _erf
    else:
        from scipy.special import erf as _erf
    return _erf(x)


FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
