"""All-or-nothing file writes.

Files: ``commit(root, {path: bytes})`` writes several files, in ``root`` and folders under it
(an adapter's config and tensors; a run's adapter and summary), as one commit. It holds a lock
on ``root/.lowrank.lock`` for the whole commit, so two lowrank writers never interleave. Under
the lock it first finishes or clears what a killed commit left (below), writes every file to a
temporary next to its target (flushed and fsynced), keeps the previous files under hard-link
backups, writes a journal ``root/.lowrank-commit.json`` listing the renames (fsynced: from here
on the commit happens), then renames the temporaries into place: ``os.replace`` with
``overwrite=True``, else ``os.link``, which fails if the target appeared after the check (a
writer that takes no lock). If anything fails, every target gets its previous bytes back.
A commit killed (or cut by a power loss) after its journal may have left new files beside old
ones: ``read_tensor_file`` refuses any file below a folder holding a journal (once a live writer's
lock shows it is not just about to finish), and the next commit
there (or ``finish_interrupted_commits``) finishes it, renaming the remaining temporaries into
place, so the files are all new. Loads don't finish it themselves: a loader has read the config
before the tensors, and may run where it can't write. A commit killed before its journal left
the old files; its temporaries and backups are deleted by the next commit of those targets.
``one_commit(root)`` gathers the commits made inside it (``save_pretrained``'s too) into one, so
a run's output folder (adapter or model, and summary) is committed as a unit.

The lock file is deleted when the lock is released: a waiter that then wakes holding the deleted
file sees that the name points elsewhere (or nowhere) and locks again (``_locked``), so no output
folder keeps one (a writer killed holding the lock leaves it, until the next holder deletes it).
Model folders and adapters also bind their tensors to the files saved with them (a hash in the
tensor file), so a mix a foreign writer leaves is refused at load.

Models: ``lowrank.nn.snapshot.all_or_nothing`` is the same promise for a model in memory.
"""
from __future__ import annotations

import contextvars
import json
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:                       # Windows: filelock's lock (_locked), whose file stays
    fcntl = None

LOCK_NAME = ".lowrank.lock"
JOURNAL_NAME = ".lowrank-commit.json"
TAGS = ("tmp", "bak")                     # .<target name>.<tag>-<8 hex digits>
_OPEN_COMMIT = contextvars.ContextVar("lowrank_one_commit", default=None)     # (root, {target: (bytes, overwrite)})


@contextmanager
def _locked(root: Path):
    """Hold ``root/.lowrank.lock`` (flock: the kernel drops it if the process dies); its file is deleted on release."""
    path = root / LOCK_NAME
    if fcntl is None:
        from filelock import FileLock
        with FileLock(str(path)):
            yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, now = os.fstat(fd), _stat(path)
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)                      # the holder before us deleted this file: lock the current one
    try:
        yield
    finally:
        try:
            os.unlink(path)               # while still locked: a waiter on this file will retry
        finally:
            os.close(fd)


def _stat(path: Path):
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


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
    fails (``root`` itself stays). Inside ``one_commit``, the files join that commit instead.
    """
    root, targets = Path(root), [Path(t) for t in files]
    _check_inside(root, targets)
    pending = _OPEN_COMMIT.get()
    if pending is not None:
        _join(pending, dict(zip(targets, files.values())), overwrite)
        return
    _commit(root, {t: (data, overwrite) for t, data in zip(targets, files.values())})


@contextmanager
def one_commit(root, overwrite: bool = False):
    """Gather every ``commit`` made in the block (below ``root``) into one commit of ``root`` when the
    block ends without an error; nothing is written if it raises. ``overwrite`` applies to every file."""
    root, pending = Path(root), {}
    token = _OPEN_COMMIT.set((root, pending, overwrite))
    try:
        yield
    finally:
        _OPEN_COMMIT.reset(token)
    outer = _OPEN_COMMIT.get()
    for target, (data, overwrite_one) in pending.items() if outer is not None else ():
        _join(outer, {target: data}, overwrite_one)         # nested: part of the enclosing commit
    if pending and outer is None:
        _commit(root, pending)


def _join(pending, files: dict, overwrite: bool):
    """Add ``files`` to the open ``one_commit``, refusing what it would refuse when it commits."""
    root, gathered, overwrite_all = pending
    _check_inside(root, list(files))
    existing = [str(t) for t in files if t.exists()] if not (overwrite or overwrite_all) else []
    if existing:
        raise FileExistsError(f"refusing to overwrite {existing}; pass overwrite=True to replace them")
    twice = [str(t) for t in files if t in gathered]
    if twice:
        raise ValueError(f"one_commit: {twice} written twice in one commit")
    gathered.update({t: (data, overwrite or overwrite_all) for t, data in files.items()})


def _check_inside(root: Path, targets: list):
    outside = [str(t) for t in targets if root.resolve() not in Path(t).resolve().parents]
    if outside:
        raise ValueError(f"commit: {outside} are not inside {root}")


def _commit(root: Path, files: dict):
    """commit of ``{target: (bytes, overwrite)}``, under ``root``'s lock."""
    root.mkdir(parents=True, exist_ok=True)
    finish_interrupted_commits(root)
    with _locked(root):
        _finish(root)
        for t in files:
            _remove_leftovers(t)
        existing = [str(t) for t, (_, overwrite) in files.items() if t.exists() and not overwrite]
        if existing:
            raise FileExistsError(f"refusing to overwrite {existing}; pass overwrite=True to replace them")
        _commit_locked(root, files)


