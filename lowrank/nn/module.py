"""Parameters and the module protocol (PyTorch's names, no autograd).

Every module hand-writes ``forward(x)``, which keeps what its backward needs in an
explicit cache, and ``backward(dy)``, which returns ``dx`` and *accumulates* into
``.grad`` of its trainable parameters only. A frozen parameter never gets a gradient
buffer: that is the whole memory argument of parameter-efficient fine-tuning.
"""
from __future__ import annotations

import math
import mmap
import numbers
from collections import OrderedDict
from typing import Iterator

import numpy as np

from .snapshot import all_or_nothing
from .device import FLOAT_DTYPES, device_of, get_array_module, to_device


class CallOrderError(ValueError, RuntimeError):
    """``backward`` without a matching ``forward``: a ValueError (bad use) and a RuntimeError
    (what PyTorch raises for the same mistake), so either ``except`` catches it."""


def check_number(owner: str, name: str, value, low: float = 0.0, inclusive: bool = False, context: str = ""):
    """ValueError naming ``owner`` unless ``value`` is a finite real number > low (>= low if ``inclusive``):
    the one rule for hyper-parameters (lora_alpha, lr, eps, ...); an Inf or NaN one trains NaN weights."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}{context}")
    if value < low or (value == low and not inclusive):
        raise ValueError(f"{owner}: {name} must be {'>=' if inclusive else '>'} {low:g}, got {value!r}{context}")


FINITE_CHUNK = 1 << 20                       # values checked at a time: no NaN/Inf mask the size of a weight


def _all_finite(a) -> bool:
    """Whether ``a`` (NumPy or CuPy) holds no NaN/Inf, checked a chunk at a time."""
    xp, flat = get_array_module(a), a.reshape(-1)
    return all(bool(xp.isfinite(flat[i:i + FINITE_CHUNK]).all()) for i in range(0, flat.size, FINITE_CHUNK))


_ALIGN = 64                                  # bytes: each slot of a block starts on a cache line
HUGE_PAGE = 2 << 20                          # bytes: an x86-64 huge page
HUGE_MIN = 4 << 20                           # bytes: blocks from this size on are asked for huge pages


class HugePages(mmap.mmap):
    """Private anonymous memory that Linux is asked to back with huge pages (``huge_block``): not a file's map.
    ``nbytes``: the block handed out, from the first 2 MB boundary on."""


def huge_block(nbytes: int) -> np.ndarray:
    """``nbytes`` uninitialised bytes (uint8) from a 2 MB boundary of private anonymous memory advised
    MADV_HUGEPAGE, so one core streaming the weights in it misses the TLB once per 2 MB instead of once per 4 KB
    (NumPy advises its own large allocations too, but where they land in the heap, often only part of them gets
    huge pages: a kept-Q4_0 135M-shape decode step ran 13% slower on 4 KB pages). Under ``HUGE_MIN`` bytes, or
    where Linux's madvise is missing, NumPy's own allocation."""
    if nbytes < HUGE_MIN or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.empty(nbytes, np.uint8)
    memory = HugePages(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)                     # before any page is touched
    memory.nbytes = nbytes
    raw = np.frombuffer(memory, np.uint8)                  # its .base holds the map while a view lives
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start:start + nbytes]


def block_views(shapes, dtype) -> list:
    """Uninitialised arrays of ``shapes``, views of one new block of ``dtype`` in that order, each starting on a
    64-byte line: one large allocation (``huge_block``: on huge pages), touched only where written."""
    dtype = np.dtype(dtype)
    align = max(1, _ALIGN // dtype.itemsize)
    sizes = [math.prod(shape) for shape in shapes]
    starts = np.cumsum([0] + [-(-n // align) * align for n in sizes])
    raw = huge_block((int(starts[-1]) + align) * dtype.itemsize)
    block = raw[-raw.ctypes.data % _ALIGN:].view(dtype)[:int(starts[-1])]     # from a cache line's start
    return [block[start:start + n].reshape(shape) for start, n, shape in zip(starts, sizes, shapes)]


def memory_owner(a):
    """What holds array ``a``'s memory: the array at the end of its chain of views, or the object that array
    wraps (the mmap under np.frombuffer's memoryview of a file's map, or a ``HugePages``). Arrays with one owner
    share its buffer."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    owner = a if a.base is None else a.base
    return owner.obj if isinstance(owner, memoryview) else owner


def _mapped(a) -> bool:
    """Whether array ``a`` views a memory-mapped file (np.memmap, or np.frombuffer over an mmap)."""
    owner = memory_owner(a)
    return isinstance(owner, mmap.mmap) and not isinstance(owner, HugePages)


