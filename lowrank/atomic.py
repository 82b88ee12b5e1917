"""All-or-nothing file writes and all-or-nothing model changes.

Files: every file is written to a temporary file in its own directory, flushed and
fsynced, then renamed over the target (``os.replace`` is atomic on POSIX). A crash or an
exception before the rename leaves the previous file untouched; the temporary file is
removed. ``commit_files`` writes several files of one directory (an adapter's config and
tensors) this way: all temporaries first, then the renames, restoring the previous files
from hard-link backups if a rename fails midway. It refuses to replace existing files
unless ``overwrite=True``. A power cut between two renames can still leave the new
tensors beside the old config; an exception cannot.

Models: ``all_or_nothing(module)`` snapshots every module's attributes and every
parameter's (data, grad, trainable) and puts them back exactly if the block raises, so a
load that fails midway leaves the model as it was, down to object identity.
"""
from __future__ import annotations

import copy
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _fsync_dir(directory: Path):
    """Make a rename inside ``directory`` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_path(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{secrets.token_hex(4)}")


def write_temp(target: Path, data: bytes) -> Path:
    """Write ``data`` to a fresh temporary file next to ``target``; flushed and fsynced."""
    tmp = _temp_path(target, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path, data: bytes, overwrite: bool = False):
    """Write one file atomically: the target holds either its old bytes or all of ``data``."""
    commit_files(Path(path).parent, {Path(path).name: data}, overwrite=overwrite)


def commit_files(directory, files: dict, overwrite: bool = False):
    """Write ``{file name: bytes}`` into ``directory`` (created if needed), each file atomically.

    Existing files are replaced only with ``overwrite=True`` (else FileExistsError before
    anything is written). Files are renamed into place in the order given; if one rename
    fails, the files already replaced get their previous bytes back.
    """
    directory = Path(directory)
    targets = [directory / name for name in files]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {existing}; pass overwrite=True to replace them")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    temps, backups, done = [], {}, []
    try:
        for target, data in zip(targets, files.values()):
            temps.append(write_temp(target, data))
        for target in targets:
            if target.exists():
                backups[target] = _temp_path(target, "bak")
                os.link(target, backups[target])           # the old bytes keep a name until we finish
        for target, tmp in zip(targets, temps):
            os.replace(tmp, target)
            done.append(target)
        _fsync_dir(directory)
    except BaseException:
        for target in reversed(done):
            if target in backups:
                os.replace(backups.pop(target), target)
            else:
                target.unlink(missing_ok=True)
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        for bak in backups.values():
            bak.unlink(missing_ok=True)
        if created and not any(directory.iterdir()):
            directory.rmdir()
        raise
    for bak in backups.values():
        bak.unlink(missing_ok=True)


def _snapshot_value(v):
    """Containers are copied one level deep; random generators fully (their state advances)."""
    if isinstance(v, np.random.Generator):
        return copy.deepcopy(v)
    if isinstance(v, (dict, list, set)):
        return copy.copy(v)
    return v


@contextmanager
def all_or_nothing(*modules):
    """Run the block; if it raises, put every module reachable from ``modules`` back exactly.

    Restores each module's attributes (children, parameter tables, per-adapter dicts,
    paths, training flags) and each parameter's data, grad and trainable flag.
    """
    saved_modules = {id(m): (m, {k: _snapshot_value(v) for k, v in m.__dict__.items()})
                     for root in modules for _, m in root.named_modules()}
    saved_params = {id(p): (p, p.data, p.grad, p.trainable)
                    for root in modules for _, p in root.named_parameters()}
    try:
        yield
    except BaseException:
        for m, state in saved_modules.values():
            m.__dict__.clear()
            m.__dict__.update(state)
        for p, data, grad, trainable in saved_params.values():
            p.data, p.grad, p.trainable = data, grad, trainable
        raise
