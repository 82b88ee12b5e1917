"""CuPy normalization kernels: ``reference/norm.py``'s RMSNorm (the semantics are there).

No hand-written CUDA here yet: the reference's array code runs on the device (CuPy elementwise
kernels and row reductions); one fused kernel per direction is the next step, once a GPU can
measure it against this.
"""
from .. import reference
from .device import gpu


# -- RMSNorm ----------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
    """The reference's row reductions on the device."""
    x, weight = gpu(x=x, weight=weight)
    return reference.rms_norm(x, weight, eps)


def rms_norm_backward(dy, x, weight, rstd, need_dw=True):
    """The reference's backward on the device."""
    dy, x, weight, rstd = gpu(dy=dy, x=x, weight=weight, rstd=rstd)
    return reference.rms_norm_backward(dy, x, weight, rstd, need_dw)
