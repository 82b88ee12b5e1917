"""NF4Dense: a frozen 4-bit NF4 base layer (the base of QLoRA).

Letters: N rows, D_in, D_out. Ŵ = dequant(Q) (D_out, D_in) never exists in full:
the kernels dequantize a tile of rows at a time.

    forward   y  = x Ŵᵀ + b          nf4_matmul      (N, D_in) -> (N, D_out)
    backward  dx = dy Ŵ              nf4_matmul_dx   (N, D_out) -> (N, D_in)
              db = Σ_rows dy         only when the bias is trainable (PEFT's bias="all")
              no dW: the 4-bit weight is frozen and keeps no input, no gradient, no optimizer state
"""
from __future__ import annotations

import numpy as np

from .layers import Dense, QuantizedDense, check_dtype
from .module import Parameter
from .quant import NF4Tensor


class NF4Dense(QuantizedDense):
    """y = x Ŵᵀ + b with Ŵ stored in NF4. The packed codes and block scales are frozen Parameters
    (``weight_packed``, ``weight_absmax`` or ``weight_absmax_q/_scale/_offset``), so state_dict() carries them."""

    def __init__(self, weight: NF4Tensor, bias=None, *, backend: str | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Dense: weight must be 2-D (D_out, D_in), got shape {weight.shape}")
        self.dtype = check_dtype("NF4Dense", weight.dtype)
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.dq_blocksize = weight.blocksize, weight.dq_blocksize
        self.double_quant = weight.double_quant
        self.backend = backend
        for name, array in weight.buffers().items():       # the codes count as the weights; scales as none
            setattr(self, f"weight_{name}", Parameter(array, trainable=False,
                                                      numel=weight.numel if name == "packed" else 0))
        if bias is not None and (np.dtype(bias.dtype) != self.dtype or tuple(bias.shape) != (self.out_features,)):
            raise ValueError(f"NF4Dense: bias must be {self.dtype} of shape ({self.out_features},), "
                             f"got {bias.dtype} {tuple(bias.shape)}")
        self.bias = Parameter(bias) if bias is not None else None

    @classmethod
    def from_dense(cls, dense: Dense, blocksize: int = 64, double_quant: bool = True) -> "NF4Dense":
        """Quantize a Dense layer's weight; the bias stays in float with its trainable flag."""
        layer = cls(NF4Tensor.quantize(dense.weight.data, blocksize, double_quant), None, backend=dense.backend)
        if dense.bias is not None:
            layer.bias = Parameter(dense.bias.data.copy(), trainable=dense.bias.trainable)
        return layer

    @property
    def weight(self) -> NF4Tensor:
        """The quantized weight, a view on the current Parameter arrays (``.data`` = packed codes)."""
        buffers = {name[len("weight_"):]: p.data for name, p in self._parameters.items()
                   if name.startswith("weight_")}
        packed = buffers.pop("packed")
        return NF4Tensor(packed, (self.out_features, self.in_features), self.dtype, self.blocksize,
                         dq_blocksize=self.dq_blocksize, **buffers)        # absmax, or absmax_q/_scale/_offset

    def _product(self, kernels, x, b):
        W = self.weight
        return kernels.nf4_matmul(x, W.data, W.absmax(), W.shape, W.blocksize, b)                      # (N, D_out)

    def _product_dx(self, kernels, dy):
        W = self.weight
        return kernels.nf4_matmul_dx(dy, W.data, W.absmax(), W.shape, W.blocksize)                     # (N, D_in)

    def _dequantize(self, kernels):
        return self.weight.dequantize(self.dtype)

    def extra_repr(self):
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}{dq}")
