"""QLoRA: a frozen 4-bit NF4 base layer under trainable LoRA factors.

Letters: N rows, D_in, D_out, r rank. Ŵ = dequant(Q) (D_out, D_in) never exists in full:
the kernels dequantize a tile of rows at a time.

    forward   y  = x Ŵᵀ + b          nf4_matmul      (N, D_in) -> (N, D_out)
    backward  dx = dy Ŵ              nf4_matmul_dx   (N, D_out) -> (N, D_in)
              db = Σ_rows dy         only when the bias is trainable (PEFT's bias="all")
              no dW: the 4-bit weight is frozen and keeps no input, no gradient, no optimizer state

``LoRALinear(NF4Dense(...))`` is QLoRA unchanged: its forward is y = base(x) + s·(x Aᵀ) Bᵀ and
its backward dx = base.backward(dy) + dx_lora. Merging an adapter into a 4-bit base
(dequantize, add s·B·A, requantize) is lossy: ``merge_nf4`` does it and ``output_error``
measures what it costs; ``merge_nf4(..., exact=True)`` keeps the merged weight in float.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .backend import to_device
from .dispatch import kernels_for
from .layers import Dense, check_dtype
from .lora import LoRALinear
from .module import Module, Parameter
from .quant import NF4Tensor, merge_delta


class NF4DenseCache(NamedTuple):
    rows: int              # N of the forward input; x itself is not kept (no dW for a 4-bit W)


class NF4Dense(Module):
    """y = x Ŵᵀ + b with Ŵ stored in NF4. The packed codes and block scales are frozen Parameters
    (``weight_packed``, ``weight_absmax`` or ``weight_absmax_q/_scale/_offset``), so state_dict() carries them."""

    lora_targetable = True     # get_lora_model may wrap it in LoRALinear: that is QLoRA

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

    def forward(self, x):
        self._check_input(x, self.in_features, self.dtype)
        W = self.weight
        b = self.bias.data if self.bias is not None else None
        self._cache = NF4DenseCache(x.shape[0])
        return kernels_for(x, self.backend).nf4_matmul(x, W.data, W.absmax(), W.shape, W.blocksize, b)  # (N, D_out)

    def backward(self, dy):
        cache = self._need_cache()
        self._cache = None
        if tuple(dy.shape) != (cache.rows, self.out_features):
            raise ValueError(f"{self.label}: dy has shape {tuple(dy.shape)}, "
                             f"expected {(cache.rows, self.out_features)}")
        if self.bias is not None and self.bias.trainable:
            self.bias.accumulate(dy.sum(axis=0))                                   # (D_out,)
        W = self.weight
        return kernels_for(dy, self.backend).nf4_matmul_dx(dy, W.data, W.absmax(), W.shape, W.blocksize)  # (N, D_in)

    def dequantized(self) -> Dense:
        """A float Dense holding Ŵ and a copy of the bias: the layer this one computes, exactly."""
        dense = Dense(self.in_features, self.out_features, self.bias is not None, dtype=self.dtype,
                      backend=self.backend)
        dense.weight = Parameter(self.weight.dequantize(self.dtype), trainable=False)
        if self.bias is not None:
            dense.bias = Parameter(self.bias.data.copy(), trainable=self.bias.trainable)
        return dense

    def extra_repr(self):
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}{dq}")


def _matches(name: str, pattern: str) -> bool:
    """PEFT's suffix rule: 'head' matches module 'head' and 'encoder.head', not 'subhead'."""
    return name == pattern or name.endswith("." + pattern)


def quantize_model(model: Module, skip=(), blocksize: int = 64, double_quant: bool = True) -> Module:
    """Replace every Dense in ``model`` by an NF4Dense in place (except modules named in ``skip``,
    e.g. the head); returns the model (a new NF4Dense when ``model`` itself is a Dense)."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    names = [name for name, _ in model.named_modules()]
    unknown = [s for s in skip if not any(_matches(n, s) for n in names)]
    if unknown:
        raise ValueError(f"quantize_model: skip names {unknown} match no module; modules are {names[1:]}")
    if isinstance(model, Dense):
        return model if "" in skip else NF4Dense.from_dense(model, blocksize, double_quant)
    targets = [n for n, m in model.named_modules() if isinstance(m, Dense) and not any(_matches(n, s) for s in skip)]
    for name in targets:
        model.set_submodule(name, NF4Dense.from_dense(model.get_submodule(name), blocksize, double_quant))
    return model


def merge_nf4(layer: LoRALinear, adapter_name: str | None = None, *, exact: bool = False) -> Module:
    """The base layer with adapter ``adapter_name`` (default: the active one) merged in: W' = Ŵ + s·B·A.

    exact=False: an NF4Dense holding requant(W') (lossy; measure it with ``output_error``).
    exact=True:  a float Dense holding W' in the base's dtype (no requantization error).
    """
    base = layer.base_layer
    if not isinstance(base, NF4Dense):
        raise TypeError(f"merge_nf4: {layer.label} has a {type(base).__name__} base; use LoRALinear.merge for a "
                        f"float base")
    name = layer.active_adapter if adapter_name is None else adapter_name
    if name not in layer.lora_A:
        raise ValueError(f"merge_nf4: {layer.label} has no adapter {name!r}; it has {list(layer.lora_A)}")
    delta = layer.delta_weight(name)                                            # (D_out, D_in)
    if exact:
        merged = base.dequantized()
        merged.weight.data = (merged.weight.data + delta).astype(base.dtype)
        return merged
    requant = merge_delta(base.weight, delta)
    out = NF4Dense(requant, None, backend=base.backend)
    out.bias = Parameter(base.bias.data.copy(), base.bias.trainable) if base.bias is not None else None
    return out


def merge_model_nf4(model: Module, *, exact: bool = False) -> Module:
    """Replace every LoRALinear over an NF4Dense in ``model`` by ``merge_nf4`` of it; returns the model."""
    targets = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and isinstance(m.base_layer, NF4Dense)]
    if "" in targets:
        return merge_nf4(model, exact=exact)
    for name in targets:
        model.set_submodule(name, merge_nf4(model.get_submodule(name), exact=exact))
    return model


def output_error(reference: Module, candidate: Module, x) -> dict:
    """How far ``candidate``'s outputs are from ``reference``'s on x (both in eval mode, modes restored).

    Returns {"max_abs": max |Δy|, "rel_fro": ‖Δy‖_F / ‖y_ref‖_F}.
    """
    modes = [reference.training, candidate.training]
    y_ref = reference.eval().forward(x)
    y = candidate.eval().forward(x)
    reference.train(modes[0])
    candidate.train(modes[1])
    y, y_ref = (np.asarray(to_device(a, "cpu"), np.float64) for a in (y, y_ref))
    diff = y - y_ref
    norm = float(np.linalg.norm(y_ref))
    return {"max_abs": float(np.abs(diff).max(initial=0.0)), "rel_fro": float(np.linalg.norm(diff)) / (norm or 1.0)}
