"""The one place for kernel tunables and the tolerances the tests hold kernels to.

Tests shrink block sizes here so that tiny inputs cross block borders.
Each backend reads its own section; nothing else hard-codes these numbers.
"""

# --- tolerances: every backend vs the NumPy reference (O(1) data) -------------------
RTOL = {"float16": 1e-2, "float32": 1e-5, "float64": 1e-12}
ATOL = {"float16": 1e-2, "float32": 1e-5, "float64": 1e-12}

# --- numba_cpu ------------------------------------------------------------------------

# --- cupy_gpu -------------------------------------------------------------------------

# --- NF4 (QLoRA) ----------------------------------------------------------------------
