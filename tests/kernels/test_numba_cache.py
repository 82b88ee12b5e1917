"""numba_cpu's on-disk kernel cache (kernels/numba_cpu/cache.py): an edit to a helper that kernels compile
in (vexp.exp here) reaches them in the next process, with no cache file deleted by hand; and the serial and
parallel compilations of one loop are stored apart. Each run is a fresh Python process on a copy of the
package, with its own NUMBA_CACHE_DIR."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "lowrank").is_dir() and (p / "kernels").is_dir())

RUN = """
import json, numpy as np
from lowrank.kernels.numba_cpu import activations
g = np.linspace(-3, 3, 7, dtype=np.float32)
u = np.ones(7, np.float32)
kernel = activations._forward
kernel.serial(g, u, np.float32(1), np.empty(7, np.float32))
kernel.parallel(g, u, np.float32(1), np.empty(7, np.float32))
y = activations.silu_and_mul(g, u)
print(json.dumps({"y": y.tolist(), "hits": [kernel.serial.stats.cache_hits[kernel.serial.signatures[0]],
                                            kernel.parallel.stats.cache_hits[kernel.parallel.signatures[0]]]}))
"""


def _copy_of_the_package(tmp_path):
    """lowrank/ and kernels/ (lowrank/kernels links to it) copied, without caches, and a cache folder."""
    for name in ("lowrank", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "checkpoints"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "NUMBA_CACHE_DIR": str(tmp_path / "numba_cache")}
    return env


def _run(tmp_path, env):
    """RUN in a fresh process on the copy: SwiGLU's values and each compilation's cache hits."""
    out = subprocess.run([sys.executable, "-c", RUN], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_edited_helper_reaches_the_cached_kernels_that_inline_it(tmp_path):
    env = _copy_of_the_package(tmp_path)
    first = _run(tmp_path, env)
    assert first["hits"] == [0, 0]                                  # compiled, and written to the cache
    again = _run(tmp_path, env)
    assert again["hits"] == [1, 1] and again["y"] == first["y"]     # both twins from the cache, each its own
    g = np.linspace(-3, 3, 7, dtype=np.float32)
    np.testing.assert_allclose(first["y"], g / (1 + np.exp(-g)), rtol=1e-6)

    vexp = tmp_path / "kernels" / "numba_cpu" / "vexp.py"       # e^x becomes 2 e^x in float32
    text = vexp.read_text()
    assert text.count("return y if x == x else x") == 2
    vexp.write_text(text.replace("return y if x == x else x", "return 2 * y if x == x else x", 1))
    edited = _run(tmp_path, env)
    assert edited["hits"] == [0, 0]                                 # recompiled, not loaded
    np.testing.assert_allclose(edited["y"], g / (1 + 2 * np.exp(-g)), rtol=1e-6)


def test_the_serial_and_parallel_compilations_are_stored_apart(tmp_path):
    """One Python function, two compilations: Numba's own key (signature, CPU, bytecode) is the same for
    both, so without the parallel flag in the key the second would overwrite the first's entry."""
    env = _copy_of_the_package(tmp_path)
    _run(tmp_path, env)
    stored = sorted(p.name for p in (tmp_path / "numba_cache").rglob("activations._forward*.nbc"))
    assert len(stored) == 2, stored
