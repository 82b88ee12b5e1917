"""CuPy GPU kernels: cuBLAS for the big products, hand-written CUDA for the rank-r parts.

The semantics are ``reference``'s, file for file (lora.py, multi.py, nf4.py); the files here
say how they compute it. Backend-private: ``device.py`` (compile, launch, cuBLAS GEMM, the
shrink/expand launchers, the float64 fallback), ``launch.py`` (compile options and launch
geometry: pure Python, tested without a GPU), ``cuda/*.cu`` (the kernels).

float16 and float32 run the CUDA kernels with float32 accumulation (cublasGemmEx with
CUBLAS_COMPUTE_32F: no TF32). Fallback, declared once (``device.double_to_reference``):
float64 dense/LoRA/BGMV/SGMV calls run the reference on the device (cuBLAS only). Sources
compile lazily (cupy.RawModule, NVRTC; CuPy picks ``-arch`` from the device) with the block
sizes of ``config`` as -D macros; importing this package touches no device.
"""
try:
    import cupy  # noqa: F401
except ImportError as e:                         # dispatch reads ImportError as "backend unavailable"
    raise ImportError("lowrank.kernels.cupy_gpu needs CuPy: pip install 'lowrank[gpu]' "
                      "(cupy-cuda12x) on a machine with an NVIDIA GPU") from e

from ..api import API  # noqa: E402
from .activations import silu_and_mul, silu_and_mul_backward  # noqa: E402
from .attention import (causal_attention, causal_softmax, causal_softmax_backward, matmul,  # noqa: E402
                        rope_backward, rope_forward)
from .loss import linear_cross_entropy  # noqa: E402
from .lora import dense_backward, dense_forward, lora_backward, lora_forward  # noqa: E402
from .multi import lora_backward_multi, lora_backward_sgmv, lora_forward_multi, lora_forward_sgmv  # noqa: E402
from .gguf import gguf_dequantize, gguf_matmul, gguf_matmul_dx, gguf_matmul_q8  # noqa: E402
from .nf4 import nf4_dequantize, nf4_matmul, nf4_matmul_dx  # noqa: E402
from .norm import rms_norm, rms_norm_backward  # noqa: E402

__all__ = list(API)                        # the kernel API, listed once in lowrank.kernels.api