def _commit_locked(root: Path, files: dict):
    """commit's writes, journal and renames, under the lock; rolled back together if any step fails."""
    created = [d for d in dict.fromkeys(t.parent for t in files) if not d.exists()]
    temps, backups, done, journal = {}, {}, [], None
    try:
        for d in created:
            d.mkdir(parents=True, exist_ok=True)
        for target, (data, _) in files.items():
            temps[target] = write_temp(target, data)
        for target in files:
            if target.exists():
                backups[target] = _temp_path(target, "bak")
                os.link(target, backups[target])           # the old bytes keep a name until we finish
        journal = _write_journal(root, temps) if len(temps) > 1 else None     # one rename needs none
        for target, tmp in temps.items():
            if files[target][1]:
                os.replace(tmp, target)
            else:
                _link_new(tmp, target)
            done.append(target)
        for d in dict.fromkeys(t.parent for t in files):
            _fsync_dir(d)
        if journal is not None:
            journal.unlink()
            _fsync_dir(root)
    except BaseException:
        if journal is not None:
            journal.unlink(missing_ok=True)                 # first: a later reader must not roll this forward
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


def _write_journal(root: Path, temps: dict) -> Path:
    """``root/.lowrank-commit.json``: the renames still to do, fsynced (the commit point)."""
    journal = root / JOURNAL_NAME
    renames = [[str(t.relative_to(root)), str(tmp.relative_to(root))] for t, tmp in temps.items()]
    try:
        with open(journal, "x") as f:
            f.write(json.dumps({"renames": renames}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(root)
    except BaseException:
        journal.unlink(missing_ok=True)
        raise
    return journal


def interrupted_commit(path):
    """(folder, [targets]) of a commit that was killed after its journal, in ``path``'s folder or one
    above it, or None. Its targets may mix two saves until the next commit there finishes it. A live
    writer's journal is waited for (its lock), where the folder lets us take the lock."""
    path = Path(path).absolute()
    for d in [path, *path.parents]:
        if not (d / JOURNAL_NAME).is_file():
            continue
        try:
            with _locked(d):                                # a live writer finishes first
                renames = _journal(d)
        except OSError:                                     # a folder we can't write: judge without the lock
            renames = _journal(d)
        if renames:
            return d, [str(target) for target, _ in renames]
    return None


def finish_interrupted_commits(path):
    """Finish the commits a killed writer left in the folders holding ``path`` (a journal in ``path``
    or any folder above it): the rest of its temporaries are renamed into place, under the lock."""
    path = Path(path).absolute()
    for d in [path, *path.parents]:
        if (d / JOURNAL_NAME).is_file():
            with _locked(d):
                _finish(d)


def _journal(root: Path) -> list:
    """[(target, temporary)] of the journal in ``root``: [] when there is none or it is torn (written
    only partly, so no rename happened); entries that are not renames a commit writes are left out."""
    try:
        renames = json.loads((root / JOURNAL_NAME).read_text())["renames"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    out = []
    for entry in renames if isinstance(renames, list) else []:
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            continue
        target, tmp = root / entry[0], root / entry[1]
        pattern = rf"\.{re.escape(target.name)}\.tmp-[0-9a-f]{{8}}"
        inside = not Path(entry[0]).is_absolute() and ".." not in Path(entry[0]).parts
        if inside and tmp.parent == target.parent and re.fullmatch(pattern, tmp.name):
            out.append((target, tmp))
    return out


def _finish(root: Path):
    """Complete the commit whose journal is in ``root`` (call under its lock): rename what is left."""
    if not (root / JOURNAL_NAME).is_file():
        return
    renames = _journal(root)
    for target, tmp in renames:
        if tmp.is_file():
            os.replace(tmp, target)
    for d in dict.fromkeys(t.parent for t, _ in renames):
        _fsync_dir(d)
    (root / JOURNAL_NAME).unlink()
    _fsync_dir(root)
    for target, _ in renames:
        _remove_leftovers(target)


def _link_new(tmp: Path, target: Path):
    """Give ``tmp``'s file the name ``target``, which must not exist (checked in the same step)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite ['{target}']: it appeared while saving (another "
                              f"writer?); pass overwrite=True to replace it") from None