def _one_block(params) -> bool:
    """Whether the parameters' arrays are already what ``block_views`` makes of them: views of one array that
    they fill (no dead slots), in the order given, each starting on a 64-byte line."""
    owners, end, used = set(), 0, 0
    for p in params:
        a, owner = p.data, memory_owner(p.data)
        owners.add(id(owner))
        start = a.ctypes.data
        if len(owners) > 1 or not a.flags.c_contiguous or start < end or start % _ALIGN:
            return False
        end, used = start + a.nbytes, used + -(-a.nbytes // _ALIGN) * _ALIGN
    return isinstance(owner, (np.ndarray, HugePages)) and owner.nbytes <= used + _ALIGN


class Parameter:
    """An array with a gradient slot. ``grad`` stays None until a backward fills it."""

    def __init__(self, data, trainable: bool = True, numel: int | None = None):
        self.data = data
        self.grad = None
        self.trainable = trainable
        self._numel = numel        # logical parameters when they differ from data.size (packed codes)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def numel(self) -> int:
        """Parameters this array stands for, as PEFT counts them: two 4-bit weights per packed
        byte, none for quantization scales; ``size`` otherwise."""
        return self.size if self._numel is None else self._numel

    def accumulate(self, g):
        """Add ``g`` into ``.grad`` (trainable parameters only; frozen ones are skipped)."""
        if not self.trainable or g is None:
            return
        self.grad = g if self.grad is None else self.grad + g

    def __repr__(self):
        state = "trainable" if self.trainable else "frozen"
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype}, {state})"


