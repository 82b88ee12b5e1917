"""NumPy reference kernels: the definition every other backend must reproduce.

Letters: N rows, D_in, D_out, r rank, K adapters. Row-major activations.

    W (D_out, D_in) frozen, A = lora_A (r, D_in), B = lora_B (D_out, r), s = scaling

    lora.py   dense and single-adapter LoRA, forward and backward
    multi.py  multi-adapter batches: BGMV (a per-row index) and SGMV (sorted segments)
    nf4.py    products with a 4-bit (NF4) frozen W
    gguf.py   products with a frozen W in llama.cpp's GGUF blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
    attention.py  RoPE and the causal softmax, the elementwise parts of attention
    activations.py  SwiGLU's gate, silu(g) ⊙ u
    norm.py   RMSNorm
    loss.py   the LM head and cross-entropy, fused, without the (N, V) logits

Each function opens with a one-line ``Semantics:``, the equation every backend computes; the
other backends' files of the same names say only how they compute it. These functions also
run on CuPy arrays (the cupy_gpu backend sends float64 here).
"""
from ..api import API
from .activations import silu_and_mul, silu_and_mul_backward
from .attention import causal_attention, causal_softmax, causal_softmax_backward, matmul, rope_backward, rope_forward
from .loss import linear_cross_entropy
from .lora import dense_backward, dense_forward, lora_backward, lora_forward
from .multi import lora_backward_multi, lora_backward_sgmv, lora_forward_multi, lora_forward_sgmv
from .gguf import gguf_dequantize, gguf_matmul, gguf_matmul_dx, gguf_matmul_q8
from .nf4 import nf4_dequantize, nf4_matmul, nf4_matmul_dx
from .norm import rms_norm, rms_norm_backward

__all__ = list(API)                        # the kernel API, listed once in lowrank.kernels.api
