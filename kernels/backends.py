"""Kernel backends by name: the built-in ones, and your own.

Bring your own backend: any module (or object) with some of the ``api.API`` functions, each with
the reference's signature, registered by ``register_backend(name, module)`` or installed by a
package under the entry-point group ``lowrank.kernel_backends`` (``name = "pkg.module"``).
What it lacks is the reference's, declared once here (``Backend``), and so are the float
dtypes it does not claim in an optional ``DTYPES`` attribute (default: float32 and float64).
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import sys
import types
from importlib import import_module
from importlib.metadata import entry_points

from .api import API, FLOATS

MODULES = {"numpy": "reference", "numba": "numba_cpu", "cupy": "cupy_gpu"}

ENTRY_POINTS = "lowrank.kernel_backends"      # entry-point group of installed third-party backends
DEFAULT_DTYPES = ("float32", "float64")       # what a backend claims when it has no DTYPES attribute
BUILTIN_DTYPES = {"numpy": FLOATS, "numba": DEFAULT_DTYPES, "cupy": FLOATS}   # numba: float16 is the reference's
_registry: dict = {}                          # name -> Backend, filled by register_backend / entry points


def load(backend: str):
    """The kernel package for a built-in ``backend`` ('numpy', 'numba' or 'cupy'), or the ``Backend``
    registered (or installed as an entry point) under that name; ImportError if unavailable."""
    if backend in MODULES:
        return import_module(f"{__package__}.{MODULES[backend]}")
    if backend not in _registry:
        found = _entry_points().get(backend)
        if found is None:
            raise ValueError(f"unknown kernel backend {backend!r}; choose one of {sorted(MODULES)} "
                             f"or a registered one {registered()}")
        register_backend(backend, found.load())
    return _registry[backend]


def names() -> list:
    """Every backend name: the built-in ones, then those registered or installed (not loaded)."""
    return list(MODULES) + registered()


def registered() -> list:
    """The names of backends registered here or installed as entry points (not loaded)."""
    return sorted(set(_registry) | set(_entry_points()))


def is_backend(name: str) -> bool:
    """True for a built-in, registered or installed backend name (without loading it)."""
    return name in MODULES or name in _registry or name in _entry_points()


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


# -- bring your own backend -------------------------------------------------------------------
class Backend(types.SimpleNamespace):
    """A registered backend: every ``API`` function, native where ``module`` has it, the reference's
    otherwise (the one place that fallback is declared). ``native``/``fallback`` name which is which;
    ``dtypes`` are the floats it claims (others run the reference)."""

    def __repr__(self):
        return f"<kernel backend {self.name!r} from {self.source}: {len(self.native)}/{len(API)} native>"


def register_backend(name: str, module, *, replace: bool = False) -> Backend:
    """Make ``module`` (a module, any object with API functions, an import path or a .py file) the
    kernel backend ``name``: then ``lr.set_backend(name)``, ``layer.backend = name`` route through it.

    TypeError, listing every mismatch, when a function's signature differs from the reference's
    or it has no API function at all; ValueError for a built-in or already taken name.
    """
    if name in MODULES or name == "auto" or not isinstance(name, str) or not name:
        raise ValueError(f"backend name {name!r} is taken by a built-in backend (or not a name)")
    backend = as_backend(module, name)
    if name in _registry and _registry[name].module is not backend.module and not replace:
        raise ValueError(f"kernel backend {name!r} is already registered ({_registry[name].source}); "
                         f"pass replace=True to swap it")
    _registry[name] = backend
    return backend


def unregister_backend(name: str):
    """Forget backend ``name`` (a no-op for names never registered)."""
    _registry.pop(name, None)


def resolve(spec) -> Backend:
    """The ``Backend`` for a name (built-in, registered or installed), a module, an import path or a .py file."""
    if isinstance(spec, Backend):
        return spec
    if isinstance(spec, str) and is_backend(spec):
        b = load(spec)
        return b if isinstance(b, Backend) else as_backend(b, spec, BUILTIN_DTYPES[spec])
    return as_backend(spec)


def as_backend(module, name: str | None = None, dtypes=None) -> Backend:
    """``module`` checked and completed into a ``Backend`` without registering it (see register_backend);
    ``dtypes`` overrides its ``DTYPES``."""
    module = _import(module) if isinstance(module, (str, os.PathLike)) else module
    from . import reference
    native = [n for n in API if callable(getattr(module, n, None))]
    source = getattr(module, "__name__", type(module).__name__)
    if not native:
        raise TypeError(f"{source} is not a kernel backend: it defines none of {', '.join(API)}")
    bad = [f"  {n}{_signature(getattr(module, n))}  !=  reference {n}{_signature(getattr(reference, n))}"
           for n in native if _params(getattr(module, n)) != _params(getattr(reference, n))]
    if bad:
        raise TypeError(f"{source} is not a kernel backend: signatures differ from the reference's\n"
                        + "\n".join(bad))
    dtypes = tuple(str(d) for d in (dtypes or getattr(module, "DTYPES", DEFAULT_DTYPES)))
    if "float32" not in dtypes or not set(dtypes) <= set(FLOATS):
        raise ValueError(f"{source}.DTYPES must include float32, within {FLOATS}; got {dtypes}")
    fns = {n: (_floats_to_reference(getattr(module, n), getattr(reference, n), set(FLOATS) - set(dtypes))
               if n in native else getattr(reference, n)) for n in API}
    return Backend(name=name or source.rsplit(".", 1)[-1], module=module, source=source, dtypes=dtypes,
                   native=tuple(native), fallback=tuple(n for n in API if n not in native), **fns)


def describe(backend) -> str:
    """Which API functions ``backend`` (a name, module or Backend) runs natively, which the reference runs."""
    b = resolve(backend)
    lines = [f"kernel backend {b.name!r} ({b.source}), dtypes {', '.join(b.dtypes)}"]
    lines += [f"  native     {n}" for n in b.native] + [f"  reference  {n}" for n in b.fallback]
    unclaimed = [d for d in FLOATS if d not in b.dtypes]
    if unclaimed and b.native:
        lines.append(f"  reference  every {' and '.join(unclaimed)} call")
    return "\n".join(lines)


def _params(fn) -> list:
    """(name, kind, default) per parameter: a signature without annotations."""
    try:
        return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        return [("<no signature>", "", None)]


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(<no signature>)"


def _floats_to_reference(fn, ref_fn, dtypes):
    """``fn``, except that a call whose first array (x, dy, packed) has one of ``dtypes`` runs ``ref_fn``."""
    if not dtypes:
        return fn
    lead = next(iter(inspect.signature(ref_fn).parameters))

    @functools.wraps(fn)
    def run(*args, **kwargs):
        a = args[0] if args else kwargs[lead]
        return (ref_fn if str(getattr(a, "dtype", "")) in dtypes else fn)(*args, **kwargs)
    return run


def _import(path):
    """A module from an import path ('pkg.module', or 'pkg.module:attr' for an object in it, as entry
    points write it) or a Python file ('examples/my_backend.py')."""
    path = os.fspath(path)
    if not path.endswith(".py"):
        module, _, attr = path.partition(":")
        return getattr(import_module(module), attr) if attr else import_module(module)
    if not os.path.isfile(path):
        raise ImportError(f"no backend file {path!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    name = f"lowrank_kernel_backend_{stem}"
    if getattr(sys.modules.get(name), "__file__", None) == os.path.abspath(path):
        return sys.modules[name]                                  # imported once per file
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
