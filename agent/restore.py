"""Data snapshots, the restore half: rebuild a snapshot beside the target and swap it in.

Build the snapshot in a hidden staging dir beside the target (same filesystem),
verifying every chunk's sha256 and length and every file's size and sha256, fsync it
all, then swap it in with one ``renameat2(RENAME_EXCHANGE)`` (two renames where that
is not available). A restore killed at any moment leaves the target as it was; the
next restore removes the leftover staging dir. Local content that is replaced is
moved aside, never deleted (an empty dir is simply removed). Also the boot phase
``restore``: whether to restore is decided by ``agent.data.decide_restore``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import data as D
from agent.backup import (
    DEFAULT_CONCURRENCY,
    ProgressFn,
    _human,
    latest_snapshot,
    load_manifest,
)
from agent.bootctx import BootContext, Done
from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.errors import AgentError, IntegrityError, NotFound
from agent.files import fsync_dir
from agent.interfaces import StoreAPI

# -- restore --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RestoreResult:
    name: str
    target: Path
    snapshot_id: str | None
    files: int = 0
    total_bytes: int = 0
    moved_aside: Path | None = None
    duration_s: float = 0.0

    def summary(self) -> str:
        if self.snapshot_id is None:
            return f"{self.name}: no snapshot"
        s = (f"{self.name}: restored {self.snapshot_id} ({self.files} files, "
             f"{_human(self.total_bytes)}) into {self.target}")
        if self.moved_aside:
            s += f"; previous content moved to {self.moved_aside}"
        return s


def local_state(target: Path) -> str:
    """"missing" | "empty" | "data" — what boot's restore decision needs to know."""
    try:
        with os.scandir(target) as it:
            return "data" if any(True for _ in it) else "empty"
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "data"


def restore(store: StoreAPI, group: str, name: str, target: Path, *, snapshot_id: str | None = None,
            force: bool = False, concurrency: int = DEFAULT_CONCURRENCY,
            clock: Clock = SYSTEM_CLOCK, deadline: Deadline | None = None,
            progress: ProgressFn | None = None) -> RestoreResult:
    """Restore a snapshot (the latest by default) into ``target``, all or nothing.

    A non-empty ``target`` is refused unless ``force``, which moves it aside (never
    deletes it). No snapshot at all: returns with ``snapshot_id`` None, target untouched.
    """
    t0 = clock.monotonic()
    target = Path(target)
    if os.path.ismount(target):
        raise AgentError(f"data {name}: {target} is a mount point; the snapshot is swapped in "
                         "by rename, so point the data path at a directory inside the mount")
    if not force and local_state(target) == "data":
        raise AgentError(f"data {name}: {target} is not empty; refusing to overwrite it "
                         "(--force moves it aside)")
    sid = snapshot_id or latest_snapshot(store, group, name)
    if sid is None:
        return RestoreResult(name, target, None)
    manifest = load_manifest(store, group, name, sid)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _restore_lock(parent / f".{target.name}.restore.lock"):
        _clean_stale(parent, target.name)
        staging = parent / f".{target.name}.restore-{os.getpid()}-{time.monotonic_ns()}"
        building = staging.with_name(staging.name + ".building")
        building.touch()
        fsync_dir(parent)
        os.mkdir(staging, 0o700)
        try:
            _build(store, manifest, staging, concurrency, clock, deadline, progress)
            if deadline is not None:
                deadline.check(f"restoring {name}")
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            building.unlink(missing_ok=True)
            raise
        # From here on the staging name may come to hold the *old* content (exchange):
        # it is never deleted by name again.
        building.unlink()
        fsync_dir(parent)
        aside = _swap_in(staging, target, force)
    return RestoreResult(name, target, sid, len(manifest.files), manifest.total_bytes, aside,
                         round(clock.monotonic() - t0, 3))


