"""Data snapshots, the backup half: back up a directory to the store, safely.

Decisions (layout, manifest checks, retention, what may be collected, whether boot
restores) live in ``agent.data.plan``; this module walks files, moves bytes and renames dirs.

Backup: stream each file in fixed chunks, upload the chunks the store does not have yet
(one listing of ``chunks/`` per backup; bounded parallel PUTs, bounded memory), then write
the manifest create-only: that write is the commit point. A backup killed at any moment
leaves only unreferenced chunks and a stale lock, never a half snapshot. Then retire old
manifests and collect chunks (see ``agent.data.plan`` for why that cannot race a live backup).

Restore is ``agent.data.restore``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.data import chunking
from agent.data import packs as P
from agent.data import plan as D
from agent.errors import AgentError, IntegrityError, NotFound, StoreError
from agent.interfaces import StoreAPI

if TYPE_CHECKING:
    from agent.aws.store import Store
    from agent.config.model import Config, DataSpec
    from agent.paths import Paths

ProgressFn = Callable[[dict[str, Any]], None]
DEFAULT_CONCURRENCY = 8
FINAL_DEADLINE_S = 300.0
MAX_DEDUP_SNAPSHOTS = 10  # a backup dedups against the blobs of this many newest snapshots


# -- listing snapshots ----------------------------------------------------------------------------

def list_snapshots(store: StoreAPI, group: str, name: str) -> list[str]:
    listing = store.list(f"{D.base(group, name)}/snapshots/")
    return D.snapshot_ids((e.key for e in listing.entries), group, name)


def latest_snapshot(store: StoreAPI, group: str, name: str) -> str | None:
    ids = list_snapshots(store, group, name)
    return ids[-1] if ids else None


def load_manifest(store: StoreAPI, group: str, name: str, snap_id: str) -> D.Manifest:
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
    uploaded_packs: int = 0
    skipped_files: int = 0

    def summary(self) -> str:
        s = (f"{self.name}: snapshot {self.snapshot_id}: {self.files} files, "
             f"{_human(self.total_bytes)} in {self.duration_s:.1f} s; uploaded "
             f"{_human(self.uploaded_bytes)} ({self.uploaded_chunks} new chunks in "
             f"{self.uploaded_packs} packs, {self.reused_chunks} reused, "
             f"{self.skipped_files} unchanged files not read)")
        if self.retired or self.collected:
            s += f"; retired {len(self.retired)} snapshots, collected {self.collected} packs"
        if self.gc_note:
            s += f"; {self.gc_note}"
        return s


@dataclass
class Backup:
    """One backup of one data entry, as steps a test can interleave with other actors:
    ``begin`` (lock + chunk listing), ``upload`` (scan, chunks), ``commit`` (manifest),
    ``end`` (drop the lock), ``collect`` (retention + GC)."""

    store: StoreAPI
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
    pack_target: int = P.PACK_TARGET
    rehash_every: int = D.REHASH_EVERY
    known: dict[str, P.Loc] = field(default_factory=dict)  # blobs of committed snapshots
    prev: D.Manifest | None = None  # this instance's latest snapshot (format 2)
    rehash: bool = True  # read every file (no previous snapshot, or the periodic full read)
    manifest: D.Manifest | None = None
    uploaded_bytes: int = 0
    uploaded_chunks: int = 0
    uploaded_packs: int = 0
    reused_chunks: int = 0
    skipped_files: int = 0
    _prev_files: dict[str, D.FileEntry] = field(default_factory=dict, repr=False)
    _new_locs: dict[str, P.Loc] = field(default_factory=dict, repr=False)
    _root_fd: int = -1
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
        self._load_known()

    def _load_known(self) -> None:
        """What this backup may reuse: the blobs of the newest ``MAX_DEDUP_SNAPSHOTS``
        snapshots (any instance's), and the newest snapshot taken on this instance, whose
        file entries let unchanged files be skipped unread. Read after the handshake with
        collectors, so a blob seen here cannot be collected before our manifest is in."""
        ids = list_snapshots(self.store, self.group, self.name)
        for sid in reversed(ids[-MAX_DEDUP_SNAPSHOTS:]):
            try:
                m = load_manifest(self.store, self.group, self.name, sid)
            except IntegrityError:  # retired meanwhile, or unreadable: not a dedup source
                continue
            if m.format != D.FORMAT:
                continue  # format-1 chunks are not reused; their snapshots still restore
            for sha in m.chunk_set():
                self.known.setdefault(sha, m.blobs[sha])
            if self.prev is None and m.instance_id == self.instance_id:
                self.prev = m
        self.rehash = D.full_rehash_due(self.prev.since_full if self.prev else None,
                                        self.rehash_every)
        if self.prev is not None and not self.rehash:
            self._prev_files = {f.path: f for f in self.prev.files}

    def _refresh_lock(self) -> None:
        self.store.put(self._lock_key, self.snapshot_id.encode())
        self._lock_at = self.clock.monotonic()

    def upload(self) -> D.Manifest:
        files: list[D.FileEntry] = []
        dirs: list[D.DirEntry] = []
        links: list[D.LinkEntry] = []
        entries = list(_walk(self.root))
        total = sum(st.st_size for _, st in entries if stat.S_ISREG(st.st_mode))
        prog = D.Progress(total=total, started=self.clock.monotonic(),
                          files_total=sum(1 for _, st in entries if stat.S_ISREG(st.st_mode)))
        scheduled: set[str] = set()
        inflight: deque[Future[None]] = deque()
        pack = P.PackBuilder(self.pack_target)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        with contextlib.ExitStack() as stack:
            stack.callback(os.close, self._root_fd)
            pool = stack.enter_context(
                ThreadPoolExecutor(self.concurrency, thread_name_prefix="backup"))
            try:
                for rel, st in entries:
                    if stat.S_ISDIR(st.st_mode):
                        dirs.append(D.DirEntry(rel, st.st_mode & 0o7777, st.st_mtime,
                                               st.st_uid, st.st_gid))
                    elif stat.S_ISLNK(st.st_mode):
                        links.append(D.LinkEntry(rel, os.readlink(rel, dir_fd=self._root_fd)))
                    elif stat.S_ISREG(st.st_mode):
                        entry = self._file(rel, pool, inflight, scheduled, pack, prog)
                        if entry is not None:
                            files.append(entry)
                        prog.files += 1
                    # sockets, fifos, devices: not data; skipped
                if len(pack):
                    self._seal(pack, pool, inflight)
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
        used = {c for f in files for c in f.chunks}
        blobs = {c: self._new_locs.get(c) or self.known[c] for c in used}
        self.manifest = D.Manifest(
            id=self.snapshot_id, group=self.group, name=self.name, created=self.clock.time(),
            instance_id=self.instance_id, chunk_size=self.chunk_size, files=tuple(files),
            dirs=tuple(dirs), symlinks=tuple(links), root_mode=rst.st_mode & 0o7777,
            root_uid=rst.st_uid, root_gid=rst.st_gid, final=self.final, blobs=blobs,
            chunker=chunking.spec_name(self.chunk_size),
            since_full=0 if self.rehash else (self.prev.since_full + 1 if self.prev else 0))
        return self.manifest

    def _file(self, rel: str, pool: ThreadPoolExecutor, inflight: deque[Future[None]],
              scheduled: set[str], pack: P.PackBuilder, prog: D.Progress) -> D.FileEntry | None:
        try:
            # O_NONBLOCK: a file swapped for a FIFO since the walk must not hang the backup
            fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self._root_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):
                return None  # deleted, or replaced by a symlink, since the walk
            raise
        try:
            # the open file's own stat: what was read is at least as new as this
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None  # replaced by something else since the walk: not data now
            prev = self._prev_files.get(rel)
            if (prev is not None and D.unchanged(prev, st.st_size, st.st_mtime_ns,
                                                 st.st_ctime_ns, st.st_ino)
                    and all(c in self.known for c in prev.chunks)):
                self.skipped_files += 1
                self.reused_chunks += len(prev.chunks)
                prog.add(st.st_size)
                self._tick(prog)
                return dataclasses.replace(prev, mode=st.st_mode & 0o7777, mtime=st.st_mtime,
                                           uid=st.st_uid, gid=st.st_gid)
            shas: list[str] = []
            size = 0
            for view in chunking.chunks(fd, self.chunk_size):
                self._check(f"backing up {rel}")
                sha = hashlib.sha256(view).hexdigest()
                shas.append(sha)
                size += len(view)
                if sha in self.known or sha in scheduled:
                    self.reused_chunks += 1
                else:
                    scheduled.add(sha)
                    pack.add(sha, view)
                    self.uploaded_chunks += 1
                    if pack.full:
                        self._seal(pack, pool, inflight)
                prog.add(len(view))
                self._tick(prog)
                if self.clock.monotonic() - self._lock_at > self.policy.lock_ttl_s / 4:
                    self._refresh_lock()
        finally:
            os.close(fd)
        # The file may have grown or shrunk while we read it: the manifest records what we read.
        return D.FileEntry(rel, st.st_mode & 0o7777, size, st.st_mtime, "", tuple(shas),
                           st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def _seal(self, pack: P.PackBuilder, pool: ThreadPoolExecutor,
              inflight: deque[Future[None]]) -> None:
        pid, body, locs = pack.seal()
        self._new_locs.update(locs)
        # bounded memory: at most half as many packs in flight as threads (a PUT of a whole
        # pack keeps a connection busy; more parallel PUTs bring moto or S3 nothing)
        while len(inflight) >= max(2, self.concurrency // 2):
            inflight.popleft().result()
        inflight.append(pool.submit(self._put_pack, pid, body))

    def _put_pack(self, pid: str, body: bytes) -> None:
        self.store.put(f"{self.prefix}/packs/{pid}", body)
        with self._stats:
            self.uploaded_bytes += len(body)
            self.uploaded_packs += 1

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
                          content_type="application/gzip")
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
                            round(self.clock.monotonic() - self._t0, 3), self.uploaded_packs,
                            self.skipped_files)


def collect(store: StoreAPI, group: str, name: str, keep: int,
            policy: D.GcPolicy) -> tuple[tuple[str, ...], int, str]:
    """Retire snapshots beyond ``keep``, then delete packs (and format-1 chunk objects)
    that no remaining manifest names and that are old enough (``agent.data.plan``,
    ``agent.data.packs``).

    Returns (retired ids, objects deleted, note). Deletion is skipped (and said so) while
    another backup's lock is live; manifests are retired regardless, because a live backup
    never depends on another snapshot's manifest, only on the packs it read from it.
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
            try:
                raw = store.get(D.snapshot_key(group, name, sid)).body
            except NotFound:  # retired by a concurrent collector since the listing
                continue
            referenced |= D.referenced_objects(raw, what=f"snapshot {sid}")
        doomed: list[str] = []
        for kind in ("packs", "chunks"):  # chunks/: format 1's objects
            listing = store.list(f"{prefix}/{kind}/")
            doomed += P.collectable_objects(
                ((e.key[len(prefix) + 1:], e.last_modified) for e in listing.entries),
                referenced, listing.store_now, policy.min_chunk_age_s)
        _delete_many(store, [f"{prefix}/{o}" for o in doomed])
        return tuple(retired), len(doomed), ""
    finally:
        with contextlib.suppress(StoreError):
            store.delete(gc_key)


def _delete_many(store: StoreAPI, rels: list[str]) -> None:
    store.delete_many(rels)


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


def backup(store: StoreAPI, group: str, spec: DataSpec, paths: Paths, final: bool = False, *,
           instance_id: str = "unknown", clock: Clock = SYSTEM_CLOCK,
           deadline: Deadline | None = None, progress: ProgressFn | None = None,
           policy: D.GcPolicy | None = None, concurrency: int = DEFAULT_CONCURRENCY
           ) -> BackupResult:
    """Back up one config ``data`` entry (``name``, ``path``, ``keep``, ``chunk_size``)."""
    if final and deadline is None:
        deadline = Deadline.after(FINAL_DEADLINE_S, "final backup", clock)
    return Backup(store, group, spec.name, paths.rooted(spec.path), instance_id=instance_id,
                  keep=spec.keep, chunk_size=spec.chunk_size or D.DEFAULT_CHUNK_SIZE,
                  concurrency=concurrency, policy=policy or D.GcPolicy(), clock=clock,
                  deadline=deadline, final=final, progress=progress).run()


@dataclass(frozen=True)
class EntryOutcome:
    name: str
    result: BackupResult | None = None
    error: str = ""


def run_backups(store: StoreAPI, config: Config, paths: Paths, *, instance_id: str,
                final: bool = False,
                only: str | None = None, clock: Clock = SYSTEM_CLOCK,
                deadline: Deadline | None = None, progress: ProgressFn | None = None
                ) -> list[EntryOutcome]:
    """Back up every data entry (or the one named ``only``); one failing does not stop the rest."""
    from agent.heal.leases import superseded

    if superseded(store, config.group, instance_id):
        # Replaced (#10): the replacement owns the dataset now; writing ours over it
        # would put a dead instance's data back as "latest".
        return [EntryOutcome(spec.name, error=f"superseded: {instance_id} was replaced; "
                             "no backup over its replacement's data")
                for spec in config.data if not only or spec.name == only]
    if final and deadline is None:
        deadline = Deadline.after(FINAL_DEADLINE_S, "final backup", clock)
    out: list[EntryOutcome] = []
    for spec in config.data:
        if only and spec.name != only:
            continue
        try:
            res = backup(store, config.group, spec, paths, final, instance_id=instance_id,
                         clock=clock, deadline=deadline, progress=progress)
            out.append(EntryOutcome(spec.name, res))
        except AgentError as exc:
            out.append(EntryOutcome(spec.name, error=str(exc)))
    return out


def backup_due(config: Config, last: dict[str, float], now: float) -> list[DataSpec]:
    """The data entries whose ``backup_interval_s`` has passed since ``last[name]``."""
    return [s for s in config.data if D.due(last.get(s.name), float(s.backup_interval_s), now)]


# -- command line helpers -------------------------------------------------------------------------

class TtyProgress:
    """One progress line on stderr when it is a terminal (bytes, files, rate, ETA),
    redrawn at most twice a second; silent otherwise (logs, pipes, systemd)."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.on = bool(getattr(self.stream, "isatty", lambda: False)())
        self.drawn = False

    def __call__(self, info: dict[str, Any]) -> None:
        if not self.on:
            return
        self.stream.write("\r" + progress_line(self.label, info) + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def done(self) -> None:
        if self.on and self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def progress_line(label: str, info: dict[str, Any]) -> str:
    """``restore app [######    ]  52% 210.3 MiB/400.0 MiB  120/201 files  48.1 MiB/s  ETA 4s``"""
    total = int(info.get("total") or 0)
    done = int(info.get("bytes") or 0)
    frac = min(done / total, 1.0) if total else 1.0
    bar = "#" * int(frac * 20)
    line = (f"{label} [{bar:<20}] {frac:4.0%} {_human(done)}/{_human(total)}"
            f"  {int(info.get('files') or 0)}/{int(info.get('files_total') or 0)} files"
            f"  {_human(int(info.get('rate') or 0))}/s")
    eta = info.get("eta_s")
    if eta is not None and done < total:
        line += f"  ETA {_duration(float(eta))}"
    return line


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _human(n: int) -> str:
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if f < 1024 or unit == "GiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return f"{n} B"


def load_runtime(paths: Paths) -> tuple[Config, str]:
    """(merged config, instance id) for ``backup``/``restore`` run by hand or at shutdown."""
    from agent.aws.imds import ImdsClient, ImdsMetadata
    from agent.config.memo import config_on_host
    from agent.host import state as statefile

    st = statefile.read(paths.state_file) or {}
    imds = ImdsClient()
    cfg = config_on_host(paths, imds.user_data(), ImdsMetadata(imds))
    instance_id = st.get("instance_id") or imds.identity().instance_id
    return cfg, str(instance_id)


def use_lean_aws_data(paths: Paths) -> None:
    """``backup``/``restore`` run by hand: load the lean botocore model copies the daemon
    built (``agent.aws.botodata``), as boot does: ~12 MB less RSS and a faster first client.
    Nothing built yet: botocore's own data, as before."""
    from agent.aws import botodata as awsdata
    from agent.aws import session as aws

    aws.use_data(awsdata.find(paths.aws_data_dir))


def store_for(cfg: Config, concurrency: int = DEFAULT_CONCURRENCY,
              region: str | None = None) -> Store:
    """A store for moving data: a longer read timeout, a connection per transfer thread.

    ``region`` is the fallback (the instance's) when the config does not pin one.
    """
    from agent.aws import session as aws
    from agent.aws.store import Store

    region = cfg.store.region or region
    # one client for every thread: its pool keeps a connection per thread alive; sha256 per
    # blob checks every byte, so botocore's CRC32 would be a second pass over each
    client = aws.client("s3", region, max_pool_connections=max(10, concurrency + 2),
                        read_timeout=60, checksums="when_required")
    return Store(cfg.store.bucket, cfg.store.prefix, client=client)
