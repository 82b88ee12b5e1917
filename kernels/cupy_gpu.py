"""CuPy GPU kernels: cuBLAS for the big product, hand-written CUDA for the rank-r parts.

Letters: N rows, D_in, D_out, r rank, K adapters. Same API and math as ``reference``:

    forward   h = s_a (x ⊙ mask) A_aᵀ                 shrink (cuBLAS from N >= CUBLAS_SHRINK_MIN_N,
                                                      single adapter without dropout)
              N <= GEMV_MAX_N:  y = x Wᵀ + s_a h B_aᵀ + b     one GEMV kernel: W is read once
              else:             y = s_a h B_aᵀ + b           expand (epilogue), writes y
                                y += x Wᵀ                    cuBLAS, beta = 1 (reads y in its epilogue)
    backward  dh = s·dy B,  dB = s·dyᵀ h,  dA = dhᵀ (x ⊙ mask)                   cuBLAS (alpha = s)
              dx = (dh A) ⊙ mask  (expand),  then  dx += dy W  (cuBLAS, beta = 1)

a = the row's adapter: one adapter, or ``index[n]`` (BGMV; −1 = base only), gathered inside
the kernels (``kernels/cuda/lora.cu``). SGMV segments are expanded to a per-row index. The
multi-adapter dA, dB are per-adapter cuBLAS products over that adapter's rows.

float16 and float32 run the CUDA kernels with float32 accumulation (cublasGemmEx with
CUBLAS_COMPUTE_32F: no TF32). float64 goes to ``reference`` explicitly (cuBLAS only, on the
GPU). Sources compile lazily (cupy.RawModule, NVRTC; CuPy picks ``-arch`` from the device)
with the block sizes of ``config`` as -D macros; importing this module touches no device.
"""
import numpy as np

try:
    import cupy
except ImportError as e:                         # dispatch reads ImportError as "backend unavailable"
    raise ImportError("lowrank.kernels.cupy_gpu needs CuPy: pip install 'lowrank[gpu]' "
                      "(cupy-cuda12x) on a machine with an NVIDIA GPU") from e

from . import config, reference, validate
from .cuda_launch import (defines, dequant_geometry, expand_geometry, gemv_geometry, shrink_geometry, source_code,
                          vectorizable)
from .reference_nf4 import NF4_CODE, check_nf4

_modules: dict = {}


# -- device plumbing ---------------------------------------------------------------------------------
def _kernel(source, name, dtype):
    """Kernel ``name_f32``/``name_f16`` of kernels/cuda/<source>.cu, compiled once per device and config."""
    key = (source, cupy.cuda.Device().id, defines())
    if key not in _modules:
        _modules[key] = cupy.RawModule(code=source_code(source), options=key[2])
    return _modules[key].get_function(f"{name}_{'f16' if dtype == np.float16 else 'f32'}")


def _launch(source, name, dtype, geometry, args):
    """Launch a kernel; an empty grid (N = 0 rows, say) launches nothing."""
    grid, block = geometry
    if all(grid):
        _kernel(source, name, dtype)(grid, block, args)


def _ptr(a):
    """A kernel pointer argument: the array, or a NULL pointer for None."""
    return np.uint64(0) if a is None else a


def _gpu(**arrays):
    """TypeError unless every given array is a CuPy array; returns them C-contiguous, in order."""
    for name, a in arrays.items():
        if a is not None and not isinstance(a, cupy.ndarray):
            raise TypeError(f"cupy_gpu kernels take CuPy arrays; {name} is a {type(a).__module__}."
                            f"{type(a).__name__} (move the model with .to('gpu'))")
    return [None if a is None else cupy.ascontiguousarray(a) for a in arrays.values()]


def _double(x):
    return np.dtype(x.dtype) == np.float64


