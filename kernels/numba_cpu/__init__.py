"""Numba CPU kernels: BLAS for the big products, in-place accumulation for the LoRA term.

The semantics are ``reference``'s, file for file (lora.py, multi.py, nf4.py, attention.py,
activations.py, norm.py); the files here say how they compute it. Backend-private: ``blas.py``
(the products, the float16 fallback), ``mkl.py`` (MKL as their BLAS), ``pool.py`` (the one thread
pool, SciPy's BLAS pinned to one thread), ``cache.py`` (the on-disk cache of compiled kernels),
``loops.py`` (the Numba loops of the rank-r parts), ``nf4_avx2.py`` (NF4 decode by AVX2 byte
shuffles), ``vexp.py`` (an e^x that vectorizes, for the softmax and SwiGLU loops).

The LoRA term s·h Bᵀ is added into the finished y = x Wᵀ by one more GEMM with beta = 1
(``blas.gemm_acc``), so it needs no (N, D_out) temporary and no separate add pass; the shrink
h = x Aᵀ is a BLAS call too (``python -m benchmarks.kernels`` sets this form against the unfused,
concatenated and merged ones). The loops of ``loops.py`` carry what BLAS cannot do in place: the
dropout mask folded into h, dA and dx without an (N, D_in) x ⊙ mask temporary, and the per-row
adapter gather of multi-adapter batches.

Threads: one pool for everything, Numba's (``pool.py``): the products are GEMM calls on it, each on a
single-threaded BLAS (``blas.matmul``: SciPy's OpenBLAS, or MKL where installed, ``mkl.py``), and the
loops' ``prange`` runs on it, so no second pool spins against it. Without a usable pool
(``config.NUMBA_PARALLEL`` off, one thread, Numba's 'workqueue' layer, a forked child) the products are
NumPy's (with MKL: the same GEMM calls on the calling thread) and the loops serial.

Inputs of any layout are accepted: BLAS takes transposed operands as they are, and the Numba loops
get ``np.ascontiguousarray`` copies (a no-op for C-ordered inputs).

Fallback, declared once (``blas.half_to_reference``): float16 has neither BLAS nor Numba
arithmetic here, so float16 dense/LoRA/BGMV/SGMV/attention/activation/norm calls run
the reference. NF4 and GGUF take float32/64.
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
