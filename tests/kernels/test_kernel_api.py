"""Every kernel backend is a folder with the same files, and exposes api.API with exactly the
NumPy reference's signatures, each function in the file of the same name."""
import ast
import inspect
import re
from pathlib import Path

import pytest

from lowrank.kernels import api, backends
from lowrank.kernels import reference

ROOT = Path(api.__file__).parent
BACKENDS = sorted(backends.MODULES.values())


def _public_functions(module):
    """The public functions defined in ``module`` (not the helpers it imports)."""
    return {n for n, f in vars(module).items()
            if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__}


def _home(name):
    """The file each API function lives in: lora.py, multi.py or nf4.py (the reference's choice)."""
    return getattr(reference, name).__module__.rsplit(".", 1)[1]


def test_reference_exposes_exactly_the_api():
    functions = set().union(*(_public_functions(getattr(reference, f)) for f in api.FILES))
    assert functions == set(api.API)
    assert set(api.API) <= set(reference.__all__)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_folder_has_the_same_files(backend):
    files = {p.stem for p in (ROOT / backend).glob("*.py")}
    assert set(api.FILES) | {"__init__"} <= files, f"{backend}/ lacks {set(api.FILES) - files}"
    for legacy in ("reference_nf4", "numba_multi", "numba_nf4", "nf4_avx2", "cuda_launch", "cupy_gpu"):
        assert not (ROOT / f"{legacy}.py").exists(), f"kernels/{legacy}.py is back beside the backend folders"


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_file_has_the_reference_banners_in_order(backend):
    """numba_cpu/multi.py reads line for line against cupy_gpu/multi.py: the same banners, same order."""
    def banners(path):
        return [re.sub(r"-+$", "", line).strip() for line in path.read_text().splitlines() if line.startswith("# -- ")]
    for f in api.FILES:
        assert banners(ROOT / backend / f"{f}.py") == banners(ROOT / "reference" / f"{f}.py"), f"{backend}/{f}.py"


@pytest.mark.parametrize("backend", sorted(backends.MODULES))
def test_backend_signatures_equal_the_reference(backend):
    try:
        module = backends.load(backend)
    except ImportError as e:                  # only CuPy is optional; Numba is required and must import
        if backend != "cupy":
            raise
        pytest.skip(f"{backend}: no CuPy here ({e})")
    for name in api.API:
        fn = getattr(module, name, None)
        assert callable(fn), f"{module.__name__} lacks {name}"
        assert inspect.signature(fn) == inspect.signature(getattr(reference, name)), \
            f"{module.__name__}.{name}{inspect.signature(fn)} != reference{inspect.signature(getattr(reference, name))}"
        assert fn.__module__ == f"{module.__name__}.{_home(name)}", f"{module.__name__}.{name} lives in {fn.__module__}"
        assert fn is getattr(getattr(module, _home(name)), name)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown kernel backend 'fortran'"):
        backends.load("fortran")


def test_no_backend_imports_another_backends_private_names():
    """Shared helpers live in common.py / validate.py; a backend may call the reference only through its API."""
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not any(a.name.startswith("_") for a in node.names), f"{path}: imports {ast.dump(node)}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "reference":
                assert not node.attr.startswith("_"), f"{path}: reference.{node.attr}"


def test_cupy_backend_signatures_from_its_source():
    """Without CuPy the package can't be imported, but its source still states its signatures:
    parse each file, so a drifted GPU signature (or a function in the wrong file) fails CI too."""
    for name in api.API:
        path = ROOT / "cupy_gpu" / f"{_home(name)}.py"
        defs = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert name in defs, f"cupy_gpu/{path.name} lacks {name}"
        a = defs[name].args
        params = [p.arg for p in a.posonlyargs + a.args]
        defaults = [ast.literal_eval(d) for d in a.defaults]
        want = inspect.signature(getattr(reference, name)).parameters.values()
        assert params == [p.name for p in want], f"cupy_gpu.{name} parameters {params}"
        assert defaults == [p.default for p in want if p.default is not inspect.Parameter.empty], \
            f"cupy_gpu.{name} defaults {defaults}"
        assert not a.kwonlyargs and a.vararg is None and a.kwarg is None
    init = ast.parse((ROOT / "cupy_gpu" / "__init__.py").read_text())
    exported = {a.name for n in init.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert set(api.API) <= exported


def test_the_reference_states_each_equation_once():
    """Each API function of the reference opens with its ``Semantics:`` line; the other backends say
    only how they compute it (a second copy of an equation is one that can drift)."""
    for name in api.API:
        assert getattr(reference, name).__doc__.startswith("Semantics: "), f"reference.{name}"
    for backend in ("numba_cpu", "cupy_gpu"):
        for f in api.FILES:
            tree = ast.parse((ROOT / backend / f"{f}.py").read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.FunctionDef)):
                    assert "Semantics:" not in (ast.get_docstring(node) or ""), f"{backend}/{f}.py"
