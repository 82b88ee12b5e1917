"""Dense layer, activations and the MLP, each with its backward right under its forward.

Letters: N rows, D_in, D_out. ``weight`` (D_out, D_in) and ``bias`` (D_out,) as in
PyTorch's Linear, so y = x Wᵀ + b and state dicts carry over name for name.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from typing import NamedTuple

import numpy as np

from ..kernels.common import sigmoid      # one σ for the layers, the losses and the kernels
from .device import erf, get_array_module
from .dispatch import kernels_for
from .module import Module, Parameter, Sequential, memory_owner


_EMPTY = contextvars.ContextVar("lowrank.nn.init_empty_weights", default=False)


@contextlib.contextmanager
def init_empty_weights():
    """Within: new layers hold no weights, each parameter a zero-strided placeholder of its shape and dtype (no
    memory, nothing drawn): for a model whose weights a file replaces (accelerate's name for the same)."""
    token = _EMPTY.set(True)
    try:
        yield
    finally:
        _EMPTY.reset(token)


def initial(shape, dtype, draw):
    """A layer's initial weight: ``draw()`` as ``dtype``, or its placeholder under ``init_empty_weights``."""
    if _EMPTY.get():
        return np.broadcast_to(np.zeros((), dtype), shape)
    return draw().astype(dtype)


def kaiming_uniform(rng, shape, fan_in, dtype):
    """PyTorch's Linear init: Kaiming-uniform with a = √5, i.e. U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return initial(shape, dtype, lambda: rng.uniform(-bound, bound, size=shape))


def check_dtype(owner: str, dtype) -> np.dtype:
    """float32 or float64, else a TypeError naming ``owner``."""
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{owner}: dtype must be float32 or float64, got {dt}")
    return dt


class DenseCache(NamedTuple):
    x: object          # (N, D_in) input, kept only when dW is needed (trainable weight)
    rows: int          # N, to check dy


class Dense(Module):
    """y = x Wᵀ + b. When ``weight`` is frozen its backward computes no dW and allocates none."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype="float32", seed=None, backend: str | None = None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Dense: in_features and out_features must be >= 1, got {in_features}, {out_features}")
        dt = check_dtype("Dense", dtype)
        rng = np.random.default_rng(seed)
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.weight = Parameter(kaiming_uniform(rng, (out_features, in_features), in_features, dt))
        self.bias = Parameter(kaiming_uniform(rng, (out_features,), in_features, dt)) if bias else None

    def forward(self, x):
        y = self._forward(x)
        self._cache = DenseCache(x if self.weight.trainable else None, x.shape[0])
        return y

    def forward_inference(self, x):
        """``forward`` with nothing kept (no backward may follow)."""
        self._cache = None
        return self._forward(x)

    def _forward(self, x):
        """x Wᵀ + b after the input check: what forward and forward_inference share."""
        self._check_input(x, self.in_features, self.weight.dtype)
        b = self.bias.data if self.bias is not None else None
        return kernels_for(x, self.backend).dense_forward(x, self.weight.data, b)   # (N, D_out)

    def backward(self, dy):
        cache = self._need_cache()
        self._check_dy(dy, (cache.rows, self.out_features))
        k = kernels_for(dy, self.backend)
        need_db = self.bias is not None and self.bias.trainable
        dx, dW, db = k.dense_backward(dy, cache.x, self.weight.data, need_dx=True,
                                      need_dW=self.weight.trainable, need_db=need_db)
        self.weight.accumulate(dW)
        if need_db:
            self.bias.accumulate(db)
        self._cache = None
        return dx

    def _stackable(self):
        """The weight ``stacked_product`` may stack: plain host arrays without a bias."""
        w = self.weight.data
        return w if self.bias is None and type(w) is np.ndarray else None

    @staticmethod
    def _stacked_forward(kern, x, W, layers):
        return kern.dense_forward(x, W)                                        # (N, Σ D_out)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def adjacent(arrays) -> bool:
    """Whether C-contiguous arrays of one dtype and width lie one after another in one buffer, in order."""
    first = arrays[0]
    if not all(a.flags.c_contiguous and a.dtype == first.dtype and a.shape[1] == first.shape[1] for a in arrays):
        return False
    return all(prev.ctypes.data + prev.nbytes == a.ctypes.data and memory_owner(a) is memory_owner(first)
               for prev, a in zip(arrays, arrays[1:]))


