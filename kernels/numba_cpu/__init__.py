"""Numba CPU kernels: BLAS for the big products, in-place accumulation for the LoRA term.

The semantics are ``reference``'s, file for file (lora.py, multi.py, nf4.py, attention.py,
activations.py, norm.py); the files here say how they compute it. Backend-private: ``blas.py`` (GEMM calls, the float16 fallback),
``pool.py`` (the one thread pool, SciPy's BLAS pinned to one thread), ``loops.py`` (the Numba loops of the rank-r parts),
``nf4_avx2.py`` (NF4 decode by AVX2 byte shuffles), ``vexp.py`` (an e^x that vectorizes, for the softmax
and SwiGLU loops).

Which form of the LoRA term, measured (4096², r = 16, float32, adding s·h Bᵀ to a finished
y = x Wᵀ, medians; microbenchmark with 2 BLAS threads on the shared 2-core machine):

    N = 2048   GEMM with beta = 1 into y (``gemm_acc``)   3.7 ms   <- kept
               NumPy temporary + add (PEFT's unfused)    14.3 ms
               Numba row loop y[i] += (s h[i]) Bᵀ         17.7 ms (no reassociation: axpy per t)
               Numba row loop, reduction over r          28.6 ms
    N = 256    beta = 1: 0.52 ms, temporary + add: 0.94 ms, Numba loop: 1.42 ms

and in ``python -m benchmarks.kernels --threads 1`` (results/kernels.json, same shapes), the
whole LoRA work (h = x Aᵀ plus the beta = 1 GEMM) costs 0.8 % / 1.5 % / 2.1 % of the base
product at N = 1 / 256 / 2048, against 0.6 % / 2.3 % / 3.6 % for the NumPy temporary + add;
the fused forward / base medians are 1.012 / 1.025 / 1.002. The concatenated [x, h]·[W, s·B]ᵀ
form costs 1.6-5× the base, merged-per-step W + s·B·A 1.3-13×.
So the expand is one more BLAS call that writes into the base GEMM's output: no (N, D_out)
temporary and no separate add pass. The concatenated [W | s·B]·[x ; h] form must copy W every
step (B changes) and merged weights W + s·B·A cost a full (D_out, D_in) pass per change; both
are in the benchmark table for contrast. The shrink h = x Aᵀ is a BLAS call too (0.45 ms vs a
Numba dot loop's 1.8 ms at N = 256); the loops of ``loops.py`` carry what BLAS cannot do in
place: the dropout mask folded into h, dA and dx without an (N, D_in) x ⊙ mask temporary,
and the per-row adapter gather of multi-adapter batches.

Threads: one pool for everything, Numba's (``pool.py``): the products are GEMM tasks on it, each
on SciPy's single-threaded BLAS (``blas.matmul``), and the loops' ``prange`` runs on it, so no
second pool spins against it. Without a usable pool (``config.NUMBA_PARALLEL`` off, one thread,
Numba's 'workqueue' layer, a forked child) the products are NumPy's and the loops serial.

Inputs of any layout are accepted: BLAS takes strided/F-ordered operands, and the Numba loops
get ``np.ascontiguousarray`` copies (a no-op for C-ordered inputs).

Fallback, declared once (``blas.half_to_reference``): float16 has neither BLAS nor Numba
arithmetic here, so float16 dense/LoRA/BGMV/SGMV/attention/activation/norm calls run
the reference. NF4 takes float32/64.
"""
from ..api import API
from .activations import silu_and_mul, silu_and_mul_backward
from .attention import causal_softmax, causal_softmax_backward, matmul, rope_backward, rope_forward
from .loss import linear_cross_entropy
from .lora import dense_backward, dense_forward, lora_backward, lora_forward
from .multi import lora_backward_multi, lora_backward_sgmv, lora_forward_multi, lora_forward_sgmv
from .nf4 import nf4_dequantize, nf4_matmul, nf4_matmul_dx
from .norm import rms_norm, rms_norm_backward

__all__ = list(API)                        # the kernel API, listed once in lowrank.kernels.api
