"""Data snapshots, the I/O part: back up a directory to the store and restore it, safely.

Decisions (layout, manifest checks, retention, what may be collected, whether boot
restores) live in ``agent.data``; this module walks files, moves bytes and renames dirs.

Backup: stream each file in fixed chunks, upload the chunks the store does not have yet
(one listing of ``chunks/`` per backup; bounded parallel PUTs, bounded memory), then write
the manifest create-only: that write is the commit point. A backup killed at any moment
leaves only unreferenced chunks and a stale lock, never a half snapshot. Then retire old
manifests and collect chunks (see ``agent.data`` for why that cannot race a live backup).

Restore: build the snapshot in a hidden staging dir beside the target (same filesystem),
verifying every chunk's sha256 and length and every file's size and sha256, fsync it all,
then swap it in with one ``renameat2(RENAME_EXCHANGE)`` (two renames where that is not
available). A restore killed at any moment leaves the target as it was; the next restore
removes the leftover staging dir. Local content that is replaced is moved aside, never
deleted (an empty dir is simply removed).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import data as D
from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.errors import AgentError, IntegrityError, NotFound, StoreError
from agent.files import fsync_dir

ProgressFn = Callable[[dict[str, Any]], None]
DEFAULT_CONCURRENCY = 8
FINAL_DEADLINE_S = 300.0


# -- listing snapshots ----------------------------------------------------------------------------

def list_snapshots(store: Any, group: str, name: str) -> list[str]:
    listing = store.list(f"{D.base(group, name)}/snapshots/")
    return D.snapshot_ids((e.key for e in listing.entries), group, name)


def latest_snapshot(store: Any, group: str, name: str) -> str | None:
    ids = list_snapshots(store, group, name)
    return ids[-1] if ids else None


def load_manifest(store: Any, group: str, name: str, snap_id: str) -> D.Manifest:
    key = D.snapshot_key(group, name, snap_id)
    try:
        obj = store.get(key)
    except NotFound as exc:
        raise IntegrityError(f"snapshot {snap_id} of {group}/{name}: manifest missing") from exc
    return D.parse_manifest(obj.body, what=f"snapshot {snap_id}")


# -- backup ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackupResult:
    name: str
    snapshot_id: str
    files: int
    total_bytes: int
    uploaded_bytes: int
    uploaded_chunks: int
    reused_chunks: int
    retired: tuple[str, ...] = ()
    collected: int = 0
    gc_note: str = ""
    duration_s: float = 0.0

    def summary(self) -> str:
        s = (f"{self.name}: snapshot {self.snapshot_id}: {self.files} files, "
             f"{_human(self.total_bytes)}, uploaded {_human(self.uploaded_bytes)} in "
             f"{self.uploaded_chunks} chunks ({self.reused_chunks} reused)")
        if self.retired or self.collected:
            s += f"; retired {len(self.retired)} snapshots, collected {self.collected} chunks"
        if self.gc_note:
            s += f"; {self.gc_note}"
        return s


@dataclass
class Backup:
    """One backup of one data entry, as steps a test can interleave with other actors:
    ``begin`` (lock + chunk listing), ``upload`` (scan, chunks), ``commit`` (manifest),
    ``end`` (drop the lock), ``collect`` (retention + GC)."""

    store: Any
    group: str
    name: str
    root: Path
    instance_id: str = "unknown"
    keep: int = 10
    chunk_size: int = D.DEFAULT_CHUNK_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    policy: D.GcPolicy = field(default_factory=D.GcPolicy)
    clock: Clock = SYSTEM_CLOCK
    deadline: Deadline | None = None
    final: bool = False
    allow_empty: bool = False
    progress: ProgressFn | None = None
    gc_wait_s: float = 60.0
    # filled in as the steps run
    snapshot_id: str = ""
    existing: set[str] = field(default_factory=set)
    manifest: D.Manifest | None = None
    uploaded_bytes: int = 0
    uploaded_chunks: int = 0
    reused_chunks: int = 0
    _lock_key: str = ""
    _lock_at: float = 0.0
    _t0: float = 0.0
    _stats: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        D.check_chunk_size(self.chunk_size)

    @property
    def prefix(self) -> str:
        return D.base(self.group, self.name)

    def _check(self, doing: str) -> None:
        if self.deadline is not None:
            self.deadline.check(doing)

    # -- steps --------------------------------------------------------------------------------
    def begin(self) -> None:
        self._t0 = self.clock.monotonic()
        if not self.root.is_dir() or self.root.is_symlink():
            raise AgentError(f"data {self.name}: {self.root} is not a directory; not backing up")
        locks = self.store.list(f"{self.prefix}/locks/")
        self.snapshot_id = D.new_snapshot_id(
            locks.store_now, self.instance_id,
            after=latest_snapshot(self.store, self.group, self.name))
        self._lock_key = f"{self.prefix}/locks/backup-{self.snapshot_id}"
        self._refresh_lock()
        # Written our marker; now look for a collector. If one is live, wait it out.
        waited = self.clock.monotonic()
        while True:
            locks = self.store.list(f"{self.prefix}/locks/")
            gcs = [e for e in locks.entries if e.key.rsplit("/", 1)[-1].startswith("gc-")
                   and D.fresh(e.last_modified, locks.store_now, self.policy.lock_ttl_s)]
            if not gcs:
                break
            if self.clock.monotonic() - waited > self.gc_wait_s:
                self.end()
                raise StoreError(f"data {self.name}: a chunk collection ({gcs[0].key}) has held "
                                 f"for over {self.gc_wait_s:.0f}s; backup not started")
            self._check("waiting for a chunk collection to finish")
            self.clock.sleep(0.5)
        chunks = self.store.list(f"{self.prefix}/chunks/")
        self.existing = {e.key.rsplit("/", 1)[-1] for e in chunks.entries}

    def _refresh_lock(self) -> None:
        self.store.put(self._lock_key, self.snapshot_id.encode())
        self._lock_at = self.clock.monotonic()

    def upload(self) -> D.Manifest:
        files: list[D.FileEntry] = []
        dirs: list[D.DirEntry] = []
        links: list[D.LinkEntry] = []
        entries = list(_walk(self.root))
        total = sum(st.st_size for _, st in entries if stat.S_ISREG(st.st_mode))
        prog = D.Progress(total=total, started=self.clock.monotonic())
        scheduled: set[str] = set(self.existing)
        inflight: deque[Future[None]] = deque()
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="backup") as pool:
            try:
                for rel, st in entries:
                    if stat.S_ISDIR(st.st_mode):
                        dirs.append(D.DirEntry(rel, st.st_mode & 0o7777, st.st_mtime,
                                               st.st_uid, st.st_gid))
                    elif stat.S_ISLNK(st.st_mode):
                        links.append(D.LinkEntry(rel, os.readlink(self.root / rel)))
                    elif stat.S_ISREG(st.st_mode):
                        files.append(self._file(rel, st, pool, inflight, scheduled, prog))
                    # sockets, fifos, devices: not data; skipped
                while inflight:
                    inflight.popleft().result()
            except BaseException:
                for f in inflight:
                    f.cancel()
                raise
        if self.progress is not None:
            self.progress(prog.info(self.clock.monotonic()))
        if not files and not dirs and not links and not self.allow_empty:
            prev = latest_snapshot(self.store, self.group, self.name)
            if prev is not None and load_manifest(self.store, self.group, self.name, prev).files:
                raise AgentError(
                    f"data {self.name}: {self.root} is empty but snapshot {prev} is not; "
                    "refusing to make an empty snapshot the latest (allow_empty to force)")
        rst = self.root.stat()
        self.manifest = D.Manifest(
            id=self.snapshot_id, group=self.group, name=self.name, created=self.clock.time(),
            instance_id=self.instance_id, chunk_size=self.chunk_size, files=tuple(files),
            dirs=tuple(dirs), symlinks=tuple(links), root_mode=rst.st_mode & 0o7777,
            root_uid=rst.st_uid, root_gid=rst.st_gid, final=self.final)
        return self.manifest

    def _file(self, rel: str, st: os.stat_result, pool: ThreadPoolExecutor,
              inflight: deque[Future[None]], scheduled: set[str], prog: D.Progress) -> D.FileEntry:
        whole = hashlib.sha256()
        shas: list[str] = []
        size = 0
        fd = os.open(self.root / rel, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            while True:
                buf = f.read(self.chunk_size)
                if not buf:
                    break
                self._check(f"backing up {rel}")
                whole.update(buf)
                size += len(buf)
                sha = D.sha256(buf)
                shas.append(sha)
                if sha in scheduled:
                    self.reused_chunks += 1
                else:
                    scheduled.add(sha)
                    while len(inflight) >= 2 * self.concurrency:  # bounded memory
                        inflight.popleft().result()
                    inflight.append(pool.submit(self._put_chunk, sha, buf))
                prog.add(len(buf))
                self._tick(prog)
                if self.clock.monotonic() - self._lock_at > self.policy.lock_ttl_s / 4:
                    self._refresh_lock()
                if len(buf) < self.chunk_size:
                    break
        # The file may have grown or shrunk while we read it: the manifest records what we read.
        return D.FileEntry(rel, st.st_mode & 0o7777, size, st.st_mtime, whole.hexdigest(),
                           tuple(shas), st.st_uid, st.st_gid)

    def _put_chunk(self, sha: str, buf: bytes) -> None:
        self.store.put(D.chunk_key(self.group, self.name, sha), buf)
        with self._stats:
            self.uploaded_bytes += len(buf)
            self.uploaded_chunks += 1

    def _tick(self, prog: D.Progress) -> None:
        now = self.clock.monotonic()
        if self.progress is not None and prog.tick(now):
            self.progress(prog.info(now))

    def commit(self) -> str:
        assert self.manifest is not None
        self._check("committing the snapshot")
        if self.clock.monotonic() - self._lock_at > self.policy.lock_ttl_s / 2:
            self._refresh_lock()
        body = self.manifest.dumps()
        self.store.create(D.snapshot_key(self.group, self.name, self.snapshot_id), body,
                          content_type="application/json")
        self.uploaded_bytes += len(body)
        return self.snapshot_id

    def end(self) -> None:
        if self._lock_key:
            with contextlib.suppress(StoreError):
                self.store.delete(self._lock_key)

    def collect(self) -> tuple[tuple[str, ...], int, str]:
        return collect(self.store, self.group, self.name, self.keep, self.policy)

    def run(self) -> BackupResult:
        self.begin()
        try:
            self.upload()
            self.commit()
        finally:
            self.end()
        retired, collected, note = self.collect()
        assert self.manifest is not None
        return BackupResult(self.name, self.snapshot_id, len(self.manifest.files),
                            self.manifest.total_bytes, self.uploaded_bytes, self.uploaded_chunks,
                            self.reused_chunks, retired, collected, note,
                            round(self.clock.monotonic() - self._t0, 3))


def collect(store: Any, group: str, name: str, keep: int,
            policy: D.GcPolicy) -> tuple[tuple[str, ...], int, str]:
    """Retire snapshots beyond ``keep``, then delete chunks nothing references.

    Returns (retired ids, chunks deleted, note). Chunk deletion is skipped (and said so)
    while another backup's lock is live; manifests are retired regardless, because a
    live backup never depends on another snapshot's manifest, only on its chunks.
    """
    prefix = D.base(group, name)
    kept, retired = D.retire(list_snapshots(store, group, name), keep)
    for sid in retired:
        store.delete(D.snapshot_key(group, name, sid))
    gc_key = f"{prefix}/locks/gc-{os.getpid()}-{time.monotonic_ns()}"
    store.put(gc_key, b"gc")
    try:
        locks = store.list(f"{prefix}/locks/")
        live = [e.key for e in locks.entries
                if e.key.rsplit("/", 1)[-1].startswith("backup-")
                and D.fresh(e.last_modified, locks.store_now, policy.lock_ttl_s)]
        if live:
            return tuple(retired), 0, f"chunk collection deferred: backup in flight ({len(live)})"
        referenced: set[str] = set()
        for sid in list_snapshots(store, group, name):  # re-list: a backup may have committed
            referenced |= load_manifest(store, group, name, sid).chunk_set()
        listing = store.list(f"{prefix}/chunks/")
        doomed = D.collectable(((e.key.rsplit("/", 1)[-1], e.last_modified)
                                for e in listing.entries),
                               referenced, listing.store_now, policy.min_chunk_age_s)
        _delete_many(store, [D.chunk_key(group, name, s) for s in doomed])
        return tuple(retired), len(doomed), ""
    finally:
        with contextlib.suppress(StoreError):
            store.delete(gc_key)


def _delete_many(store: Any, rels: list[str]) -> None:
    for i in range(0, len(rels), 1000):
        batch = rels[i:i + 1000]
        try:
            resp = store.client.delete_objects(
                Bucket=store.bucket,
                Delete={"Objects": [{"Key": store.key(r)} for r in batch], "Quiet": True})
        except Exception as exc:
            raise StoreError(f"delete {len(batch)} chunks: {exc}") from exc
        store.usage.add("delete", 0, 0)
        if resp.get("Errors"):
            e = resp["Errors"][0]
            raise StoreError(f"delete {e.get('Key')}: {e.get('Code')} {e.get('Message')}")


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything below ``root``, sorted; links never followed."""
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as it:
            items = sorted(it, key=lambda e: e.name)
        for e in items:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            st = e.stat(follow_symlinks=False)
            yield rel, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(rel)


