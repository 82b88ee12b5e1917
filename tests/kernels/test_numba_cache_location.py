"""Where numba_cpu's compiled kernels are cached (kernels/numba_cpu/cache.py, issue #29): beside the sources when
that folder is writable, else in the user's cache, else in a private temporary folder, so a read-only install
still imports and caches. Each run is a fresh process on a copy of the package; a folder is made unwritable
by failing Numba's own writability check there (as root, file modes would not stop the write)."""
import json
import os
import stat
import subprocess
import sys

import pytest

from test_numba_cache import _copy_of_the_package

RUN = """
import json, os, sys
from numba.core import caching
READ_ONLY = json.loads(sys.argv[1])
real = caching._CacheLocator.ensure_cache_path

def ensure_cache_path(self):
    if any(self.get_cache_path().startswith(p) for p in READ_ONLY):
        raise PermissionError(13, "Read-only file system", self.get_cache_path())
    return real(self)
caching._CacheLocator.ensure_cache_path = ensure_cache_path

import numpy as np
from lowrank.kernels.numba_cpu import activations, cache
g = np.linspace(-3, 3, 7, dtype=np.float32)
y = activations.silu_and_mul(g, np.ones(7, np.float32))
print(json.dumps({"dir": cache.cache_dir(), "y": y.tolist()}))
"""


def run(tmp_path, read_only):
    env = _copy_of_the_package(tmp_path)
    del env["NUMBA_CACHE_DIR"]
    env.pop("XDG_CACHE_HOME", None)
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    out = subprocess.run([sys.executable, "-c", RUN, json.dumps([str(tmp_path / p) for p in read_only])],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cached_files(folder):
    return sorted(p.name for p in folder.rglob("activations.*.nbi"))


@pytest.mark.parametrize("read_only, where", [
    ([], "kernels/numba_cpu/__pycache__"),
    (["kernels", "lowrank"], "home/.cache/numba"),
    (["kernels", "lowrank", "home"], f"tmp/lowrank-numba-{os.getuid()}"),
])
def test_a_read_only_install_still_caches_its_kernels(tmp_path, read_only, where):
    out = run(tmp_path, read_only)
    assert os.path.realpath(out["dir"]).startswith(os.path.realpath(tmp_path / where)), out["dir"]
    assert cached_files(tmp_path / where)                               # the kernel it ran was written there
    for other in {"kernels", "home", "tmp"} - {where.split("/")[0]}:
        assert not cached_files(tmp_path / other), other
    if where.startswith("tmp"):
        assert stat.S_IMODE((tmp_path / where).stat().st_mode) == 0o700


def test_a_temporary_folder_others_may_write_is_not_used(tmp_path, monkeypatch):
    from lowrank.kernels.numba_cpu import cache
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    (tmp_path / f"lowrank-numba-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"lowrank-numba-{os.getuid()}", 0o777)
    with pytest.raises(PermissionError, match="only this user may write"):
        cache._private_temp_dir()
