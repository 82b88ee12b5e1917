"""CuPy NF4 (QLoRA) kernels: ``reference/nf4.py``'s semantics and layout (the equations are there).

float16/32: the dequantize and GEMV kernels of ``cuda/nf4.cu`` (float accumulation); float64:
exact CuPy ops and cuBLAS. Unlike the CPU backends, float16 operands are accepted.
"""
import cupy
import numpy as np

from .. import config, validate
from ..common import NF4_CODE
from .device import gpu, ptr, run_kernel
from .launch import dequant_geometry, gemv_geometry
from .lora import dense_backward, dense_forward


# -- NF4 (QLoRA): a 4-bit frozen W ----------------------------------------------------------
def nf4_dequantize(packed, absmax, shape, blocksize=64, dtype="float32"):
    """float16/32: the dequantize kernel, one byte (two elements) per thread; float64: exact, with CuPy ops."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    packed, absmax = gpu(packed=packed, absmax=absmax)
    dt = np.dtype(dtype)
    if dt not in validate.FLOATS:
        raise TypeError(f"NF4: dtype must be float16, float32 or float64, got {dt}")
    n = D_out * D_in
    if dt == np.float64:                               # code[q] · absmax in float64, as the reference
        k = cupy.arange(n)
        q = cupy.where((k & 1).astype(bool), packed[k >> 1] & 15, packed[k >> 1] >> 4)
        return (cupy.asarray(NF4_CODE, cupy.float64)[q] * absmax[k // blocksize]).reshape(D_out, D_in)
    W = cupy.empty((D_out, D_in), dt)
    run_kernel("nf4", "nf4_dequant", dt, dequant_geometry(n), (packed, absmax, W, np.int64(n), np.int32(blocksize)))
    return W


def nf4_matmul(x, packed, absmax, shape, blocksize=64, bias=None):
    """N <= GEMV_MAX_N: the NF4 GEMV kernel reads the 4-bit codes directly; else dequantize once, then cuBLAS."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    validate.nf4_operand("x", x, D_in, bias, D_out, dtypes=validate.FLOATS)
    x, packed, absmax, bias = gpu(x=x, packed=packed, absmax=absmax, bias=bias)
    N = x.shape[0]
    if np.dtype(x.dtype) == np.float64 or N > config.CUPY_GEMV_MAX_N:
        return dense_forward(x, nf4_dequantize(packed, absmax, shape, blocksize, x.dtype), bias)
    y = cupy.empty((N, D_out), x.dtype)
    vec = D_in % 8 == 0 and blocksize % 8 == 0 and packed.data.ptr % 4 == 0     # 8 codes = 4 aligned bytes
    run_kernel("nf4", "nf4_gemv", x.dtype, gemv_geometry(D_out), (
        x, packed, absmax, ptr(bias), y, np.int32(N), np.int32(D_in), np.int32(D_out), np.int32(blocksize),
        np.int32(vec)))
    return y


def nf4_matmul_dx(dy, packed, absmax, shape, blocksize=64):
    """Dequantize, then cuBLAS."""
    D_out, D_in = validate.nf4(packed, absmax, shape, blocksize)
    validate.nf4_operand("dy", dy, D_out, dtypes=validate.FLOATS)
    W = nf4_dequantize(packed, absmax, shape, blocksize, dy.dtype)
    return dense_backward(dy, None, W, need_dx=True, need_dW=False, need_db=False)[0]