class Module:
    """Base class: registers Parameters and child Modules assigned as attributes."""

    training = True

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_path", "")
        object.__setattr__(self, "_cache", None)

    # -- registration -------------------------------------------------------------
    def __setattr__(self, name, value):
        if name == "_cache":                         # every forward sets it: never a Parameter or a Module
            object.__setattr__(self, name, value)
            return
        params, modules = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if params is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        if isinstance(value, Parameter):             # replacing keeps the original position
            modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            modules[name] = value
            value._set_path(f"{self._path}.{name}" if self._path else name)
        else:
            params.pop(name, None)
            modules.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def _set_path(self, path: str):
        object.__setattr__(self, "_path", path)
        for name, child in self._modules.items():
            child._set_path(f"{path}.{name}" if path else name)

    @property
    def label(self) -> str:
        """How error messages name this module: ``Dense '0'``."""
        return f"{type(self).__name__} '{self._path or '<root>'}'"

    # -- traversal ----------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from self._modules.items()

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """This module (name ``prefix``) and every descendant, with dotted names."""
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter with its dotted name, e.g. ``"0.weight"``."""
        for name, p in self._parameters.items():
            yield (f"{prefix}.{name}" if prefix else name), p
        for name, child in self._modules.items():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name)

    def parameters(self, trainable_only: bool = False) -> list[Parameter]:
        return [p for _, p in self.named_parameters() if p.trainable or not trainable_only]

    def get_submodule(self, name: str) -> "Module":
        module = self
        for part in filter(None, name.split(".")):
            if part not in module._modules:
                raise KeyError(f"{self.label} has no submodule {name!r}")
            module = module._modules[part]
        return module

    def set_submodule(self, name: str, new: "Module"):
        parent_name, _, leaf = name.rpartition(".")
        setattr(self.get_submodule(parent_name), leaf, new)

    # -- modes and gradients --------------------------------------------------------
    def train(self, mode: bool = True):
        for _, m in self.named_modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def requires_grad_(self, trainable: bool = True):
        for p in self.parameters():
            p.trainable = trainable
        return self

    # -- state --------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """name -> array (the live arrays, not copies)."""
        return OrderedDict((name, p.data) for name, p in self.named_parameters())

    def load_state_dict(self, state: dict, strict: bool = True, allow_nonfinite: bool = False, assign: bool = False):
        """Copy arrays in by name, all or nothing: every key, shape and dtype is checked, and
        NaN/Inf refused unless ``allow_nonfinite``, before anything changes. ``assign=True`` (PyTorch's
        name) makes the given arrays the parameters, uncopied where they are writable, contiguous and
        on the parameter's device: for arrays nothing else holds, such as those just read from a file."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(f"{self.label}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, arr in state.items():
            if name not in own:
                continue
            p = own[name]
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(f"{self.label}.load_state_dict: {name!r} has shape {tuple(arr.shape)}, "
                                 f"expected {tuple(p.shape)}")
            if np.dtype(arr.dtype) != np.dtype(p.dtype):
                raise TypeError(f"{self.label}.load_state_dict: {name!r} has dtype {arr.dtype}, expected {p.dtype}")
            if not allow_nonfinite and np.dtype(arr.dtype).kind == "f" and not _all_finite(arr):
                raise ValueError(f"{self.label}.load_state_dict: {name!r} holds NaN or Inf; pass "
                                 f"allow_nonfinite=True to load it")
        with all_or_nothing(self):
            for name, arr in state.items():
                if name in own:
                    xp = get_array_module(own[name].data)
                    moved = to_device(arr, device_of(own[name].data))
                    keep = assign and getattr(moved.flags, "writeable", True) and moved.flags.c_contiguous
                    own[name].data = moved if keep else xp.array(moved, copy=True)
        return self

    def flatten_parameters(self):
        """Lay the host parameters out in one block of memory per dtype, in module order, each a view into it
        (PyTorch's name, from its RNNs); values unchanged. A decode step reads every weight once, in that
        order: from one block (a large allocation, on huge pages: ``huge_block``) one core streams them
        faster than from a few hundred small allocations (``python -m benchmarks.decode --stream``). Views of a
        file's memory map (zero-copy loading) are left where they are: the file is one block already."""
        groups: dict = {}
        for _, p in self.named_parameters():
            if type(p.data) is np.ndarray and p.data.size and not _mapped(p.data):
                groups.setdefault(p.data.dtype, []).append(p)
        for dtype, params in groups.items():
            if _one_block(params):                                         # laid out so already: nothing to do
                continue
            for p, view in zip(params, block_views([p.shape for p in params], dtype)):   # allocated first
                view[...] = p.data
                p.data = view                                              # the old array is freed here
        return self

    def to(self, device: str):
        """Move every parameter to ``'cpu'`` or ``'gpu'`` (gradients and caches are dropped)."""
        for _, p in self.named_parameters():
            p.data = to_device(p.data, device)
            p.grad = None
        for _, m in self.named_modules():
            m._cache = None
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel for p in self.parameters(trainable_only))

    # -- calling ------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward_inference(self, *args, **kwargs):
        """``forward`` when no backward may follow (a decode step's): by default forward, then every cache it and
        the modules below it kept dropped; layers on a decode step's path override it to keep nothing at all."""
        y = self.forward(*args, **kwargs)
        for _, m in self.named_modules():
            m._cache = None
        return y

    def _need_cache(self):
        """The forward cache, or a clear error when backward comes first."""
        if self._cache is None:
            raise CallOrderError(f"{self.label}: backward called before forward (or after the cache was used)")
        return self._cache

    def _check_dy(self, dy, shape):
        """ValueError naming this module when dy is not shaped like the forward's output."""
        if tuple(getattr(dy, "shape", ())) != tuple(shape):
            raise ValueError(f"{self.label}: backward expects dy of shape {tuple(shape)} (the forward's output), "
                             f"got {tuple(getattr(dy, 'shape', ())) or type(dy).__name__}")

    def _check_input(self, x, width: int, dtype=None):
        """TypeError/ValueError naming this module when ``x`` is not a float (N, width) array."""
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{self.label} expects an array, got {type(x).__name__}")
        if np.dtype(x.dtype) not in FLOAT_DTYPES:
            raise TypeError(f"{self.label} expects float32 or float64 input, got {x.dtype}")
        if dtype is not None and np.dtype(x.dtype) != np.dtype(dtype):
            raise TypeError(f"{self.label} expects {np.dtype(dtype)} input (its weights' dtype), got {x.dtype}")
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"{self.label} expects input of shape (N, {width}), got {tuple(x.shape)}")

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            sub = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class ParameterDict(Module):
    """Parameters keyed by name (PEFT keeps one ``lora_A`` per adapter name this way)."""

    def __getitem__(self, key) -> Parameter:
        return self._parameters[key]

    def __setitem__(self, key, value: Parameter):
        self._parameters[key] = value

    def __delitem__(self, key):
        del self._parameters[key]

    def __contains__(self, key):
        return key in self._parameters

    def __iter__(self):
        return iter(self._parameters)

    def __len__(self):
        return len(self._parameters)

    def keys(self):
        return self._parameters.keys()

    def extra_repr(self):
        return ", ".join(f"{k}: {tuple(p.shape)}" for k, p in self._parameters.items())


class Sequential(Module):
    """Children named "0", "1", ... applied in order; backward runs them in reverse."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __getitem__(self, i) -> Module:
        return self._modules[str(i)]

    def __len__(self):
        return len(self._modules)

    def forward(self, x):
        for m in self._modules.values():
            x = m.forward(x)
        return x

    def backward(self, dy):
        for m in reversed(self._modules.values()):
            dy = m.backward(dy)
        return dy
