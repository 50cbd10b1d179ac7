"""Data snapshots, the restore half: rebuild a snapshot beside the target and swap it in.

Build the snapshot in a hidden staging dir beside the target (same filesystem): fetch
each needed blob once with ranged GETs of its pack, many requests in parallel, each read
a piece (``packs.PIECE``) at a time as it arrives; verify each blob's sha256 and length,
write it where it belongs from the fetching thread (each file is created by its first
write and stays open until its last) and start its writeback (a large file's every few
MiB written to it, small files' with a background ``syncfs`` every few MiB); check that
every file received exactly its size in verified bytes; make it all durable (one
``syncfs``, or an fsync per file where there is none), then swap it in with one
``renameat2(RENAME_EXCHANGE)`` (two renames where that is not available). A restore
killed at any moment leaves the target as it was; the next restore removes the leftover
staging dir. Local content that is replaced is moved aside, never deleted (an empty dir
is simply removed). Also the boot phase ``restore``: whether to restore is decided by
``agent.data.plan.decide_restore``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bootctx import BootContext, Done
from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.data import packs as P
from agent.data import plan as D
from agent.data.backup import (
    DEFAULT_CONCURRENCY,
    ProgressFn,
    _human,
    latest_snapshot,
    load_manifest,
)
from agent.errors import AgentError, IntegrityError, NotFound
from agent.host.files import fsync_dir
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
        rate = self.total_bytes / self.duration_s if self.duration_s > 0 else 0
        s = (f"{self.name}: restored {self.snapshot_id} ({self.files} files, "
             f"{_human(self.total_bytes)}) into {self.target} in {self.duration_s:.1f} s "
             f"({_human(int(rate))}/s, every byte verified)")
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


_SYNC_FILE_RANGE_WRITE = 2


def _libc_fn(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    """A libc function (errno kept for ``ctypes.get_errno``), or None where there is none."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    return fn  # type: ignore[no-any-return]


# Files smaller than this are not written back one by one: a writeback started per small
# file is one disk request (and one exit to the hypervisor) per file. A ``_Flusher`` sends
# them with a background ``syncfs`` each ``FLUSH_EVERY`` bytes, in a few merged requests.
# A larger file's writeback starts each ``WRITEBACK_EVERY`` bytes written to it, and once
# it is complete: a few large requests, not one per write.
WRITEBACK_MIN = 256 * 1024
WRITEBACK_EVERY = 4 * 1024 * 1024
FLUSH_EVERY = 8 * 1024 * 1024
# Files a restore keeps open between writes (file descriptors: well below any ulimit).
MAX_OPEN = 64

_SYNC_FILE_RANGE = _libc_fn("sync_file_range",
                            [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])


