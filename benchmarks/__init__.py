"""Benchmarks: a shared timing harness (harness.py), the kernel benchmark (kernels.py) and others.

They measure the installed lowrank (``pip install .``, or ``pip install -e .`` to develop). Run
as ``python -m benchmarks.NAME`` from the repository root, Python puts the root first on
sys.path, where the source folder lowrank/ would shadow the installed package (and lacks
lowrank.kernels, which setup.cfg installs from kernels/): the root goes last instead, so the
installed package is found first and this package still imports.
"""
import os as _os
import sys as _sys

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_front = [p for p in _sys.path if _os.path.abspath(p or ".") == _root]
if "lowrank" not in _sys.modules and _front:
    _sys.path[:] = [p for p in _sys.path if p not in _front] + _front
