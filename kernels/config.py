"""The one place for kernel tunables and the tolerances the tests hold kernels to.

Tests shrink block sizes here so that tiny inputs cross block borders.
Each backend reads its own section; nothing else hard-codes these numbers.
"""
import os

# --- tolerances: every backend vs the NumPy reference (O(1) data) -------------------
RTOL = {"float16": 1e-2, "float32": 1e-5, "float64": 1e-12}
ATOL = {"float16": 1e-2, "float32": 1e-5, "float64": 1e-12}

# --- numba_cpu ------------------------------------------------------------------------
# The fastmath flags of every Numba kernel: LLVM may reorder sums (vectorized dot products) and fuse
# multiply-adds, nothing more, so that a NaN or Inf in the input comes out as IEEE says
# (tests/kernels/test_nf4_nonfinite.py): "nnan"/"ninf" would let it assume there is none, "nsz"/"arcp" may flip
# the sign of a zero and so of an Inf divided by it.
NUMBA_FASTMATH = {"reassoc", "contract"}
# The error model of the loops that divide: IEEE (x / 0 = ±inf or NaN, as NumPy gives), because Numba's
# default checks every division for a zero, a branch that keeps LLVM from vectorizing the loop.
NUMBA_ERROR_MODEL = "numpy"
# The softmax and SwiGLU loops compute e^x with numba_cpu/vexp.py's exp, which vectorizes with them;
# False: Numba's np.exp, a scalar libm call per element (a change recompiles; tests cover both).
NUMBA_VEXP = True
# One thread pool for numba_cpu's products and loops, Numba's (numba_cpu/pool.py says when it is usable);
# off: NumPy's BLAS threads for the products and serial loops. All or nothing, because NumPy's BLAS threads
# spin after each product and a Numba parallel loop started then fights them for the cores.
NUMBA_PARALLEL = True
# The loops run on that pool too (pool.jit's parallel compilation of each); False: only the products do.
NUMBA_POOL_LOOPS = True
# Products with fewer multiply-adds in all than this are NumPy's (one thread), and a product with fewer per
# thread is one task, not cut in blocks: below it, a call into Numba and its planning cost more than BLAS.
NUMBA_POOL_MIN_MACS = 1 << 16
# A loop whose first array has fewer elements than this runs serial (pool.jit): waking the pool's threads
# costs more than the work.
NUMBA_POOL_MIN_ELEMENTS = 1 << 14
# x Wᵀ with N <= this many rows of x streams W once (each W row read once, dotted with every row of x while it
# is in cache) instead of BLAS, whose GEMM packs W first: float32 by numba_cpu/gemv.py, float64 (and float32
# with NUMBA_GEMV_IR off) from 2 rows by numba_cpu/small_m.py; 0 turns both off. Set from benchmarks/decode.py:
# above it, BLAS's GEMM is the faster (results beside that benchmark).
NUMBA_SMALL_M = 32
NUMBA_GEMV_IR = True      # numba: float32's few-row products by numba_cpu/gemv.py's prefetching IR; False: small_m
# The BLAS of those tasks: 'mkl' (the `mkl` wheel, numba_cpu/mkl.py), 'scipy' (the OpenBLAS SciPy bundles) or
# 'auto' (MKL when installed); read once, when numba_cpu is imported, from the environment variable LOWRANK_BLAS.
# With MKL, one thread's products are tasks too (NumPy's BLAS is OpenBLAS).
NUMBA_BLAS = os.environ.get("LOWRANK_BLAS", "auto")
# columns per block in the gradient accumulation kernel (threads own disjoint column blocks)
NUMBA_COL_BLOCK = 512
# Threads of the BLAS that SciPy bundles, numba_cpu's own (the in-place rank-r GEMMs, and the pool's GEMM
# tasks); 1, so that it never starts threads of its own: the pool supplies them (pool.pin_scipy_blas).
SCIPY_BLAS_THREADS = 1

# --- cupy_gpu -------------------------------------------------------------------------
# CUDA block sizes, passed to kernels/cupy_gpu/cuda/*.cu as -D macros (a change recompiles).
CUPY_SHRINK_ROWS = 4        # rows of x per shrink block (h = x Aᵀ)
CUPY_SHRINK_RANKS = 16      # ranks per shrink block (grid.y covers r in chunks of this)
CUPY_SHRINK_THREADS = 256   # threads per shrink block (a multiple of 32)
CUPY_EXPAND_ROWS = 8        # rows per expand/epilogue block (y = s·h Bᵀ + b); B is reused across them
CUPY_EXPAND_THREADS = 256   # outputs per expand block, one per thread
CUPY_GEMV_ROWS = 4          # rows of x a GEMV warp keeps in registers per pass over W
CUPY_GEMV_WARPS = 8         # output rows per GEMV block, one warp each
CUPY_NF4_THREADS = 256      # threads per NF4 dequantize block, two elements each
# Which path: N <= GEMV_MAX_N runs the hand-written GEMV (memory-bound: W read once per
# GEMV_ROWS rows); larger N runs cuBLAS with beta = 1 accumulation onto the epilogue's output.
CUPY_GEMV_MAX_N = 4
# A single adapter without dropout uses cuBLAS for the shrink from this many rows on.
CUPY_CUBLAS_SHRINK_MIN_N = 256

# --- NF4 (QLoRA) ----------------------------------------------------------------------
NF4_TILE_ROWS = 256       # output rows of W dequantized at a time by nf4_matmul / nf4_matmul_dx:
                          # the full float W never exists; 256 x 4096 float32 = 4 MiB per tile
NF4_POOL_TILE_ROWS = 1024 # numba, on its thread pool: each tile's product is cut over the threads, and each
                          # thread reads the other operand whole, so bigger tiles pay (16 MiB at D_in = 4096)
NF4_GEMV_MAX_N = 1        # numba: nf4_matmul with N <= this uses the fused dequant-GEMV (reads 4-bit
                          # codes directly); larger N dequantizes a tile and calls BLAS
NF4_AVX2 = True           # numba: that GEMV decodes codes with AVX2 byte shuffles (nf4_avx2) where the CPU,
                          # dtype and layout allow; False keeps the portable kernels (tests cover both)
GGUF_Q8_MAX_N = 4          # numba: gguf_matmul_q8 with N <= this runs the VNNI GEMV per row of x, else tiles
GGUF_VECTOR_IR = True     # numba: float32 Q8_0/Q4_0/Q4_1 GEMV and tiles decoded by LLVM vector IR (numba_cpu/gguf.py;
                          # vpermps on AVX-512); False keeps the Numba loops (tests cover both)

# --- the LM head and cross-entropy (linear_cross_entropy) ---------------------------------
LOSS_CHUNK_ROWS = 256     # rows of logits that exist at once: 256 x 49,152 float32 = 48 MiB, never (N, V)