def stacked_rows(arrays):
    """Adjacent arrays (``adjacent``) as one read-only (Σ rows, width) view; None when they are not adjacent."""
    if not adjacent(arrays):
        return None
    first, rows = arrays[0], sum(a.shape[0] for a in arrays)
    return np.lib.stride_tricks.as_strided(first, (rows, first.shape[1]), first.strides, writeable=False)


def stacked_weight(*layers):
    """The weights of ``layers`` as one (Σ D_out, D_in) view, so that x Wᵀ of it gives their outputs side by
    side in one product (vLLM's merged q/k/v and gate/up projections): when each layer is a plain Dense (not a
    LoRA wrapper, not quantized) without bias and their weights lie one after another in one buffer, as
    ``flatten_parameters`` or a file lays them out; else None. Inference only: the layers keep no cache."""
    arrays = [Dense._stackable(layer) if type(layer) is Dense else None for layer in layers]
    return None if any(a is None for a in arrays) else stacked_rows(arrays)


class HeldStack(NamedTuple):
    layers: tuple          # the layers stacked, as given
    arrays: tuple          # what each of them held (``_stackable``) when the view was made
    view: object           # their (Σ D_out, D_in) view, or None: they do not stack


_STACKS = weakref.WeakKeyDictionary()      # owner module -> HeldStack


def stacked_product(kern, x, owner, *layers):
    """x (N, D_in) -> the outputs of ``layers`` side by side (N, Σ D_out) from one product over their stacked
    weights, or None when they don't stack. A layer class takes part with ``_stackable(layer)`` (the array to
    stack, or None: a bias, say) and ``_stacked_forward(kern, x, view, layers)`` (None when the layers differ in
    how they multiply): plain Dense (``stacked_weight``'s rule) and GGUFDense (blocks of one format). The view
    is kept for ``owner`` (the module holding the layers) while the same layers hold the same arrays, so a decode
    step checks only that (a few identity tests), not the memory; arrays replaced since are held until the next
    call. Inference only: nothing is kept for a backward."""
    held = _STACKS.get(owner)
    if held is None or held.layers != layers or not _holding(held):
        held = _STACKS[owner] = _stack(layers)           # layers that don't stack are checked again each call
    return None if held.view is None else type(layers[0])._stacked_forward(kern, x, held.view, layers)


def _holding(held) -> bool:
    """Whether ``held`` has a view and each of its layers still holds the array the view was made of."""
    if held.view is None:
        return False
    for layer, array in zip(held.layers, held.arrays):
        if type(layer)._stackable(layer) is not array:
            return False
    return True


def _stack(layers) -> HeldStack:
    """The HeldStack of ``layers``: one class with ``_stackable``, every array there, adjacent in memory."""
    cls = type(layers[0])
    if getattr(cls, "_stackable", None) is None or any(type(layer) is not cls for layer in layers):
        return HeldStack(layers, (), None)
    arrays = tuple(cls._stackable(layer) for layer in layers)
    if any(a is None for a in arrays):
        return HeldStack(layers, (), None)
    return HeldStack(layers, arrays, stacked_rows(arrays))


class QuantizedDenseCache(NamedTuple):
    rows: int              # N of the forward input; x itself is not kept (no dW for a quantized W)


