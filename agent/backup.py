"""Data snapshots, the backup half: back up a directory to the store, safely.

Decisions (layout, manifest checks, retention, what may be collected, whether boot
restores) live in ``agent.data``; this module walks files, moves bytes and renames dirs.

Backup: stream each file in fixed chunks, upload the chunks the store does not have yet
(one listing of ``chunks/`` per backup; bounded parallel PUTs, bounded memory), then write
the manifest create-only: that write is the commit point. A backup killed at any moment
leaves only unreferenced chunks and a stale lock, never a half snapshot. Then retire old
manifests and collect chunks (see ``agent.data`` for why that cannot race a live backup).

Restore is ``agent.restore``.
"""

from __future__ import annotations

import contextlib
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
from typing import Any

from agent import data as D
from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.errors import AgentError, IntegrityError, NotFound, StoreError

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
    from agent.leases import superseded

    if superseded(store, config.group, instance_id):
        # Replaced (#10): the replacement owns the dataset now; writing ours over it
        # would put a dead instance's data back as "latest".
        return [EntryOutcome(spec.name, error=f"superseded: {instance_id} was replaced; "
                             "no backup over its replacement's data")
                for spec in getattr(config, "data", None) or () if not only or spec.name == only]
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
    from agent.boot import ImdsMetadata

    user = parse_user_data(imds.user_data(), ImdsMetadata(imds))
    cur = paths.bundles_dir / "current" / "agent.yaml"
    bundle = load_yaml_file(cur) if cur.exists() else None
    cfg = load_layers(baked, user, bundle)
    instance_id = st.get("instance_id") or imds.identity().instance_id
    return cfg, str(instance_id)


def store_for(cfg: Any, concurrency: int = DEFAULT_CONCURRENCY,
              region: str | None = None) -> Any:
    """A store for moving data: ordinary timeouts, a connection per upload thread.

    ``region`` is the fallback (the instance's) when the config does not pin one.
    """
    from agent import aws
    from agent.store import Store

    region = getattr(cfg.store, "region", None) or region
    client = aws.client("s3", region, max_pool_connections=max(10, concurrency + 2))
    return Store(cfg.store.bucket, cfg.store.prefix, client=client)