def backup(store: Any, group: str, spec: Any, paths: Any, final: bool = False, *,
           instance_id: str = "unknown", clock: Clock = SYSTEM_CLOCK,
           deadline: Deadline | None = None, progress: ProgressFn | None = None,
           policy: D.GcPolicy | None = None, concurrency: int = DEFAULT_CONCURRENCY
           ) -> BackupResult:
    """Back up one config ``data`` entry (``name``, ``path``, ``keep``, ``chunk_size``)."""
    if final and deadline is None:
        deadline = Deadline.after(FINAL_DEADLINE_S, "final backup", clock)
    return Backup(store, group, spec.name, paths.rooted(spec.path), instance_id=instance_id,
                  keep=int(getattr(spec, "keep", 10) or 10),
                  chunk_size=int(getattr(spec, "chunk_size", None) or D.DEFAULT_CHUNK_SIZE),
                  concurrency=concurrency, policy=policy or D.GcPolicy(), clock=clock,
                  deadline=deadline, final=final, progress=progress).run()


@dataclass(frozen=True)
class EntryOutcome:
    name: str
    result: BackupResult | None = None
    error: str = ""


def run_backups(store: Any, config: Any, paths: Any, *, instance_id: str, final: bool = False,
                only: str | None = None, clock: Clock = SYSTEM_CLOCK,
                deadline: Deadline | None = None, progress: ProgressFn | None = None
                ) -> list[EntryOutcome]:
    """Back up every data entry (or the one named ``only``); one failing does not stop the rest."""
    if final and deadline is None:
        deadline = Deadline.after(FINAL_DEADLINE_S, "final backup", clock)
    out: list[EntryOutcome] = []
    for spec in getattr(config, "data", None) or ():
        if only and spec.name != only:
            continue
        try:
            res = backup(store, config.group, spec, paths, final, instance_id=instance_id,
                         clock=clock, deadline=deadline, progress=progress)
            out.append(EntryOutcome(spec.name, res))
        except AgentError as exc:
            out.append(EntryOutcome(spec.name, error=str(exc)))
    return out


