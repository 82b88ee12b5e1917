"""The kernel API: the functions every backend exposes, and the files they live in.

    reference/  NumPy, the readable definition every other backend is tested against
    numba_cpu/  Numba CPU kernels (BLAS for the big product, loops for the rank-r parts)
    cupy_gpu/   CuPy: cuBLAS for the big product, hand-written CUDA where it pays

    each backend   lora.py (dense, one adapter)  multi.py (BGMV, SGMV)  nf4.py (4-bit W)
                   gguf.py (W in llama.cpp's blocks: Q8_0, Q4_0, Q4_1, Q4_K; Q5_0, Q5_1, Q5_K, Q6_K by the reference;
                           gguf_matmul_q8, llama.cpp's arithmetic: x rounded to Q8_0 first)
                   attention.py (batched products, RoPE, causal softmax; causal_attention: inference's, one call)
                   activations.py (SwiGLU's gate)  norm.py (RMSNorm)
                   loss.py (the LM head and cross-entropy, fused)
    shared         validate.py (input checks)  config.py (tunables, tolerances)  common.py (helpers)
    your own       backends.py (register_backend, describe), conformance.py (the public test suite)

Every backend package exposes the functions of ``API`` with the signatures of ``reference``, each
in the file of the same name (tests check both). The reference states each equation once (a
``Semantics:`` line per function); the other backends say how they compute it. Kernels are pure
functions on arrays; they never import lowrank.

This folder is the package ``lowrank.kernels`` (a namespace package: it has no ``__init__.py``, so
that a checkout's root never shadows another distribution's top-level ``kernels``).
"""
if __name__ != "lowrank.kernels.api":
    raise ImportError(f"kernels/ is the package lowrank.kernels, imported here as {__name__!r}: "
                      f"import lowrank.kernels.api instead")

API = (
    "dense_forward", "dense_backward",
    "lora_forward", "lora_backward",
    "lora_forward_multi", "lora_backward_multi",
    "lora_forward_sgmv", "lora_backward_sgmv",
    "nf4_dequantize", "nf4_matmul", "nf4_matmul_dx",
    "gguf_dequantize", "gguf_matmul", "gguf_matmul_dx", "gguf_matmul_q8",
    "matmul", "rope_forward", "rope_backward", "causal_softmax", "causal_softmax_backward",
    "causal_attention", "silu_and_mul", "silu_and_mul_backward", "rms_norm", "rms_norm_backward",
    "linear_cross_entropy",
)

FILES = ("lora", "multi", "nf4", "gguf", "attention", "activations", "norm", "loss")   # the files of every backend folder, API split among them

FLOATS = ("float16", "float32", "float64")
