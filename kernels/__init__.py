"""Kernels for the fused LoRA path, one module per backend, the same API in each.

    reference  NumPy, the readable definition every other backend is tested against
    numba_cpu  Numba CPU kernels (BLAS for the big product, loops for the rank-r parts)
    cupy_gpu   CuPy: cuBLAS for the big product, hand-written CUDA where it pays

Every backend module exposes the functions listed in ``API`` with the signatures of
``reference`` (tests check this with ``inspect.signature``). Kernels are pure functions
on arrays; they never import lowrank. Installed as ``lowrank.kernels``.
"""
from importlib import import_module

API = (
    "dense_forward", "dense_backward",
    "lora_forward", "lora_backward",
    "lora_forward_multi", "lora_backward_multi",
    "lora_forward_sgmv", "lora_backward_sgmv",
    "nf4_dequantize", "nf4_matmul", "nf4_matmul_dx",
)

MODULES = {"numpy": "reference", "numba": "numba_cpu", "cupy": "cupy_gpu"}


def load(backend: str):
    """The kernel module for ``backend`` ('numpy', 'numba' or 'cupy'); ImportError if unavailable."""
    if backend not in MODULES:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {sorted(MODULES)}")
    return import_module(f"{__name__}.{MODULES[backend]}")
