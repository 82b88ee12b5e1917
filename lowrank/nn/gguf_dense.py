"""GGUFDense and GGUFEmbedding: frozen layers whose weight stays in llama.cpp's quantized GGUF blocks.

Letters: N rows, D_in, D_out. Ŵ = dequant(blocks) (D_out, D_in) is the weight llama.cpp multiplies
(Q8_0, Q4_0, Q4_1, Q4_K with Numba kernels; Q5_0, Q5_1, Q5_K, Q6_K through the reference's tiles; layouts
in ``lowrank.kernels.reference.gguf``); it never exists in full: the kernels dequantize a tile of rows at a
time, and the layer holds the blocks at their GGUF size.

    forward   y  = x Ŵᵀ + b          gguf_matmul      (N, D_in) -> (N, D_out)
              y  = x̃ Ŵᵀ + b          gguf_matmul_q8   with ``q8_activations``: x rounded to Q8_0 blocks first,
                                                      llama.cpp's own arithmetic for these formats (faster
                                                      here too: integer dots); the backward takes x̃ for x
    backward  dx = dy Ŵ              gguf_matmul_dx   (N, D_out) -> (N, D_in)
              db = Σ_rows dy         only when the bias is trainable (PEFT's bias="all")
              no dW: the quantized weight is frozen and keeps no input, no gradient, no optimizer state

GGUFEmbedding (V, d) is the embedding's counterpart: y[b, t] = Ŵ[ids[b, t]], only the looked-up rows
dequantized; frozen, so its backward is nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..kernels import validate
from .device import get_array_module
from .dispatch import kernels_for
from .embedding import Embedding
from .layers import QuantizedDense, check_dtype
from .module import Module, Parameter


class GGUFWeight(NamedTuple):
    """The quantized weight as the layers above see it (NF4Dense's NF4Tensor's counterpart): ``data`` the blocks."""
    data: object           # uint8 (D_out, D_in / B · S)
    qtype: str
    shape: tuple           # (D_out, D_in)
    dtype: np.dtype        # what it computes in


def _hold_blocks(layer, blocks, qtype, shape, dtype, backend) -> tuple:
    """Set ``layer``'s qtype, dtype, backend and ``weight_blocks`` (a frozen uint8 Parameter) for the GGUF blocks
    of a weight of ``shape``; returns its (rows, columns). Errors name the layer's class."""
    label = type(layer).__name__
    try:
        layer.qtype, rows, columns = validate.gguf(blocks, qtype, shape)
    except ValueError as e:
        raise ValueError(f"{label}: {e}") from None
    layer.dtype, layer.backend = check_dtype(label, dtype), backend
    layer.weight_blocks = Parameter(blocks, trainable=False, numel=rows * columns)
    return rows, columns


class GGUFDense(QuantizedDense):
    """y = x Ŵᵀ + b with Ŵ held as GGUF blocks: ``weight_blocks``, a frozen uint8 Parameter
    (D_out, D_in / B · S) that state_dict() carries; ``qtype`` names the block format; ``q8_activations``
    multiplies as llama.cpp does (module docstring)."""

    def __init__(self, blocks, qtype, shape, bias=None, *, dtype="float32", backend: str | None = None,
                 q8_activations: bool = False):
        super().__init__()
        self.q8_activations = bool(q8_activations)
        self.out_features, self.in_features = _hold_blocks(self, blocks, qtype, shape, dtype, backend)
        if bias is not None and (np.dtype(bias.dtype) != self.dtype or tuple(bias.shape) != (self.out_features,)):
            raise ValueError(f"GGUFDense: bias must be {self.dtype} of shape ({self.out_features},), "
                             f"got {bias.dtype} {tuple(bias.shape)}")
        self.bias = Parameter(bias) if bias is not None else None

    @classmethod
    def tied(cls, embedding: "GGUFEmbedding", *, q8_activations: bool = False) -> "GGUFDense":
        """logits = h Ŵᵀ over a GGUFEmbedding's blocks (TiedLMHead's counterpart): its Parameter is referenced,
        not listed, so nothing is held, counted or saved twice."""
        head = cls(embedding.weight_blocks.data, embedding.qtype, embedding.weight.shape, dtype=embedding.dtype,
                   backend=embedding.backend, q8_activations=q8_activations)
        head._parameters.pop("weight_blocks")
        object.__setattr__(head, "weight_blocks", embedding.weight_blocks)
        return head

    @property
    def shape(self) -> tuple:
        return self.out_features, self.in_features

    @property
    def weight(self) -> GGUFWeight:
        """The quantized weight, a view on the current blocks Parameter."""
        return GGUFWeight(self.weight_blocks.data, self.qtype, self.shape, self.dtype)

    def _product(self, kernels, x, b, blocks=None, shape=None):
        product = kernels.gguf_matmul_q8 if self.q8_activations else kernels.gguf_matmul
        return product(x, self.weight_blocks.data if blocks is None else blocks, self.qtype, shape or self.shape, b)

    def _stackable(self):
        """The blocks ``layers.stacked_product`` may stack: host arrays without a bias."""
        blocks = self.weight_blocks.data
        return blocks if self.bias is None and type(blocks) is np.ndarray else None

    @staticmethod
    def _stacked_forward(kernels, x, blocks, layers):
        """One product over the stacked blocks of layers of one format and arithmetic (else None)."""
        first = layers[0]
        for layer in layers:
            if layer.qtype != first.qtype or layer.q8_activations != first.q8_activations:
                return None
        return first._product(kernels, x, None, blocks, (blocks.shape[0], first.in_features))          # (N, Σ D_out)

    def _product_dx(self, kernels, dy):
        return kernels.gguf_matmul_dx(dy, self.weight_blocks.data, self.qtype, self.shape)             # (N, D_in)

    def _dequantize(self, kernels):
        return kernels.gguf_dequantize(self.weight_blocks.data, self.qtype, self.shape, self.dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"qtype={self.qtype}" + (", q8_activations=True" if self.q8_activations else ""))


class GGUFEmbedding(Module):
    """y = Ŵ[ids] with Ŵ (V, d) held as GGUF blocks: ``weight_blocks``, a frozen uint8 Parameter (V, d / B · S)."""

    check_ids = Embedding.check_ids        # ids an integer array in [0, num_embeddings), errors naming this layer

    def __init__(self, blocks, qtype, shape, *, dtype="float32", backend: str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = _hold_blocks(self, blocks, qtype, shape, dtype, backend)

    @property
    def weight(self) -> GGUFWeight:
        """The quantized weight (V, d), a view on the current blocks Parameter."""
        return GGUFWeight(self.weight_blocks.data, self.qtype, (self.num_embeddings, self.embedding_dim), self.dtype)

    def forward(self, ids):
        self.check_ids(ids)
        rows = self.weight_blocks.data[ids.reshape(-1)]                           # (B·T, d / B · S) uint8
        self._cache = tuple(ids.shape) + (self.embedding_dim,)
        if rows.shape[0] == 0:
            return get_array_module(rows).zeros(self._cache, self.dtype)
        y = kernels_for(rows, self.backend).gguf_dequantize(rows, self.qtype, (rows.shape[0], self.embedding_dim),
                                                            self.dtype)
        return y.reshape(self._cache)                                             # (B, T, d)

    def backward(self, dy):
        self._check_dy(dy, self._need_cache())
        self._cache = None
        return None                                                               # frozen; ids get no gradient

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