class QuantizedDense(Module):
    """y = x Ŵᵀ + b over a frozen quantized Ŵ (D_out, D_in) that never exists in full (NF4Dense, GGUFDense):

        forward   y  = x Ŵᵀ + b          ``_product(kernels, x, b)``   (N, D_in) -> (N, D_out)
        backward  dx = dy Ŵ              ``_product_dx(kernels, dy)``  (N, D_out) -> (N, D_in)
                  db = Σ_rows dy         only when the bias is trainable (PEFT's bias="all")
                  no dW: the frozen weight keeps no input, no gradient, no optimizer state

    A subclass sets in_features, out_features, dtype, backend and bias, and gives the two products and
    ``_dequantize(kernels)`` -> Ŵ in ``dtype``."""

    lora_targetable = True     # get_lora_model may wrap it in LoraLinear: LoRA over a quantized base (QLoRA)

    def forward(self, x):
        y = self._forward(x)
        self._cache = QuantizedDenseCache(x.shape[0])
        return y

    def forward_inference(self, x):
        """``forward`` with nothing kept (no backward may follow)."""
        self._cache = None
        return self._forward(x)

    def _forward(self, x):
        """x Ŵᵀ + b after the input check: what forward and forward_inference share."""
        self._check_input(x, self.in_features, self.dtype)
        b = self.bias.data if self.bias is not None else None
        return self._product(kernels_for(x, self.backend), x, b)                  # (N, D_out)

    def backward(self, dy):
        cache = self._need_cache()
        self._cache = None
        if tuple(dy.shape) != (cache.rows, self.out_features):
            raise ValueError(f"{self.label}: dy has shape {tuple(dy.shape)}, "
                             f"expected {(cache.rows, self.out_features)}")
        if self.bias is not None and self.bias.trainable:
            self.bias.accumulate(dy.sum(axis=0))                                   # (D_out,)
        return self._product_dx(kernels_for(dy, self.backend), dy)                 # (N, D_in)

    def dequantized(self) -> Dense:
        """A float Dense holding Ŵ and a copy of the bias: the layer this one computes, exactly."""
        dense = Dense(self.in_features, self.out_features, self.bias is not None, dtype=self.dtype,
                      backend=self.backend)
        first = next(p for _, p in self.named_parameters()).data
        dense.weight = Parameter(self._dequantize(kernels_for(first, self.backend)), trainable=False)
        if self.bias is not None:
            dense.bias = Parameter(self.bias.data.copy(), trainable=self.bias.trainable)
        return dense


class ReLU(Module):
    """y = max(x, 0); dx = dy ⊙ [x > 0]."""

    def forward(self, x):
        self._cache = x > 0
        return x * self._cache

    def backward(self, dy):
        mask = self._need_cache()
        self._cache = None
        self._check_dy(dy, mask.shape)
        return dy * mask


class Tanh(Module):
    """y = tanh x; dx = dy ⊙ (1 − y²)."""

    def forward(self, x):
        y = get_array_module(x).tanh(x)
        self._cache = y
        return y

    def backward(self, dy):
        y = self._need_cache()
        self._cache = None
        self._check_dy(dy, y.shape)
        return dy * (1 - y * y)


class Sigmoid(Module):
    """y = σ(x); dx = dy ⊙ y(1 − y)."""

    def forward(self, x):
        y = sigmoid(x)
        self._cache = y
        return y

    def backward(self, dy):
        y = self._need_cache()
        self._cache = None
        self._check_dy(dy, y.shape)
        return dy * y * (1 - y)


class GELU(Module):
    """GELU, exact x·Φ(x) (``approximate="none"``) or the tanh form (``"tanh"``), as PyTorch.

    exact   y = x Φ(x),  dy/dx = Φ(x) + x φ(x)
    tanh    u = √(2/π)(x + 0.044715 x³),  y = ½ x (1 + tanh u),
            dy/dx = ½(1 + tanh u) + ½ x (1 − tanh² u) √(2/π)(1 + 3·0.044715 x²)
    """

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        xp = get_array_module(x)
        self._cache = x
        if self.approximate == "tanh":
            t = xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
            return 0.5 * x * (1 + t)
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))

    def backward(self, dy):
        x = self._need_cache()
        self._cache = None
        self._check_dy(dy, x.shape)
        xp = get_array_module(x)
        if self.approximate == "tanh":
            c = math.sqrt(2 / math.pi)
            t = xp.tanh(c * (x + 0.044715 * x**3))
            return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x))
        cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return dy * (cdf + x * pdf)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "gelu": GELU,
               "gelu_tanh": lambda: GELU("tanh")}


def MLP(sizes, activation: str = "relu", *, bias: bool = True, dtype="float32", seed=None) -> Sequential:
    """``Sequential(Dense, act, Dense, act, ..., Dense)``: the same names and shapes as
    ``torch.nn.Sequential(Linear, ReLU, ..., Linear)`` for ``sizes = [d0, d1, ..., dk]``."""
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"MLP: sizes needs at least [in, out], got {sizes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"MLP: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    rng = np.random.default_rng(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Dense(d_in, d_out, bias, dtype=dtype, seed=int(rng.integers(2**31))))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return Sequential(*layers)
