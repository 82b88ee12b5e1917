"""CuPy loss kernel: ``reference/loss.py``'s LM head and cross-entropy (the semantics are there).

No hand-written CUDA here yet: the reference's chunked array code runs on the device (cuBLAS for the
products, a CuPy elementwise kernel per step), until a GPU can measure a fused kernel against it.
"""
from .. import reference
from .device import gpu


# -- the LM head and cross-entropy --------------------------------------------------------------
def linear_cross_entropy(x, W, labels, scale=1.0, ignore_index=-100, need_dx=True, need_dW=True):
    """The reference's chunks on the device."""
    x, W, labels = gpu(x=x, W=W, labels=labels)
    return reference.linear_cross_entropy(x, W, labels, scale, ignore_index, need_dx, need_dW)
