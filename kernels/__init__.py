"""Kernels for the fused LoRA path, one folder per backend, the same files in each.

    reference/  NumPy, the readable definition every other backend is tested against
    numba_cpu/  Numba CPU kernels (BLAS for the big product, loops for the rank-r parts)
    cupy_gpu/   CuPy: cuBLAS for the big product, hand-written CUDA where it pays

    each backend   lora.py (dense, one adapter)  multi.py (BGMV, SGMV)  nf4.py (4-bit W)
    shared         validate.py (input checks)  config.py (tunables, tolerances)  common.py (helpers)

Every backend package exposes the functions listed in ``API`` with the signatures of
``reference``, each in the file of the same name (tests check both). The reference states
each equation once (a ``Semantics:`` line per function); the other backends say how they
compute it. Kernels are pure functions on arrays; they never import lowrank. Installed as
``lowrank.kernels``.
"""
from importlib import import_module

API = (
    "dense_forward", "dense_backward",
    "lora_forward", "lora_backward",
    "lora_forward_multi", "lora_backward_multi",
    "lora_forward_sgmv", "lora_backward_sgmv",
    "nf4_dequantize", "nf4_matmul", "nf4_matmul_dx",
)

FILES = ("lora", "multi", "nf4")              # the files of every backend folder, API split among them

MODULES = {"numpy": "reference", "numba": "numba_cpu", "cupy": "cupy_gpu"}


def load(backend: str):
    """The kernel package for ``backend`` ('numpy', 'numba' or 'cupy'); ImportError if unavailable."""
    if backend not in MODULES:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {sorted(MODULES)}")
    return import_module(f"{__name__}.{MODULES[backend]}")