def backup_due(config: Any, last: dict[str, float], now: float) -> list[Any]:
    """The data entries whose ``backup_interval_s`` has passed since ``last[name]``."""
    return [s for s in getattr(config, "data", None) or ()
            if D.due(last.get(s.name), float(getattr(s, "backup_interval_s", 300) or 300), now)]


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


def restore(store: Any, group: str, name: str, target: Path, *, snapshot_id: str | None = None,
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


def _fetch(store: Any, group: str, name: str, sha: str, length: int, path: str,
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


def _build(store: Any, m: D.Manifest, staging: Path, concurrency: int, clock: Clock,
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


def phase_restore(ctx: Any) -> str:
    """Boot phase: restore each data entry on a first boot or into a missing/empty dir.

    Failure policy, per entry: local data present -> keep it and go on ``degraded``; the
    dir is empty and the entry is ``required`` (the default) -> error: a service must not
    come up silently empty because S3 was unreachable; ``required: false`` -> degraded.
    """
    from agent.files import atomic_write

    entries = list(getattr(ctx.config, "data", None) or ())
    if not entries:
        return "no data entries"
    instance_id = getattr(ctx.identity, "instance_id", "unknown")
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
            res = restore(ctx.get_store(), ctx.config.group, spec.name, target,
                          force=decision.move_aside, clock=ctx.clock, deadline=ctx.deadline,
                          progress=ctx.progress)
        except AgentError as exc:
            if local == "data":
                ctx.degrade(f"data {spec.name}: restore failed, kept local data: {exc}")
                continue
            if getattr(spec, "required", True):
                raise type(exc)(f"data {spec.name}: cannot restore into {local} {spec.path} "
                                f"(required): {exc}") from exc
            ctx.degrade(f"data {spec.name}: restore failed, starting with {local} dir: {exc}")
            continue
        if res.snapshot_id is not None:
            atomic_write(_marker(ctx.paths, spec.name), json.dumps(
                {"instance_id": instance_id, "snapshot_id": res.snapshot_id,
                 "restored_at": ctx.clock.time()}) + "\n", mode=0o644)
        details.append(res.summary())
    return "; ".join(details)


# -- command line helpers -------------------------------------------------------------------------

class TtyProgress:
    """A one-line progress bar on stderr when it is a terminal; silent otherwise."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())

    def __call__(self, info: dict[str, Any]) -> None:
        if not self.on:
            return
        total = max(int(info.get("total") or 0), 1)
        done = int(info.get("bytes") or 0)
        frac = min(done / total, 1.0)
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac:4.0%} {_human(done)}/"
                          f"{_human(total)} {_human(int(info.get('rate') or 0))}/s ")
        self.stream.flush()

    def done(self) -> None:
        if self.on:
            self.stream.write("\n")
            self.stream.flush()


def _human(n: int) -> str:
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if f < 1024 or unit == "GiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{n} B"


def load_runtime(paths: Any) -> tuple[Any, str]:
    """(merged config, instance id) for ``backup``/``restore`` run by hand or at shutdown."""
    from agent import state as statefile
    from agent.config import load_layers, load_yaml_file
    from agent.userdata import parse_user_data

    st = statefile.read(paths.state_file) or {}
    baked = load_yaml_file(paths.config_file) if paths.config_file.exists() else None
    from agent.imds import ImdsClient

    imds = ImdsClient()
    user = parse_user_data(imds.user_data())
    cur = paths.bundles_dir / "current" / "agent.yaml"
    bundle = load_yaml_file(cur) if cur.exists() else None
    cfg = load_layers(baked, user, bundle)
    instance_id = st.get("instance_id") or imds.identity().instance_id
    return cfg, str(instance_id)


def store_for(cfg: Any, concurrency: int = DEFAULT_CONCURRENCY) -> Any:
    from agent import aws
    from agent.store import Store

    region = getattr(cfg.store, "region", None)
    client = aws.client("s3", region, max_pool_connections=max(10, concurrency + 2))
    return Store(cfg.store.bucket, cfg.store.prefix, client=client)
