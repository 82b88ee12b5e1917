"""CuPy GGUF kernels: ``reference/gguf.py``'s semantics and block layouts (the equations are there).

No hand-written CUDA here yet: the reference's array code runs on the device (the block decode as
CuPy elementwise ops, the tile products on cuBLAS), float32/64 as on the CPU. A GEMV kernel that
reads the blocks directly is the next step, once a GPU can measure it against this.
"""
from .. import reference
from .device import gpu


# -- GGUF: a frozen W in llama.cpp's quantized blocks -----------------------------------------
def gguf_dequantize(blocks, qtype, shape, dtype="float32"):
    """The reference's decode on the device."""
    (blocks,) = gpu(blocks=blocks)
    return reference.gguf_dequantize(blocks, qtype, shape, dtype)


def gguf_matmul(x, blocks, qtype, shape, bias=None):
    """The reference's tiles on the device, cuBLAS for each tile's product."""
    x, blocks, bias = gpu(x=x, blocks=blocks, bias=bias)
    return reference.gguf_matmul(x, blocks, qtype, shape, bias)


def gguf_matmul_q8(x, blocks, qtype, shape, bias=None):
    """The reference's rounding of x and tiles on the device."""
    x, blocks, bias = gpu(x=x, blocks=blocks, bias=bias)
    return reference.gguf_matmul_q8(x, blocks, qtype, shape, bias)


def gguf_matmul_dx(dy, blocks, qtype, shape):
    """The reference's tiles on the device."""
    dy, blocks = gpu(dy=dy, blocks=blocks)
    return reference.gguf_matmul_dx(dy, blocks, qtype, shape)