def _start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk now, without waiting
    (``sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)``: the whole file; pages already
    on their way are skipped): the disk works while the restore still fetches, and the one
    ``syncfs`` before the swap, which is what makes the tree durable, has little left to
    wait for. Best effort: where there is none, ``syncfs`` does it all."""
    if _SYNC_FILE_RANGE is not None:  # its errors only mean syncfs has more to do
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


_SYNCFS = _libc_fn("syncfs", [ctypes.c_int])


def _syncfs(fd: int) -> bool:
    """One ``syncfs(2)`` of the filesystem holding ``fd``; False where unavailable."""
    if _SYNCFS is None:
        return False
    if _SYNCFS(fd) != 0:
        err = ctypes.get_errno()
        if err in (38, 95):  # ENOSYS, EOPNOTSUPP
            return False
        raise OSError(err, f"syncfs: {os.strerror(err)}")
    return True


class _Flusher:
    """Writes small files' dirty pages back while the restore goes on: a background thread
    runs one ``syncfs`` whenever ``FLUSH_EVERY`` bytes of small writes have piled up
    since the last one, so the ``syncfs`` before the swap finds little left. Best effort:
    it syncs through its own open file of the staging dir, because ``syncfs`` reports a
    writeback error once per open file (Linux >= 5.8), so an error it swallows is still
    reported to the last ``syncfs``, made through the restore's own ``root_fd``."""

    def __init__(self, root_fd: int) -> None:
        self.fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
        self.pending = 0
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.done = False
        self.thread = threading.Thread(target=self._run, name="restore-flush", daemon=True)
        self.thread.start()

    def add(self, n: int) -> None:
        with self.lock:
            self.pending += n
            if self.pending < FLUSH_EVERY:
                return
            self.pending = 0
        self.wake.set()

    def _run(self) -> None:
        while True:
            self.wake.wait()
            self.wake.clear()
            if self.done:
                return
            with contextlib.suppress(OSError):
                _syncfs(self.fd)

    def close(self) -> None:
        """Stop (once the ``syncfs`` under way, if any, is over); again: no-op."""
        self.done = True
        self.wake.set()
        self.thread.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Writer:
    """Fetch threads' shared state: where each blob goes, and how much of each file is in.

    Every blob is fetched once (a ranged GET of its pack, shared with its neighbours),
    checked (length, sha256: the one checksum pass over each byte), then written with
    ``pwrite`` into every file and offset that holds it, by the thread that fetched it:
    writers run in parallel, and memory is one piece (``packs.PIECE``) per thread.

    Blobs that follow each other both in the piece and in one file (a file's chunks are
    packed in order) go out in one ``pwrite``. Each file is opened once, by its first
    write, which creates it (the staging dir is the restore's own, and a manifest names
    each path once), and stays open until its last write (at most ``MAX_OPEN`` at a time;
    past that, a write opens and closes its file itself)."""

    def __init__(self, store: StoreAPI, m: D.Manifest, root_fd: int,
                 flusher: _Flusher | None = None) -> None:
        self.store = store
        self.flusher = flusher
        self.m = m
        self.root_fd = root_fd
        self.base = D.base(m.group, m.name)
        self.place: dict[str, list[tuple[int, int]]] = {}
        for i, f in enumerate(m.files):
            off = 0
            for c in f.chunks:
                self.place.setdefault(c, []).append((i, off))
                off += m.blobs[c].length
        self.written = [0] * len(m.files)
        self.unflushed = [0] * len(m.files)  # bytes written since the file's last writeback
        self.fds: dict[int, int] = {}  # file index -> its open fd, until its last write
        self.lock = threading.Lock()
        self.opening = [threading.Lock() for _ in range(16)]
        self.stop = threading.Event()

    def who(self, sha: str) -> str:
        i, off = self.place[sha][0]
        return f"{self.m.files[i].path}: chunk at offset {off} ({sha})"

    def fetch(self, fx: P.Fetch) -> tuple[int, int]:
        """(bytes written, files completed) for one request, read a piece at a time."""
        if self.stop.is_set():
            return 0, 0
        rel = f"{self.base}/{fx.obj}"
        written = done = 0
        if fx.whole:  # format 1: a chunk object, fetched whole (at most one chunk)
            try:
                obj = self.store.get(rel)
            except NotFound as exc:
                raise self._missing(fx) from exc
            body = obj.body
            if len(body) != fx.end - fx.start:
                raise IntegrityError(f"{self.who(fx.blobs[0][0])} is truncated or wrong "
                                     f"size: {len(body)} bytes, expected {fx.end - fx.start}")
            return self._put(fx.start, body, fx.blobs)
        cuts = P.pieces(fx)
        stream = self.store.read_range(rel, fx.start, fx.end, [n for n, _ in cuts])
        with contextlib.closing(stream):
            start = fx.start
            for n, blobs in cuts:
                try:
                    piece = next(stream, b"")
                except NotFound as exc:
                    raise self._missing(fx) from exc
                w, d = self._put(start, piece, blobs)
                written += w
                done += d
                if self.stop.is_set():
                    break
                start += n
        return written, done

    def _missing(self, fx: P.Fetch) -> IntegrityError:
        return IntegrityError(f"{self.who(fx.blobs[0][0])} is missing from the store "
                              f"({fx.obj} not found)")

    def _put(self, start: int, body: bytes, blobs: tuple[P.Blob, ...]) -> tuple[int, int]:
        """Check each blob of ``body`` (bytes from object offset ``start``), then write the
        blobs wherever they belong, neighbours in one file in one write: (bytes written,
        files completed). Nothing is written before every blob of the piece passed."""
        view = memoryview(body)
        runs: list[list[int]] = []  # [file, file offset, offset in body, length]
        for sha, off, ln in blobs:
            rel = off - start
            blob = view[rel:rel + ln]
            if len(blob) != ln:
                raise IntegrityError(f"{self.who(sha)} is truncated or wrong size: "
                                     f"{len(blob)} bytes, expected {ln}")
            if hashlib.sha256(blob).hexdigest() != sha:
                raise IntegrityError(f"{self.who(sha)} failed its checksum")
            for i, foff in self.place[sha]:
                last = runs[-1] if runs else None
                if last and last[0] == i and last[1] + last[3] == foff and last[2] + last[3] == rel:
                    last[3] += ln  # follows the previous run in the body and in the file
                else:
                    runs.append([i, foff, rel, ln])
        written = done = 0
        for i, foff, rel, ln in runs:
            if self.stop.is_set():
                break
            done += self._write(i, view[rel:rel + ln], foff)
            written += ln
        return written, done

    def _open(self, i: int) -> tuple[int, bool]:
        """File ``i``'s fd, created by the first open; (fd, kept open for later writes).

        One open per file: threads that want the same file wait for each other, on one of
        a few locks (``self.opening``), not on the writer's lock (a create can wait on the
        filesystem; other files' writes need not)."""
        with self.opening[i % len(self.opening)]:
            with self.lock:
                fd = self.fds.get(i)
            if fd is not None:
                return fd, True
            # relative to the staging dir, never following a link: cannot land outside it
            fd = os.open(self.m.files[i].path, _OPEN, 0o600, dir_fd=self.root_fd)
            with self.lock:
                keep = len(self.fds) < MAX_OPEN
                if keep:
                    self.fds[i] = fd
            return fd, keep

    def _write(self, i: int, data: memoryview, offset: int) -> bool:
        """Write verified bytes into file ``i``; the write that completes the file also sets
        its mode, owner and mtime (no write can follow it), and closes it. True when it did.

        A large file's writeback starts every ``WRITEBACK_EVERY`` bytes written to it and
        when it is complete (one request for many writes); small files' is the flusher's."""
        f = self.m.files[i]
        fd, kept = self._open(i)
        complete = False
        try:
            n = len(data)
            while data:
                k = os.pwrite(fd, data, offset)
                data = data[k:]
                offset += k
            with self.lock:
                self.written[i] += n
                # every other write into this file has counted its bytes already, so none
                # can still be using the fd that the completing write closes
                complete = self.written[i] == f.size
                if complete and kept:
                    del self.fds[i]
                flush = False
                if f.size >= WRITEBACK_MIN:
                    self.unflushed[i] += n
                    flush = complete or self.unflushed[i] >= WRITEBACK_EVERY
                    if flush:
                        self.unflushed[i] = 0
            if flush:
                _start_writeback(fd)
            elif f.size < WRITEBACK_MIN and self.flusher is not None:
                self.flusher.add(n)
            if complete:
                _set_meta(fd, f)
            return complete
        finally:
            if complete or not kept:
                os.close(fd)

    def close(self) -> None:
        """Close the files a failed or stopped restore left open."""
        with self.lock:
            fds, self.fds = list(self.fds.values()), {}
        for fd in fds:
            os.close(fd)


