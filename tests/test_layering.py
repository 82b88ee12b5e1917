"""The folders are the layers, and imports run one way: down.

    kernels ← nn ← io ← models ← tuners ← training ← analysis ← app

Each module of ``lowrank/`` (``kernels/`` as ``lowrank/kernels``, its link) is parsed (``ast``, so lazy imports inside
functions count too); an import of a higher layer, or any import circle between modules,
fails here with the modules named. Inside one folder, modules may import each other as
long as they form no circle.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["kernels", "nn", "io", "models", "tuners", "training", "analysis", "serving", "app"]
TOP_LEVEL = {"lowrank", "lowrank.__main__"}          # the public API gathers every layer; it is imported by none


def module_files() -> dict[str, Path]:
    """Dotted module name -> file."""
    found = {}
    for folder, _, files in os.walk(ROOT / "lowrank", followlinks=True):
        for path in (Path(folder) / f for f in files if f.endswith(".py")):
            parts = ["lowrank", *path.relative_to(ROOT / "lowrank").with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = module_files()
NAMESPACES = {m.rpartition(".")[0] for m in MODULES} - set(MODULES)     # folders without __init__.py


def layer_of(module: str) -> int | None:
    """Index in LAYERS of a lowrank module; None for the top-level package itself."""
    if module in TOP_LEVEL:
        return None
    folder = module.split(".")[1]
    assert folder in LAYERS, f"{module}: every module lives in one of the layer folders {LAYERS}"
    return LAYERS.index(folder)


def imports_of(module: str) -> set[str]:
    """The lowrank modules ``module`` imports, wherever in the file (resolving relative imports)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = ([source] if node.module else []) + [f"{source}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES and name not in NAMESPACES:   # `from x import f` -> module x
                name = name.rpartition(".")[0]
            if name in NAMESPACES:                           # nothing runs on importing a namespace package
                continue
            if name and name != module:
                out.add(name)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_in_a_layer_folder():
    for m in MODULES:
        layer_of(m)


def test_no_import_climbs_to_a_higher_layer():
    climbs = [f"{m} imports {t}" for m, targets in GRAPH.items() if layer_of(m) is not None
              for t in targets if t in TOP_LEVEL or layer_of(t) > layer_of(m)]
    assert not climbs, "\n".join(climbs)


def test_kernels_import_nothing_of_lowrank_but_kernels():
    leaks = [f"{m} imports {t}" for m, targets in GRAPH.items() if m.startswith("lowrank.kernels")
             for t in targets if not t.startswith("lowrank.kernels")]
    assert not leaks, "\n".join(leaks)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None (depth-first search)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_circle():
    """Package inits included: a module that imports its own package's __init__ closes a circle."""
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("graph, circle", [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
                                           ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False)])
def test_the_circle_finder_finds_circles(graph, circle):
    assert (find_cycle(graph) is not None) == circle


def test_the_import_parser_sees_lazy_and_relative_imports():
    dispatch = GRAPH["lowrank.nn.dispatch"]
    assert "lowrank.kernels.backends" in dispatch and "lowrank.nn.device" in dispatch
