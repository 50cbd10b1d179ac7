"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Shape after consul-template's ``AtomicWrite``: temp file in the destination's
directory, write, fsync, chmod/chown, optional ``.bak`` hard link, rename, and
then (unlike consul-template) fsync the directory so the rename survives a crash.
Returns whether anything changed so callers can skip reloads and support dry-run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class WriteResult:
    path: Path
    changed: bool
    written: bool  # False in dry-run or when unchanged


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20,
                copy_to: BinaryIO | None = None) -> tuple[str, int]:
    """The sha256 (hex) and size of a file, read in chunks: the one file-hashing loop.

    With ``copy_to``, each chunk is also written there: a copy hashed as it is made
    (the bytes hashed are the bytes written, read once).
    """
    import hashlib

    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
            n += len(b)
            if copy_to is not None:
                copy_to.write(b)
    return h.hexdigest(), n


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _same(path: Path, data: bytes, mode: int | None, uid: int | None, gid: int | None) -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if mode is not None and (st.st_mode & 0o7777) != mode:
        return False
    if uid is not None and st.st_uid != uid:
        return False
    if gid is not None and st.st_gid != gid:
        return False
    if st.st_size != len(data):
        return False
    return path.read_bytes() == data


def stage(path: Path, data: bytes, *, mode: int | None = None,
          uid: int | None = None, gid: int | None = None) -> Path:
    """Write ``data`` to a fsynced temp file beside ``path``; the caller renames or unlinks it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if uid is not None or gid is not None:
                os.fchown(f.fileno(), -1 if uid is None else uid, -1 if gid is None else gid)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def commit(staged: Path, path: Path, *, backup: bool = False) -> None:
    """Rename a staged file over ``path`` (keeping one ``.bak`` if asked) and fsync the dir."""
    if backup and path.exists():
        bak = path.with_name(path.name + ".bak")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(bak)
        os.link(path, bak)
    os.replace(staged, path)
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, mode: int | None = None,
                 uid: int | None = None, gid: int | None = None, backup: bool = False,
                 dry_run: bool = False) -> WriteResult:
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    if _same(path, data, mode, uid, gid):
        return WriteResult(path, changed=False, written=False)
    if dry_run:
        return WriteResult(path, changed=True, written=False)
    tmp = stage(path, data, mode=mode, uid=uid, gid=gid)
    try:
        commit(tmp, path, backup=backup)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return WriteResult(path, changed=True, written=True)


@contextlib.contextmanager
def flocked(lock_path: Path, mode: int = 0o600) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (created if needed) for the ``with`` block.

    Between processes of this instance: boot and the daemon share state, bundles and
    rendered files. The kernel drops the lock if the holder dies, so a kill -9 never
    leaves it stuck.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
