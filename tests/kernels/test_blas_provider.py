"""numba_cpu's BLAS (kernels/numba_cpu/blas.py ``PROVIDER``, mkl.py): LOWRANK_BLAS picks SciPy's OpenBLAS or MKL
once per process, 'auto' takes MKL where it is installed (a test dependency on x86-64 Linux), the pool's products
and kernels conform on either, one thread's products are MKL's tasks, and a wrong or missing choice says what to do."""
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowrank.kernels import config
from lowrank.kernels.numba_cpu import blas, mkl, pool

ROOT = Path(__file__).resolve().parents[2]
MKL_WHEEL = sys.platform == "linux" and platform.machine() == "x86_64"     # where the test extra installs it


def _python(code: str, choice: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOWRANK_BLAS": choice}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_each_choice_loads_that_blas_and_auto_prefers_mkl():
    code = "from lowrank.kernels.numba_cpu import blas; print(blas.PROVIDER)"
    got = {choice: _python(code, choice) for choice in ("scipy", "mkl", "auto")}
    assert got["scipy"].stdout.split() == ["scipy"], got["scipy"].stderr
    if MKL_WHEEL:
        assert got["mkl"].stdout.split() == ["mkl"], got["mkl"].stderr
        assert got["auto"].stdout.split() == ["mkl"], got["auto"].stderr
    else:
        assert got["mkl"].returncode != 0 and 'pip install "lowrank[mkl]"' in got["mkl"].stderr
        assert got["auto"].stdout.split() == ["scipy"], got["auto"].stderr


@pytest.mark.skipif(not MKL_WHEEL, reason="the mkl wheel exists for x86-64 only: one BLAS here")
def test_the_pool_products_and_kernels_conform_on_the_other_blas():
    """This process runs the whole suite on one BLAS (MKL where installed); the other runs the pool's tests."""
    other = "scipy" if blas.PROVIDER == "mkl" else "mkl"
    code = ("import sys, pytest\nfrom lowrank.kernels.numba_cpu import blas\n"
            f"assert blas.PROVIDER == {other!r}, blas.PROVIDER\n"
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/kernels/test_pool.py',"
            " 'tests/kernels/test_kernels_numba.py']))")
    run = _python(code, other)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


@pytest.mark.parametrize("M, K, N, lead", [(3, 70, 50, ()), (200, 40, 300, ()), (64, 64, 100, (2, 3)),
                                           (1, 500, 800, ()), (800, 500, 1, ())])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_threads_products_are_the_blas_tasks_and_equal_numpy(M, K, N, lead, dtype):
    """With MKL one thread's products are GEMM tasks too (NumPy's own BLAS is OpenBLAS), but for the tiny ones
    (``config.NUMBA_POOL_MIN_MACS``); with SciPy's they are NumPy's. Either way equal to float64 NumPy, on
    transposed operands, a broadcast batch, and a row or a column (GEMV)."""
    rng = np.random.default_rng(M * K + N)
    a = rng.standard_normal(lead + (K, M)).swapaxes(-1, -2)              # a transposed view
    b = rng.standard_normal((1,) * len(lead) + (K, N))                   # broadcast over a's batch
    with pool.limit(1):
        y = blas.matmul(a.astype(dtype), b.astype(dtype), alpha=0.5)
        plan = blas._make_plan(a.astype(dtype), b.astype(dtype), pool.threads())
    np.testing.assert_allclose(y, 0.5 * (a @ b), rtol=config.RTOL[dtype], atol=config.ATOL[dtype] * np.sqrt(K))
    big = np.prod(lead, dtype=int) * M * K * N >= config.NUMBA_POOL_MIN_MACS
    assert (plan.tasks is not None) == (blas.PROVIDER == "mkl" and big)


def test_a_wrong_choice_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"LOWRANK_BLAS .* must be 'auto', 'mkl' or 'scipy', got 'openblas'"):
        blas._provider("openblas")


def test_mkl_asked_for_but_absent_says_how_to_install_it_and_auto_falls_back(monkeypatch, tmp_path):
    with pytest.raises(ImportError, match=r"no libmkl_rt.* pip install \"lowrank\[mkl\]\".*LOWRANK_BLAS=scipy"):
        mkl.load([])
    missing = tmp_path / "libmkl_rt.so.3"
    with pytest.raises(ImportError, match=str(missing)):
        mkl.load([str(missing)])
    monkeypatch.setattr(mkl, "library_paths", lambda: [])
    with pytest.raises(ImportError):
        blas._provider("mkl")
    assert blas._provider("auto")[0] == "scipy"
