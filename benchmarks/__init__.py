"""Benchmarks: a shared timing harness (harness.py) and the kernel benchmark (kernels.py)."""