def _set_meta(fd: int, f: D.FileEntry) -> None:
    # owner first: a chown clears a file's setuid and setgid bits, even as root
    if f.uid is not None and os.geteuid() == 0:
        os.fchown(fd, f.uid, f.gid or 0)
    os.fchmod(fd, f.mode)
    os.utime(fd, (f.mtime, f.mtime))


def _build(store: StoreAPI, m: D.Manifest, staging: Path, concurrency: int, clock: Clock,
           deadline: Deadline | None, progress: ProgressFn | None) -> None:
    root_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    flusher: _Flusher | None = None
    try:
        if _SYNCFS is not None:
            flusher = _Flusher(root_fd)
        for d in sorted(m.dirs, key=lambda x: x.path.count("/")):
            os.mkdir(d.path, 0o700, dir_fd=root_fd)
        prog = D.Progress(total=m.total_bytes, started=clock.monotonic(),
                          files=sum(1 for f in m.files if f.size == 0),
                          files_total=len(m.files))
        w = _Writer(store, m, root_fd, flusher)
        plan = P.plan_fetches(w.place, m.blobs)
        # every request is queued at once: the fetch threads never wait for the writer
        # (they are the writers), and memory stays one piece per thread
        try:
            with ThreadPoolExecutor(concurrency, thread_name_prefix="restore") as pool:
                pending = {pool.submit(w.fetch, fx) for fx in plan}
                try:
                    while pending:
                        if deadline is not None:
                            deadline.check(f"restoring {m.name}")
                        finished, pending = wait(pending, timeout=0.5,
                                                 return_when=FIRST_COMPLETED)
                        for fut in finished:
                            n, done = fut.result()
                            prog.add(n)
                            prog.files += done
                        now = clock.monotonic()
                        if progress is not None and finished and prog.tick(now):
                            progress(prog.info(now))
                except BaseException:
                    w.stop.set()
                    for fut in pending:
                        fut.cancel()
                    raise
        finally:
            w.close()
        for f, n in zip(m.files, w.written, strict=True):
            if n != f.size:  # every byte of every file came from a verified blob
                raise IntegrityError(f"{f.path}: restored {n} of {f.size} bytes")
        chown = os.geteuid() == 0
        for f in m.files:
            if f.size == 0:  # no write created or completed it: both happen here
                fd = os.open(f.path, _CREATE, 0o600, dir_fd=root_fd)
                try:
                    _set_meta(fd, f)
                finally:
                    os.close(fd)
        for s in m.symlinks:
            os.symlink(s.target, s.path, dir_fd=root_fd)
        for d in sorted(m.dirs, key=lambda x: -x.path.count("/")):  # deepest first
            if chown and d.uid is not None:  # owner first, as for files
                os.chown(d.path, d.uid, d.gid or 0, dir_fd=root_fd)
            os.chmod(d.path, d.mode, dir_fd=root_fd)
            os.utime(d.path, (d.mtime, d.mtime), dir_fd=root_fd)
        if chown and m.root_uid is not None:
            os.chown(root_fd, m.root_uid, m.root_gid or 0)
        os.chmod(root_fd, m.root_mode)
        # Durable before the swap: one syncfs for the whole tree instead of an fsync per file
        # (and per dir); where there is none, fsync every file and dir.
        if flusher is not None:
            flusher.close()
        if not _syncfs(root_fd):
            for f in m.files:
                _fsync_at(root_fd, f.path, directory=False)
            for d in m.dirs:
                _fsync_at(root_fd, d.path)
            os.fsync(root_fd)
    finally:
        if flusher is not None:
            flusher.close()
        os.close(root_fd)
    if progress is not None:
        progress(prog.info(clock.monotonic()))


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
# A file's first write creates it; later ones (other threads too) open the same file.
_OPEN = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW


def _fsync_at(dir_fd: int, rel: str, directory: bool = True) -> None:
    flags = os.O_RDONLY | os.O_NOFOLLOW | (os.O_DIRECTORY if directory else 0)
    fd = os.open(rel, flags, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


_RENAMEAT2 = _libc_fn("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                     ctypes.c_char_p, ctypes.c_uint])


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
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
    from agent.host.files import atomic_write

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
