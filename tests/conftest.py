"""Shared test setup: the hypothesis profiles and small helpers."""
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# CI: derandomized, bounded, no deadline (Numba compiles on first call), so runs are
# reproducible and fast. "dev": more examples, random, for local bug hunting.
settings.register_profile("ci", derandomize=True, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The benchmarks (not installed) are importable from the repository root; appended, so an
# installed lowrank package still comes first and is the one under test.
sys.path.append(str(Path(__file__).resolve().parents[1]))


def _mpiexec():
    """The mpiexec of this environment (next to python), else the one on PATH, else None."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.access(local, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="MPI tests need mpi4py and an mpiexec: pip install 'lowrank[mpi]' (mpi4py + mpich)")


def mpirun(*args, ranks=2, timeout=60):
    """Run ``args`` under mpiexec -n ranks; a hang fails after ``timeout`` s."""
    env = {**os.environ, "HYDRA_LAUNCHER": "fork", "OMPI_ALLOW_RUN_AS_ROOT": "1",
           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def cuda_launch():
    """kernels/cupy_gpu/launch.py (block-size defines, launch geometry): it imports no CuPy, but its
    package does, so without CuPy the file loads on its own, under its own name."""
    name = "lowrank.kernels.cupy_gpu.launch"
    try:
        return importlib.import_module(name)
    except ImportError:
        from lowrank.kernels import api
        path = Path(api.__file__).parent / "cupy_gpu" / "launch.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
