"""CuPy attention kernels: ``reference/attention.py``'s products, RoPE and causal softmax (the semantics are there).

No hand-written CUDA here yet: each function checks that its inputs live on the device and runs
the reference's array code there, every step a CuPy elementwise kernel or reduction (memory-bound
passes, as on the CPU before numba_cpu fused them). A fused kernel is the next step, once a GPU
can measure it against this.
"""
from .. import reference
from .device import gpu


# -- the products -----------------------------------------------------------------------------
def matmul(a, b):
    """The reference's a @ b on the device (cuBLAS, batched over the leading axes)."""
    a, b = gpu(a=a, b=b)
    return reference.matmul(a, b)


# -- rotary position embedding ----------------------------------------------------------------
def rope_forward(x, cos, sin):
    """The reference's half-rotation on the device."""
    x, cos, sin = gpu(x=x, cos=cos, sin=sin)
    return reference.rope_forward(x, cos, sin)


def rope_backward(dy, cos, sin):
    """The reference's half-rotation by −angle on the device."""
    dy, cos, sin = gpu(dy=dy, cos=cos, sin=sin)
    return reference.rope_backward(dy, cos, sin)


# -- causal softmax ---------------------------------------------------------------------------
def causal_softmax(S, key_mask=None, past=0):
    """The reference's masked softmax on the device (CuPy reductions over the last axis)."""
    S, key_mask = gpu(S=S, key_mask=key_mask)
    return reference.causal_softmax(S, key_mask, past)


def causal_softmax_backward(dP, P):
    """The reference's softmax backward on the device."""
    dP, P = gpu(dP=dP, P=P)
    return reference.causal_softmax_backward(dP, P)


# -- attention, inference ---------------------------------------------------------------------
def causal_attention(q, k, v, key_mask=None, past=0):
    """The reference's two products and softmax on the device."""
    q, k, v, key_mask = gpu(q=q, k=k, v=v, key_mask=key_mask)
    return reference.causal_attention(q, k, v, key_mask, past)
