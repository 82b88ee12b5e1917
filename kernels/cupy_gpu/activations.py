"""CuPy activation kernels: ``reference/activations.py``'s SwiGLU gate (the semantics are there).

No hand-written CUDA here yet: the reference's array code runs on the device, a CuPy elementwise
kernel per step; one fused kernel is the next step, once a GPU can measure it against this.
"""
from .. import reference
from .device import gpu


# -- SiLU and multiply (SwiGLU) ---------------------------------------------------------------
def silu_and_mul(g, u):
    """The reference's σ and products on the device."""
    g, u = gpu(g=g, u=u)
    return reference.silu_and_mul(g, u)


def silu_and_mul_backward(dy, g, u):
    """The reference's backward on the device."""
    dy, g, u = gpu(dy=dy, g=g, u=u)
    return reference.silu_and_mul_backward(dy, g, u)