def _gemm(a, b, out, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
    """out = alpha·op(a) @ op(b) + beta·out (C-ordered) via cublasGemmEx, float32 accumulation."""
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas
    f64 = _double(out)
    dt = {np.dtype(np.float16): runtime.CUDA_R_16F, np.dtype(np.float32): runtime.CUDA_R_32F,
          np.dtype(np.float64): runtime.CUDA_R_64F}[np.dtype(out.dtype)]
    n, m = out.shape                                # row-major out = op(a) op(b) is column-major
    k = a.shape[0] if trans_a else a.shape[1]       # outᵀ = op(b)ᵀ op(a)ᵀ: swap the operands
    al, be = (np.array(v, np.float64 if f64 else np.float32) for v in (alpha, beta))
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
    op = lambda t: cublas.CUBLAS_OP_T if t else cublas.CUBLAS_OP_N      # noqa: E731
    cublas.gemmEx(handle, op(trans_b), op(trans_a), m, n, k, al.ctypes.data, b.data.ptr, dt, b.shape[1],
                  a.data.ptr, dt, a.shape[1], be.ctypes.data, out.data.ptr, dt, m,
                  cublas.CUBLAS_COMPUTE_64F if f64 else cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT)
    return out


def _shrink(x, mask, A, idx, scaling, scal, r):
    """h = s_a (x ⊙ mask) A_aᵀ (N, r); A is (r, D_in) or a stack (K, r, D_in) read through idx."""
    N, D_in = x.shape
    h = cupy.empty((N, r), x.dtype)
    if idx is None and mask is None and N >= config.CUPY_CUBLAS_SHRINK_MIN_N:
        return _gemm(x, A.reshape(r, D_in), h, trans_b=True, alpha=scaling)     # (N, D_in) @ (D_in, r)
    vec = vectorizable([a.data.ptr for a in (x, mask, A) if a is not None], D_in, x.itemsize, 4 * x.itemsize)
    _launch("lora", "lora_shrink", x.dtype, shrink_geometry(N, r), (
        x, _ptr(mask), A, _ptr(idx), np.int64(r * D_in), np.float32(scaling), _ptr(scal), h,
        np.int32(N), np.int32(D_in), np.int32(r), np.int32(vec)))
    return h


def _expand(h, V, so, sj, idx, scaling, scal, mask, bias, out, beta):
    """out = beta·out + (s_a h V_aᵀ) ⊙ mask + b; V_a[o, j] at V + a·stride + o·so + j·sj."""
    N, D_out = out.shape
    r = h.shape[1]
    _launch("lora", "lora_expand", out.dtype, expand_geometry(N, D_out), (
        h, V, np.int64(so), np.int64(sj), _ptr(idx), np.int64(r * D_out), np.float32(scaling), _ptr(scal),
        _ptr(mask), _ptr(bias), out, np.int32(N), np.int32(D_out), np.int32(r), np.int32(beta)))
    return out


def _base_plus_lora(x, W, h, B, idx, scaling, scal, bias, D_out):
    """y = x Wᵀ + s_a h B_aᵀ + b (N, D_out); W None: the LoRA term (+ b) alone; h None: x Wᵀ + b."""
    N, D_in = x.shape
    y = cupy.empty((N, D_out), x.dtype)
    if W is not None and N <= config.CUPY_GEMV_MAX_N:
        r = 0 if h is None else h.shape[1]
        vec = vectorizable((x.data.ptr, W.data.ptr), D_in, x.itemsize)
        _launch("lora", "lora_gemv", x.dtype, gemv_geometry(D_out), (
            x, W, _ptr(h), _ptr(B), _ptr(idx), np.int64(r * D_out), np.float32(scaling), _ptr(scal), _ptr(bias),
            y, np.int32(N), np.int32(D_in), np.int32(D_out), np.int32(r), np.int32(vec)))
        return y
    if h is not None:
        _expand(h, B, h.shape[1], 1, idx, scaling, scal, None, bias, y, 0)     # y = s h Bᵀ + b
    elif bias is not None:
        y[...] = bias
    return y if W is None else _gemm(x, W, y, trans_b=True, beta=float(h is not None or bias is not None))


# -- the kernel API ------------------------------------------------------------------------------------
def dense_forward(x, W, bias=None):
    """y = x Wᵀ + b. x (N, D_in), W (D_out, D_in), bias (D_out,) -> y (N, D_out)."""
    N, D_in, D_out = validate.dense(x, W, bias)
    x, W, bias = _gpu(x=x, W=W, bias=bias)
    if _double(x):
        return reference.dense_forward(x, W, bias)
    return _base_plus_lora(x, W, None, None, None, 0.0, None, bias, D_out)


def dense_backward(dy, x, W, need_dx=True, need_dW=True, need_db=True):
    """(dx, dW, db) of y = x Wᵀ + b; each is None when not needed (a frozen W gets no dW).

    ``x`` may be None when ``need_dW`` is False: a frozen layer need not keep its input.
    """
    N, D_in, D_out = validate.dense_grad(dy, x, W, need_dW)
    dy, x, W = _gpu(dy=dy, x=x, W=W)
    if _double(dy):
        return reference.dense_backward(dy, x, W, need_dx, need_dW, need_db)
    dx = _gemm(dy, W, cupy.empty((N, D_in), dy.dtype)) if need_dx else None          # (N, D_out) @ (D_out, D_in)
    dW = _gemm(dy, x, cupy.empty((D_out, D_in), dy.dtype), trans_a=True) if need_dW else None  # dyᵀ x
    db = dy.sum(axis=0) if need_db else None                                          # (D_out,)
    return dx, dW, db


def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
    """y = x Wᵀ + b + s·(x⊙mask) Aᵀ Bᵀ -> (y (N, D_out), h (N, r)), h kept for backward."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, bias, mask)
    x, W, A, B, bias, mask = _gpu(x=x, W=W, A=A, B=B, bias=bias, mask=mask)
    if _double(x):
        return reference.lora_forward(x, W, A, B, scaling, bias, mask)
    h = _shrink(x, mask, A, None, 1.0, None, r)                                       # (N, r)
    return _base_plus_lora(x, W, h, B, None, float(scaling), None, bias, D_out), h


def lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
    """(dx, dA, dB) of lora_forward; dx is None when not needed. W=None: LoRA term only."""
    N, D_in, D_out, r = validate.lora(x, W, A, B, mask=mask, dy=dy, h=h)
    dy, x, h, W, A, B, mask = _gpu(dy=dy, x=x, h=h, W=W, A=A, B=B, mask=mask)
    if _double(dy):
        return reference.lora_backward(dy, x, h, W, A, B, scaling, need_dx, mask)
    s = float(scaling)
    dh = _gemm(dy, B, cupy.empty((N, r), dy.dtype), alpha=s)                          # (N, D_out) @ (D_out, r)
    dB = _gemm(dy, h, cupy.empty((D_out, r), dy.dtype), trans_a=True, alpha=s)        # (D_out, N) @ (N, r)
    xd = x if mask is None else x * mask
    dA = _gemm(dh, xd, cupy.empty((r, D_in), dy.dtype), trans_a=True)                 # (r, N) @ (N, D_in)
    if not need_dx:
        return None, dA, dB
    dx = _expand(dh, A, 1, D_in, None, 1.0, None, mask, None, cupy.empty((N, D_in), dy.dtype), 0)
    return (dx if W is None else _gemm(dy, W, dx, beta=1.0)), dA, dB                  # += (N, D_out) @ (D_out, D_in)


def _multi_args(index, scalings):
    """index as int64 and scalings as float32, on the device."""
    return cupy.asarray(index, dtype=cupy.int64), cupy.asarray(scalings, dtype=cupy.float32)


def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
    """Row i uses adapter index[i] (−1 = none). A_stack (K, r, D_in), B_stack (K, D_out, r).

    Returns y (N, D_out) and h (N, r), h = 0 on base-only rows. W x is computed once.
    """
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.index(index, N, K)
    x, W, A_stack, B_stack, bias = _gpu(x=x, W=W, A_stack=A_stack, B_stack=B_stack, bias=bias)
    if _double(x):
        return reference.lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias)
    idx, scal = _multi_args(index, scalings)
    h = _shrink(x, None, A_stack, idx, 1.0, None, r)                                  # (N, r), gathered A
    return _base_plus_lora(x, W, h, B_stack, idx, 0.0, scal, bias, D_out), h


def lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx=True):
    """(dx, dA_stack, dB_stack) of lora_forward_multi; unused adapters get zero gradients."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.index(index, N, K)
    dy, x, h, W, A_stack, B_stack = _gpu(dy=dy, x=x, h=h, W=W, A_stack=A_stack, B_stack=B_stack)
    if _double(dy):
        return reference.lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx)
    idx, scal = _multi_args(index, scalings)
    s_host = cupy.asnumpy(scal)                                                       # (K,) for cuBLAS alpha
    B_t = cupy.ascontiguousarray(B_stack.transpose(0, 2, 1))                          # (K, r, D_out)
    dh = _shrink(dy, None, B_t, idx, 0.0, scal, r)                                    # s_a dy B_a, gathered
    dA_stack, dB_stack = cupy.zeros_like(A_stack), cupy.zeros_like(B_stack)
    for k in reference._adapters_in(idx):
        rows = cupy.nonzero(idx == k)[0]
        dy_k, h_k, dh_k, x_k = dy[rows], h[rows], dh[rows], x[rows]
        _gemm(dy_k, h_k, dB_stack[k], trans_a=True, alpha=float(s_host[k]))           # (D_out, n) @ (n, r)
        _gemm(dh_k, x_k, dA_stack[k], trans_a=True)                                   # (r, n) @ (n, D_in)
    if not need_dx:
        return None, dA_stack, dB_stack
    dx = _expand(dh, A_stack, 1, D_in, idx, 1.0, None, None, None, cupy.empty((N, D_in), dy.dtype), 0)
    return _gemm(dy, W, dx, beta=1.0), dA_stack, dB_stack                             # dx += dy W


