"""A checkout's root is a safe place to run Python: kernels/ (lowrank.kernels) has no __init__.py,
so it never shadows the ``kernels`` package that transformers depends on, and the source folder
lowrank/ is complete (lowrank/kernels links to kernels/)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(*args, timeout=300):
    """``python ARGS`` run from the repository root, where Python puts the root first on sys.path."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_transformers_and_peft_import_from_the_root():
    done = _python("-c", "import transformers.modeling_utils, peft")
    assert done.returncode == 0, done.stderr[-2000:]


def test_python_m_pytest_runs_from_the_root():
    done = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_kernel_api.py")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


def test_the_root_imports_the_checkouts_lowrank_and_anothers_kernels():
    done = _python("-c", "import kernels, lowrank.kernels.api as api; print(kernels.__spec__.origin); "
                         "print(api.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    top, ours = done.stdout.split()
    # a virtual environment may live inside the checkout (CI's does), so compare with kernels/ itself
    assert top != "None" and not Path(top).resolve().is_relative_to((ROOT / "kernels").resolve()), \
        f"top-level kernels came from the checkout: {top}"
    assert Path(ours).resolve() == (ROOT / "kernels" / "api.py").resolve()


def test_kernels_refuse_to_be_imported_under_another_name():
    done = _python("-c", "import runpy; runpy.run_path('kernels/api.py')")
    assert done.returncode != 0 and "is the package lowrank.kernels" in done.stderr
