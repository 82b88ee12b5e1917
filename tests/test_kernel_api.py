"""Every kernel backend exposes kernels.API with exactly the NumPy reference's signatures."""
import importlib
import inspect

import pytest

from lowrank import kernels
from lowrank.kernels import reference


def test_reference_exposes_exactly_the_api():
    public = {n for n, f in vars(reference).items() if inspect.isfunction(f) and not n.startswith("_")}
    assert public == set(kernels.API)


@pytest.mark.parametrize("backend", sorted(kernels.MODULES))
def test_backend_signatures_equal_the_reference(backend):
    try:
        module = kernels.load(backend)
    except ImportError as e:                  # only CuPy is optional; Numba is required and must import
        if backend != "cupy":
            raise
        pytest.skip(f"{backend}: no CuPy here ({e})")
    for name in kernels.API:
        fn = getattr(module, name, None)
        assert callable(fn), f"{module.__name__} lacks {name}"
        assert inspect.signature(fn) == inspect.signature(getattr(reference, name)), \
            f"{module.__name__}.{name}{inspect.signature(fn)} != reference{inspect.signature(getattr(reference, name))}"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel backend 'fortran'"):
        kernels.load("fortran")


def test_numba_module_reexports_the_multi_kernels():
    nb = importlib.import_module("lowrank.kernels.numba_cpu")
    multi = importlib.import_module("lowrank.kernels.numba_multi")
    for name in ("lora_forward_multi", "lora_backward_multi", "lora_forward_sgmv", "lora_backward_sgmv"):
        assert getattr(nb, name) is getattr(multi, name)


def test_cupy_backend_signatures_from_its_source():
    """Without CuPy the module can't be imported, but its source still states its signatures:
    parse it, so a drifted GPU signature fails CI too (where no GPU and no CuPy exist)."""
    import ast
    from pathlib import Path

    source = Path(kernels.__file__).with_name("cupy_gpu.py").read_text()
    defs = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    for name in kernels.API:
        assert name in defs, f"cupy_gpu lacks {name}"
        a = defs[name].args
        params = [p.arg for p in a.posonlyargs + a.args]
        defaults = [ast.literal_eval(d) for d in a.defaults]
        want = inspect.signature(getattr(reference, name)).parameters.values()
        assert params == [p.name for p in want], f"cupy_gpu.{name} parameters {params}"
        assert defaults == [p.default for p in want if p.default is not inspect.Parameter.empty], \
            f"cupy_gpu.{name} defaults {defaults}"
        assert not a.kwonlyargs and a.vararg is None and a.kwarg is None
