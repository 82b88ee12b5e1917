"""Compile options and launch geometry of the CUDA kernels: pure Python, no CuPy, no device.

``device.py`` launches with these. ``defines()`` is the only source of the CUDA sources' block
sizes (they hold no defaults); the tests evaluate the kernels' own index helpers (cuda/common.cu)
over these grids on machines without a GPU, with block sizes shrunk through ``config``. This file
imports no CuPy, so tests load it on its own where the package (which needs CuPy) can't import.
"""
from pathlib import Path

from .. import config

CUDA_DIR = Path(__file__).parent / "cuda"
MACROS = ("SHRINK_ROWS", "SHRINK_RANKS", "SHRINK_THREADS", "EXPAND_ROWS", "EXPAND_THREADS",
          "GEMV_ROWS", "GEMV_WARPS", "NF4_THREADS")
MAX_GRID_Y = 65535


def defines():
    """The -D options of the CUDA sources, read from ``config`` now (tests shrink them)."""
    return tuple(f"-D{m}={int(getattr(config, 'CUPY_' + m))}" for m in MACROS)


def cdiv(a, b):
    return -(-a // b)


def shrink_geometry(N, r):
    """(grid, block) of lora_shrink: SHRINK_ROWS rows × SHRINK_RANKS ranks per block."""
    gy = cdiv(r, config.CUPY_SHRINK_RANKS)
    if gy > MAX_GRID_Y:
        raise ValueError(f"cupy_gpu shrink: r={r} needs {gy} blocks along y, more than {MAX_GRID_Y}")
    return (cdiv(N, config.CUPY_SHRINK_ROWS), gy, 1), (config.CUPY_SHRINK_THREADS, 1, 1)


def expand_geometry(N, D_out):
    """(grid, block) of lora_expand: EXPAND_THREADS outputs × EXPAND_ROWS rows per block."""
    gy = cdiv(N, config.CUPY_EXPAND_ROWS)
    if gy > MAX_GRID_Y:
        raise ValueError(f"cupy_gpu expand: N={N} needs {gy} blocks along y, more than {MAX_GRID_Y}; "
                         f"raise config.CUPY_EXPAND_ROWS")
    return (cdiv(D_out, config.CUPY_EXPAND_THREADS), gy, 1), (config.CUPY_EXPAND_THREADS, 1, 1)


def gemv_geometry(D_out):
    """(grid, block) of the GEMV kernels: one warp per output row."""
    return (cdiv(D_out, config.CUPY_GEMV_WARPS), 1, 1), (32 * config.CUPY_GEMV_WARPS, 1, 1)


def dequant_geometry(numel):
    """(grid, block) of nf4_dequant: two elements (one byte) per thread."""
    return (cdiv(cdiv(numel, 2), config.CUPY_NF4_THREADS), 1, 1), (config.CUPY_NF4_THREADS, 1, 1)


def vectorizable(ptrs, D_in, itemsize, width=16):
    """True when rows of length D_in starting at these addresses allow ``width``-byte loads."""
    return D_in % (width // itemsize) == 0 and all(p % width == 0 for p in ptrs)


def source_code(source):
    """cupy_gpu/cuda/<source>.cu with common.cu inlined (so CuPy's compile cache sees every line)."""
    common = (CUDA_DIR / "common.cu").read_text()
    return (CUDA_DIR / f"{source}.cu").read_text().replace('#include "common.cu"', common)