def lora_forward_sgmv(x, W, A_stack, B_stack, scalings, indptr, seg_index, bias=None):
    """Segmented multi-adapter forward: rows sorted by adapter, segment s = rows indptr[s]:indptr[s+1]."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, bias)
    validate.segments(indptr, seg_index, N, K)
    index = reference._segment_index(indptr, cupy.asarray(seg_index), N)
    return lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias)


def lora_backward_sgmv(dy, x, h, W, A_stack, B_stack, scalings, indptr, seg_index, need_dx=True):
    """(dx, dA_stack, dB_stack) of lora_forward_sgmv."""
    N, D_in, D_out, K, r = validate.multi(x, W, A_stack, B_stack, scalings, dy=dy, h=h)
    validate.segments(indptr, seg_index, N, K)
    index = reference._segment_index(indptr, cupy.asarray(seg_index), N)
    return lora_backward_multi(dy, x, h, W, A_stack, B_stack, scalings, index, need_dx)


# -- NF4 (QLoRA): W (D_out, D_in) stored as 4-bit codes, see reference_nf4 ----------------------------
def _nf4_operand(name, a, width, bias=None, width_bias=None):
    """reference_nf4.check_operand for the GPU, where float16 is allowed too."""
    if np.dtype(a.dtype) not in validate.FLOATS:
        raise TypeError(f"NF4: {name} must be float16/32/64, got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"NF4: {name} has shape {tuple(a.shape)}, expected (N, {width})")
    if bias is not None and (np.dtype(bias.dtype) != np.dtype(a.dtype) or tuple(bias.shape) != (width_bias,)):
        raise ValueError(f"NF4: bias must be {a.dtype} of shape ({width_bias},), got {bias.dtype} {tuple(bias.shape)}")


def nf4_dequantize(packed, absmax, shape, blocksize=64, dtype="float32"):
    """W (D_out, D_in) in ``dtype`` (float16/32: CUDA kernel; float64: exact, with CuPy ops)."""
    D_out, D_in = check_nf4(packed, absmax, shape, blocksize)
    packed, absmax = _gpu(packed=packed, absmax=absmax)
    dt = np.dtype(dtype)
    if dt not in validate.FLOATS:
        raise TypeError(f"NF4: dtype must be float16, float32 or float64, got {dt}")
    n = D_out * D_in
    if dt == np.float64:                               # code[q] · absmax in float64, as the reference
        k = cupy.arange(n)
        q = cupy.where((k & 1).astype(bool), packed[k >> 1] & 15, packed[k >> 1] >> 4)
        return (cupy.asarray(NF4_CODE, cupy.float64)[q] * absmax[k // blocksize]).reshape(D_out, D_in)
    W = cupy.empty((D_out, D_in), dt)
    _launch("nf4", "nf4_dequant", dt, dequant_geometry(n), (packed, absmax, W, np.int64(n), np.int32(blocksize)))
    return W


def nf4_matmul(x, packed, absmax, shape, blocksize=64, bias=None):
    """y = x·dequant(W)ᵀ + b (N, D_out); N <= GEMV_MAX_N reads the 4-bit codes directly (NF4 GEMV)."""
    D_out, D_in = check_nf4(packed, absmax, shape, blocksize)
    _nf4_operand("x", x, D_in, bias, D_out)
    x, packed, absmax, bias = _gpu(x=x, packed=packed, absmax=absmax, bias=bias)
    N = x.shape[0]
    if _double(x) or N > config.CUPY_GEMV_MAX_N:       # dequantize once, then cuBLAS
        return dense_forward(x, nf4_dequantize(packed, absmax, shape, blocksize, x.dtype), bias)
    y = cupy.empty((N, D_out), x.dtype)
    vec = D_in % 8 == 0 and blocksize % 8 == 0 and packed.data.ptr % 4 == 0     # 8 codes = 4 aligned bytes
    _launch("nf4", "nf4_gemv", x.dtype, gemv_geometry(D_out), (
        x, packed, absmax, _ptr(bias), y, np.int32(N), np.int32(D_in), np.int32(D_out), np.int32(blocksize),
        np.int32(vec)))
    return y


def nf4_matmul_dx(dy, packed, absmax, shape, blocksize=64):
    """dx = dy·dequant(W) (N, D_in): dequantize, then cuBLAS (W is frozen: no dW)."""
    D_out, D_in = check_nf4(packed, absmax, shape, blocksize)
    _nf4_operand("dy", dy, D_out)
    W = nf4_dequantize(packed, absmax, shape, blocksize, dy.dtype)
    return dense_backward(dy, None, W, need_dx=True, need_dW=False, need_db=False)[0]
