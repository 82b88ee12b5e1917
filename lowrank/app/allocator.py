"""How the ``lowrank`` command's process allocates: glibc keeps the memory a training step frees.

A decoder step allocates tens of MB of temporaries (attention probabilities, 4 MiB per layer at
the peers shape; the MLP's activations) and frees them at its end. glibc's malloc hands the
freed top of its heap back to the kernel once it exceeds a trim threshold, so the next step
faults every page in again: a decoder step of the peers benchmark, run alone, faulted about
5,600 pages (23 MB) per step, and ``lowrank lm demo --threads 1`` spent 35 s of its 228 s in the
kernel; with the heap kept it took 188 s, 0.6 s in the kernel.

This is the process owner's choice, not a library's, so only the command makes it (``cli.main``);
``import lowrank`` changes nothing. The cost: the process keeps up to 1 GiB of freed heap for reuse
instead of returning it. Other C libraries (musl, macOS) are left as they are.
"""
from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1          # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 1 << 30           # freed heap kept for reuse, at most
MMAP_BYTES = 32 << 20          # blocks up to this come from the heap (glibc's own maximum); larger ones are mapped


def keep_freed_memory() -> bool:
    """On glibc, fix the mmap threshold at 32 MiB and the trim threshold at 1 GiB; True when applied.
    Both are needed: setting either one turns off glibc's dynamic threshold, and with the mmap
    threshold left at its initial 128 KiB every temporary would be mapped and unmapped each step."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
