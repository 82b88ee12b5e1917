"""All-or-nothing file writes.

Files: ``commit(root, {path: bytes})`` writes several files, in ``root`` and folders under it
(an adapter's config and tensors; several adapters), as one commit. It holds a lock on
``root/.lowrank.lock`` (``filelock``; the kernel drops it if the process dies) for the whole
commit, so two lowrank writers never interleave. Under the lock it removes the temporaries
and backups of the target files that a killed save left behind, writes every file to a
temporary next to its target (flushed and fsynced), keeps the previous files under hard-link
backups, then renames the temporaries into place: ``os.replace`` with ``overwrite=True``,
else ``os.link``, which fails if the target appeared after the check (a writer that takes
no lock). If anything fails before the last rename, every target gets its previous bytes
back. A power cut between two renames can still leave new tensors beside an old config;
adapter_files binds the two with a hash of the config, so such a mix is refused at load.

Models: ``lowrank.nn.snapshot.all_or_nothing`` is the same promise for a model in memory.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from filelock import FileLock

LOCK_NAME = ".lowrank.lock"
TAGS = ("tmp", "bak")                     # .<target name>.<tag>-<8 hex digits>


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


def _remove_leftovers(target: Path):
    """Delete the temporaries and backups of ``target`` that a killed save left (call under the lock)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.({'|'.join(TAGS)})-[0-9a-f]{{8}}")
    if target.parent.is_dir():
        for p in target.parent.iterdir():
            if pattern.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)


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
    commit(Path(path).parent, {Path(path): data}, overwrite=overwrite)


def commit_files(directory, files: dict, overwrite: bool = False):
    """Write ``{file name: bytes}`` into ``directory`` (created if needed) as one commit."""
    commit(directory, {Path(directory) / name: data for name, data in files.items()}, overwrite=overwrite)


def commit(root, files: dict, overwrite: bool = False):
    """Write ``{path: bytes}`` (paths in ``root`` or below it) as one commit: all new or all old.

    Existing files are replaced only with ``overwrite=True`` (else FileExistsError, and
    nothing is written). Folders are created as needed, and removed again if the commit
    fails (``root`` itself keeps its lock file).
    """
    root, targets = Path(root), [Path(t) for t in files]
    outside = [str(t) for t in targets if root.resolve() not in t.resolve().parents]
    if outside:
        raise ValueError(f"commit: {outside} are not inside {root}")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / LOCK_NAME)):
        for t in targets:
            _remove_leftovers(t)
        existing = [str(t) for t in targets if t.exists()]
        if existing and not overwrite:
            raise FileExistsError(f"refusing to overwrite {existing}; pass overwrite=True to replace them")
        _commit_locked(root, dict(zip(targets, files.values())), overwrite)


def _commit_locked(root: Path, files: dict, overwrite: bool):
    """commit's writes and renames, under the lock; rolled back together if any step fails."""
    created = [d for d in dict.fromkeys(t.parent for t in files) if not d.exists()]
    temps, backups, done = {}, {}, []
    try:
        for d in created:
            d.mkdir(parents=True, exist_ok=True)
        for target, data in files.items():
            temps[target] = write_temp(target, data)
        for target in files:
            if target.exists():
                backups[target] = _temp_path(target, "bak")
                os.link(target, backups[target])           # the old bytes keep a name until we finish
        for target, tmp in temps.items():
            if overwrite:
                os.replace(tmp, target)
            else:
                _link_new(tmp, target)
            done.append(target)
        for d in dict.fromkeys(t.parent for t in files):
            _fsync_dir(d)
    except BaseException:
        for target in reversed(done):
            if target in backups:
                os.replace(backups.pop(target), target)
            else:
                target.unlink(missing_ok=True)
        for p in [*temps.values(), *backups.values()]:
            p.unlink(missing_ok=True)
        for d in reversed(created):
            if d != root and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    for p in [*temps.values(), *backups.values()]:
        p.unlink(missing_ok=True)


def _link_new(tmp: Path, target: Path):
    """Give ``tmp``'s file the name ``target``, which must not exist (checked in the same step)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite ['{target}']: it appeared while saving (another "
                              f"writer?); pass overwrite=True to replace it") from None
