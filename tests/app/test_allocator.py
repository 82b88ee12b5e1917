"""The ``lowrank`` command keeps the memory a step frees (app/allocator.py): the next step reuses it
instead of faulting fresh pages in. Page faults are counted, not timed, each in a fresh process."""
import json
import platform
import subprocess
import sys

import pytest

from lowrank.app import allocator, cli

STEP = """
import ctypes, json, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)       # PR_SET_THP_DISABLE: 4 KiB pages, whatever the THP setting
import numpy as np
from lowrank.app import allocator
applied = allocator.keep_freed_memory() if sys.argv[1] == "keep" else None
def step():                                   # a decoder step's temporaries: six 4 MiB arrays, then freed
    a = [np.ones((1024, 1024), np.float32) for _ in range(6)]
    del a
step(); step()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(json.dumps({"applied": applied, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5}))
"""
PAGES_PER_STEP = 6 * 4 * 2**20 // 4096        # 6144 pages of 4 KiB

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's; other C libraries are left as they are")


def faults_per_step(mode):
    """Run STEP in a fresh interpreter, away from the checkout, so it imports the installed lowrank."""
    out = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@glibc
def test_by_default_glibc_faults_the_freed_pages_in_again_every_step():
    """The defect the setting fixes (counted in 4 KiB pages: STEP turns transparent huge pages off)."""
    assert faults_per_step("default")["faults"] > PAGES_PER_STEP / 4


@glibc
def test_kept_memory_is_reused_by_the_next_step():
    res = faults_per_step("keep")
    assert res["applied"] is True
    assert res["faults"] < PAGES_PER_STEP / 100


def test_only_the_command_sets_it(monkeypatch):
    """main() from the console script applies it; main(argv) called from Python, and importing
    lowrank, leave the process's allocator alone."""
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli.signal, "signal", lambda *args: None)      # and pytest keeps its SIGPIPE handling
    assert cli.main(["inspect", "/nonexistent/adapter"]) != 0
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["lowrank", "inspect", "/nonexistent/adapter"])
    assert cli.main() != 0
    assert calls == [1]
