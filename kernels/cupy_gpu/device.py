"""Device plumbing of cupy_gpu: compile and launch the CUDA kernels, cuBLAS GEMM, the shrink and
expand launchers, and the backend's one fallback (float64 runs in the reference, on the device).

Letters: N rows, D_in, D_out, r rank; a = the row's adapter: one adapter, or ``idx[n]`` (BGMV;
−1 = base only), gathered inside the kernels (``cuda/lora.cu``).
"""
import inspect

import cupy
import numpy as np

from .. import common, config, reference
from .launch import defines, expand_geometry, gemv_geometry, shrink_geometry, source_code, vectorizable

_modules: dict = {}


def kernel(source, name, dtype):
    """Kernel ``name_f32``/``name_f16`` of cupy_gpu/cuda/<source>.cu, compiled once per device and config."""
    key = (source, cupy.cuda.Device().id, defines())
    if key not in _modules:
        _modules[key] = cupy.RawModule(code=source_code(source), options=key[2])
    return _modules[key].get_function(f"{name}_{'f16' if dtype == np.float16 else 'f32'}")


def run_kernel(source, name, dtype, geometry, args):
    """Launch a kernel; an empty grid (N = 0 rows, say) launches nothing."""
    grid, block = geometry
    if all(grid):
        kernel(source, name, dtype)(grid, block, args)


def ptr(a):
    """A kernel pointer argument: the array, or a NULL pointer for None."""
    return np.uint64(0) if a is None else a


def gpu(**arrays):
    """TypeError unless every given array is a CuPy array; returns them C-contiguous, in order."""
    for name, a in arrays.items():
        if a is not None and not isinstance(a, cupy.ndarray):
            raise TypeError(f"cupy_gpu kernels take CuPy arrays; {name} is a {type(a).__module__}."
                            f"{type(a).__name__} (move the model with .to('gpu'))")
    return [None if a is None else cupy.ascontiguousarray(a) for a in arrays.values()]


def gemm(a, b, out, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
    """out = alpha·op(a) @ op(b) + beta·out (C-ordered) via cublasGemmEx, float32 accumulation."""
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas
    f64 = np.dtype(out.dtype) == np.float64
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


def shrink(x, mask, A, idx, scaling, scal, r):
    """h = s_a (x ⊙ mask) A_aᵀ (N, r); A is (r, D_in) or a stack (K, r, D_in) read through idx."""
    N, D_in = x.shape
    h = cupy.empty((N, r), x.dtype)
    if idx is None and mask is None and N >= config.CUPY_CUBLAS_SHRINK_MIN_N:
        return gemm(x, A.reshape(r, D_in), h, trans_b=True, alpha=scaling)     # (N, D_in) @ (D_in, r)
    vec = vectorizable([a.data.ptr for a in (x, mask, A) if a is not None], D_in, x.itemsize, 4 * x.itemsize)
    run_kernel("lora", "lora_shrink", x.dtype, shrink_geometry(N, r), (
        x, ptr(mask), A, ptr(idx), np.int64(r * D_in), np.float32(scaling), ptr(scal), h,
        np.int32(N), np.int32(D_in), np.int32(r), np.int32(vec)))
    return h


def expand(h, V, so, sj, idx, scaling, scal, mask, bias, out, beta):
    """out = beta·out + (s_a h V_aᵀ) ⊙ mask + b; V_a[o, j] at V + a·stride + o·so + j·sj."""
    N, D_out = out.shape
    r = h.shape[1]
    run_kernel("lora", "lora_expand", out.dtype, expand_geometry(N, D_out), (
        h, V, np.int64(so), np.int64(sj), ptr(idx), np.int64(r * D_out), np.float32(scaling), ptr(scal),
        ptr(mask), ptr(bias), out, np.int32(N), np.int32(D_out), np.int32(r), np.int32(beta)))
    return out


def base_plus_lora(x, W, h, B, idx, scaling, scal, bias, D_out):
    """y = x Wᵀ + s_a h B_aᵀ + b (N, D_out); W None: the LoRA term (+ b) alone; h None: x Wᵀ + b."""
    N, D_in = x.shape
    y = cupy.empty((N, D_out), x.dtype)
    if W is not None and N <= config.CUPY_GEMV_MAX_N:
        r = 0 if h is None else h.shape[1]
        vec = vectorizable((x.data.ptr, W.data.ptr), D_in, x.itemsize)
        run_kernel("lora", "lora_gemv", x.dtype, gemv_geometry(D_out), (
            x, W, ptr(h), ptr(B), ptr(idx), np.int64(r * D_out), np.float32(scaling), ptr(scal), ptr(bias),
            y, np.int32(N), np.int32(D_in), np.int32(D_out), np.int32(r), np.int32(vec)))
        return y
    if h is not None:
        expand(h, B, h.shape[1], 1, idx, scaling, scal, None, bias, y, 0)     # y = s h Bᵀ + b
    elif bias is not None:
        y[...] = bias
    return y if W is None else gemm(x, W, y, trans_b=True, beta=float(h is not None or bias is not None))


DEVICE_ARRAYS = ("x", "W", "A", "B", "bias", "mask", "dy", "h", "A_stack", "B_stack")


def _on_device(fn, args, kwargs):
    """TypeError unless the float arrays of a call (x, W, ... as named above) are CuPy arrays."""
    given = inspect.signature(fn).bind(*args, **kwargs).arguments
    gpu(**{n: given[n] for n in DEVICE_ARRAYS if n in given})


double_to_reference = common.fallback(np.float64, reference, check=_on_device)
"""Decorator of every dense/LoRA/BGMV/SGMV function here: float64 has no hand-written kernel,
so a float64 call (of CuPy arrays) runs ``reference``'s function of the same name on the device."""
