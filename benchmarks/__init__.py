"""Benchmarks: a shared timing harness (harness.py), the kernel benchmark (kernels.py) and others.

Run as ``python -m benchmarks.NAME`` from the repository root. They measure the lowrank that
Python imports there: the checkout's own source folder.
"""
