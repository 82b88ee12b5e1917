"""Kernel backends with one planted bug each, and modules that are not backends at all.

The conformance suite must fail the first three, naming the function and a small case; the
registry must complete a partial backend with the reference and refuse the last two.
"""
import numpy as np

from lowrank.kernels import reference as ref


class NoScaling:
    """Forgets s: y = x Wᵀ + b + h Bᵀ (and the gradients to match)."""

    @staticmethod
    def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
        return ref.lora_forward(x, W, A, B, 1.0, bias, mask)

    @staticmethod
    def lora_backward(dy, x, h, W, A, B, scaling, need_dx=True, mask=None):
        return ref.lora_backward(dy, x, h, W, A, B, 1.0, need_dx, mask)


class MinusOneIsLastAdapter:
    """BGMV row by row with A_stack[index[i]]: −1 silently picks the last adapter (Python indexing)."""

    @staticmethod
    def lora_forward_multi(x, W, A_stack, B_stack, scalings, index, bias=None):
        y = ref.dense_forward(x, W, bias)
        h = np.zeros((x.shape[0], A_stack.shape[1]), x.dtype)
        for i, k in enumerate(index):
            h[i] = A_stack[k] @ x[i]                                   # (r, D_in) @ (D_in,)
            y[i] += scalings[k] * (B_stack[k] @ h[i])                  # (D_out, r) @ (r,)
        return y, h


class HWrongLayout:
    """Right y, but h (N, r) filled from an F-ordered buffer read as C: h.T's memory in h's shape."""

    @staticmethod
    def lora_forward(x, W, A, B, scaling, bias=None, mask=None):
        y, h = ref.lora_forward(x, W, A, B, scaling, bias, mask)
        return y, np.ascontiguousarray(h.T).reshape(h.shape)


class DenseOnly:
    """A correct backend of one function: the other ten fall back to the reference."""

    @staticmethod
    def dense_forward(x, W, bias=None):
        return ref.dense_forward(x, W, bias)


class WrongSignatures:
    """Not a backend: lora_forward lacks scaling and mask, dense_forward renames bias."""

    @staticmethod
    def lora_forward(x, W, A, B, bias=None):
        return ref.lora_forward(x, W, A, B, 1.0, bias)

    @staticmethod
    def dense_forward(x, W, b=None):
        return ref.dense_forward(x, W, b)


class NoKernels:
    """Not a backend: no API function at all."""

    @staticmethod
    def einsum(spec, *operands):
        return np.einsum(spec, *operands)