def _clean_stale(parent: Path, name: str) -> None:
    """Leftovers of a killed restore: a dir still marked ``.building`` is a partial staging
    dir and goes; an unmarked one may hold the old content of an interrupted swap, so it is
    moved aside like any replaced content, never deleted."""
    for stale in parent.glob(f".{name}.restore-*"):
        if stale.name.endswith(".building"):
            continue
        marker = stale.with_name(stale.name + ".building")
        if stale.is_dir() and not stale.is_symlink():
            if marker.exists():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(stale, parent / f".{name}.replaced-{stale.name.rsplit('-', 2)[-2]}"
                                           f"-{stale.name.rsplit('-', 1)[-1]}")
    for marker in parent.glob(f".{name}.restore-*.building"):
        if not marker.with_name(marker.name[:-len(".building")]).exists():
            marker.unlink(missing_ok=True)
    fsync_dir(parent)


@contextlib.contextmanager
def _restore_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fetch(store: StoreAPI, group: str, name: str, sha: str, length: int, path: str,
           idx: int) -> bytes:
    try:
        obj = store.get(D.chunk_key(group, name, sha))
    except NotFound as exc:
        raise IntegrityError(f"{path}: chunk {idx} ({sha}) is missing from the store") from exc
    body = obj.body
    if len(body) != length:
        raise IntegrityError(f"{path}: chunk {idx} ({sha}) is truncated or wrong size: "
                             f"{len(body)} bytes, expected {length}")
    if D.sha256(body) != sha:
        raise IntegrityError(f"{path}: chunk {idx} ({sha}) failed its checksum")
    return body


def _build(store: StoreAPI, m: D.Manifest, staging: Path, concurrency: int, clock: Clock,
           deadline: Deadline | None, progress: ProgressFn | None) -> None:
    root_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for d in sorted(m.dirs, key=lambda x: x.path.count("/")):
            os.mkdir(d.path, 0o700, dir_fd=root_fd)
        prog = D.Progress(total=m.total_bytes, started=clock.monotonic())

        def tasks() -> Iterator[tuple[D.FileEntry, int, str, int]]:
            for f in m.files:
                lengths = D.chunk_lengths(f.size, m.chunk_size)
                for i, (sha, ln) in enumerate(zip(f.chunks, lengths, strict=True)):
                    yield f, i, sha, ln

        todo = tasks()
        window: deque[Future[bytes]] = deque()
        with ThreadPoolExecutor(concurrency, thread_name_prefix="restore") as pool:
            def fill() -> None:
                while len(window) < 2 * concurrency:
                    t = next(todo, None)
                    if t is None:
                        return
                    f, i, sha, ln = t
                    window.append(pool.submit(_fetch, store, m.group, m.name, sha, ln, f.path, i))
            try:
                fill()
                for f in m.files:
                    _write_file(f, root_fd, window, fill, deadline, prog, clock, progress)
            except BaseException:
                for fut in window:
                    fut.cancel()
                raise
        for s in m.symlinks:
            os.symlink(s.target, s.path, dir_fd=root_fd)
        chown = os.geteuid() == 0
        for d in sorted(m.dirs, key=lambda x: -x.path.count("/")):  # deepest first
            os.chmod(d.path, d.mode, dir_fd=root_fd)
            if chown and d.uid is not None:
                os.chown(d.path, d.uid, d.gid or 0, dir_fd=root_fd)
            os.utime(d.path, (d.mtime, d.mtime), dir_fd=root_fd)
            _fsync_at(root_fd, d.path)
        os.chmod(root_fd, m.root_mode)
        if chown and m.root_uid is not None:
            os.chown(root_fd, m.root_uid, m.root_gid or 0)
        os.fsync(root_fd)
    finally:
        os.close(root_fd)
    if progress is not None:
        progress(prog.info(clock.monotonic()))


def _fsync_at(dir_fd: int, rel: str) -> None:
    fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(f: D.FileEntry, root_fd: int, window: deque[Future[bytes]],
                fill: Callable[[], None], deadline: Deadline | None, prog: D.Progress,
                clock: Clock, progress: ProgressFn | None) -> None:
    # O_EXCL|O_NOFOLLOW relative to the staging dir: a write can never land outside it.
    fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                 dir_fd=root_fd)
    with os.fdopen(fd, "wb") as out:
        whole = hashlib.sha256()
        size = 0
        single = len(f.chunks) == 1
        for _ in f.chunks:
            if deadline is not None:
                deadline.check(f"restoring {f.path}")
            body = window.popleft().result()
            fill()
            out.write(body)
            if not single:
                whole.update(body)
            size += len(body)
            prog.add(len(body))
            now = clock.monotonic()
            if progress is not None and prog.tick(now):
                progress(prog.info(now))
        digest = f.chunks[0] if single else whole.hexdigest()  # one chunk: its sha is the file's
        if size != f.size or digest != f.sha256:
            raise IntegrityError(f"{f.path}: restored file does not match the snapshot "
                                 f"(size {size}/{f.size}, sha256 {digest[:12]}/{f.sha256[:12]})")
        out.flush()
        os.fchmod(out.fileno(), f.mode)
        if f.uid is not None and os.geteuid() == 0:
            os.fchown(out.fileno(), f.uid, f.gid or 0)
        os.utime(out.fileno(), (f.mtime, f.mtime))
        os.fsync(out.fileno())


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(staging: Path, target: Path, force: bool) -> Path | None:
    """Put the fully built staging dir at ``target``; returns where old content went."""
    parent = target.parent
    if not os.path.lexists(target):
        os.rename(staging, target)
        fsync_dir(parent)
        return None
    state = local_state(target)
    if state == "data" and not force:
        raise AgentError(f"{target} gained content during the restore; not replacing it")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = parent / f".{target.name}.replaced-{stamp}-{os.getpid()}"
    if _exchange(staging, target):
        fsync_dir(parent)
        old = staging  # after the exchange the staging name holds the old dir
    else:
        os.rename(target, aside)  # a crash here leaves target missing: the next boot restores
        os.rename(staging, target)
        fsync_dir(parent)
        old = aside
    if state == "empty" and old.is_dir() and not old.is_symlink():
        with contextlib.suppress(OSError):
            os.rmdir(old)
            return None
    if old != aside:
        os.rename(old, aside)
    fsync_dir(parent)
    return aside


# -- boot phase -----------------------------------------------------------------------------------

def _marker(paths: Any, name: str) -> Path:
    return paths.state_dir / "data" / f"{name}.json"


def _restored_here(paths: Any, name: str, instance_id: str) -> bool:
    try:
        return json.loads(_marker(paths, name).read_text()).get("instance_id") == instance_id
    except (OSError, ValueError, AttributeError):
        return False


def phase_restore(ctx: BootContext) -> Done:
    """Boot phase: restore each data entry on a first boot or into a missing/empty dir.

    Failure policy, per entry: local data present -> keep it and go on ``degraded``; the
    dir is empty and the entry is ``required`` (the default) -> error: a service must not
    come up silently empty because S3 was unreachable; ``required: false`` -> degraded.
    """
    from agent.files import atomic_write

    entries = list(ctx.cfg.data)
    if not entries:
        return Done(ctx, "no data entries")
    instance_id = ctx.ident.instance_id
    details: list[str] = []
    for spec in entries:
        target = ctx.paths.rooted(spec.path)
        local = local_state(target)
        decision = D.decide_restore(ctx.boot_kind, local,
                                    _restored_here(ctx.paths, spec.name, instance_id))
        if decision.action == "keep":
            details.append(f"{spec.name}: {decision.reason}")
            continue
        try:
            if ctx.store is None:
                ctx = ctx.add(store=ctx.get_store())
            assert ctx.store is not None
            res = restore(ctx.store, ctx.cfg.group, spec.name, target,
                          force=decision.move_aside, clock=ctx.clock, deadline=ctx.deadline,
                          progress=ctx.progress)
        except AgentError as exc:
            if local == "data":
                ctx = ctx.degrade(f"data {spec.name}: restore failed, kept local data: {exc}")
                continue
            if spec.required:
                raise type(exc)(f"data {spec.name}: cannot restore into {local} {spec.path} "
                                f"(required): {exc}") from exc
            ctx = ctx.degrade(
                f"data {spec.name}: restore failed, starting with {local} dir: {exc}")
            continue
        if res.snapshot_id is not None:
            atomic_write(_marker(ctx.paths, spec.name), json.dumps(
                {"instance_id": instance_id, "snapshot_id": res.snapshot_id,
                 "restored_at": ctx.clock.time()}) + "\n", mode=0o644)
        details.append(res.summary())
    return Done(ctx, "; ".join(details))
