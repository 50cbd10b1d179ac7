"""Data snapshots, the pure part: layout, chunking, manifests, retention, GC, restore decisions.

Layout under ``<prefix>/data/<group>/<name>/``::

    chunks/<sha256>                 content-addressed; written once, never rewritten
    snapshots/<snapshot-id>.json    one manifest per snapshot; written last (commit point)
    locks/backup-<snapshot-id>      "a backup is in flight" (removed at its end)
    locks/gc-<token>                "chunks are being collected" (removed at its end)

There is no ``latest`` pointer: ids sort by time (``20261127T001500Z-000-<instance>-<rand>``,
the timestamp taken from the *store's* clock, so ids written by different instances order on
one clock), and the latest snapshot is the greatest id in a listing of ``snapshots/``. A
pointer would be a second object that can disagree with the manifests; a listing cannot.

Chunking is fixed-size (default 1 MiB, at most 8 MiB). Content-defined chunking only wins
on insertions in the middle of large files, which is what source trees and VM images do,
not what data directories do: databases overwrite pages in place and logs append, and for
both a fixed grid re-uploads only the chunks that were touched. A rolling hash would also
cost a per-byte Python loop (or a C extension we do not ship), ~20x slower than sha256.
1 MiB (restic and borg average 1-2 MiB) keeps a 1 % change of in-place writes near 1-2 %
uploaded, at one PUT per MiB on the first backup.

Garbage collection must not race a concurrent backup, which can (a) have uploaded chunks
that no manifest references yet, and (b) be about to commit a manifest that *reuses* an old
chunk that only a snapshot being retired references. (a) is covered by age: a chunk is only
collected when its LastModified is older than ``min_chunk_age_s`` on the store's clock.
(b) needs a handshake, because a reused chunk is old: a backup writes its ``locks/backup-*``
marker and then lists locks; a collector writes its ``locks/gc-*`` marker and then lists
locks. S3 is strongly consistent, so at least one of the two sees the other: the backup then
waits for the collection to finish before listing chunks, or the collector skips deleting
chunks this round. Markers older than ``lock_ttl_s`` (store clock) are a crashed process's and
are ignored; a long backup refreshes its own marker.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import layout
from agent.errors import IntegrityError

MIB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 1 * MIB
MAX_CHUNK_SIZE = 8 * MIB
MIN_CHUNK_SIZE = 4096
FORMAT = 1
HEX = set("0123456789abcdef")


# -- keys -----------------------------------------------------------------------------------------


# Every key is in agent.layout; these names are kept for the data modules' callers.
base = layout.data_base
chunk_key = layout.chunk_key
snapshot_key = layout.snapshot_key


def snapshot_ids(rel_keys: Iterable[str], group: str, name: str) -> list[str]:
    """Snapshot ids from a listing of ``snapshots/``, oldest first."""
    pre = layout.snapshots_prefix(group, name)
    ids = [k[len(pre) : -5] for k in rel_keys if k.startswith(pre) and k.endswith(".json")]
    return sorted(i for i in ids if i and "/" not in i)


def new_snapshot_id(store_now: float, instance_id: str, rand: str | None = None,
                    after: str | None = None) -> str:
    """``<UTC stamp on the store's clock>-<seq>-<instance>-<rand>``: sortable by time.

    The store's Date has one-second resolution, so ``seq`` orders snapshots taken within
    one second: given the latest existing id (``after``), the new id always sorts after it
    (a store clock that stepped back cannot reorder snapshots either)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(store_now))
    seq = 0
    if after and after[:16] >= stamp:
        stamp = after[:16]
        try:
            seq = int(after[17:20]) + 1
        except ValueError:
            seq = 999
    inst = "".join(c if c.isalnum() or c in "-_." else "_" for c in instance_id) or "unknown"
    return f"{stamp}-{min(seq, 999):03d}-{inst}-{rand or secrets.token_hex(4)}"


# -- chunking -------------------------------------------------------------------------------------


def check_chunk_size(size: int) -> int:
    if not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {size} outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes")
    return size


def chunk_lengths(size: int, chunk_size: int) -> list[int]:
    """The byte length of each chunk of a file of ``size`` bytes (an empty file has none)."""
    if size <= 0:
        return []
    full, rest = divmod(size, chunk_size)
    return [chunk_size] * full + ([rest] if rest else [])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha(s: object) -> bool:
    return isinstance(s, str) and len(s) == 64 and set(s) <= HEX


# -- paths ----------------------------------------------------------------------------------------


def safe_rel(path: object) -> str:
    """A manifest path: relative, POSIX, no ``..``/``.``/empty parts, no NUL. Else refuse."""
    if not isinstance(path, str) or not path:
        raise IntegrityError(f"unsafe path in snapshot: {path!r}")
    if path.startswith("/") or "\x00" in path or "\\" in path:
        raise IntegrityError(f"unsafe path in snapshot: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise IntegrityError(f"unsafe path in snapshot: {path!r}")
    return path


# -- manifest model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str
    mode: int
    size: int
    mtime: float
    sha256: str
    chunks: tuple[str, ...]
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class DirEntry:
    path: str
    mode: int
    mtime: float
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class LinkEntry:
    path: str
    target: str


@dataclass(frozen=True)
class Manifest:
    id: str
    group: str
    name: str
    created: float
    instance_id: str
    chunk_size: int
    files: tuple[FileEntry, ...] = ()
    dirs: tuple[DirEntry, ...] = ()
    symlinks: tuple[LinkEntry, ...] = ()
    root_mode: int = 0o755
    root_uid: int | None = None
    root_gid: int | None = None
    final: bool = False

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def chunk_set(self) -> set[str]:
        return {c for f in self.files for c in f.chunks}

    def to_json(self) -> dict[str, Any]:
        def own(e: FileEntry | DirEntry) -> dict[str, Any]:
            return {} if e.uid is None else {"uid": e.uid, "gid": e.gid}

        return {
            "format": FORMAT,
            "id": self.id,
            "group": self.group,
            "name": self.name,
            "created": self.created,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "instance_id": self.instance_id,
            "final": self.final,
            "chunk_size": self.chunk_size,
            "root_mode": self.root_mode,
            **(
                {}
                if self.root_uid is None
                else {"root_uid": self.root_uid, "root_gid": self.root_gid}
            ),
            "total_bytes": self.total_bytes,
            "files": [
                {
                    "path": f.path,
                    "mode": f.mode,
                    "size": f.size,
                    "mtime": f.mtime,
                    "sha256": f.sha256,
                    "chunks": list(f.chunks),
                    **own(f),
                }
                for f in self.files
            ],
            "dirs": [
                {"path": d.path, "mode": d.mode, "mtime": d.mtime, **own(d)} for d in self.dirs
            ],
            "symlinks": [{"path": s.path, "target": s.target} for s in self.symlinks],
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()


def _int(d: dict[str, Any], k: str, what: str) -> int:
    v = d.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise IntegrityError(f"snapshot {what}: bad {k!r}: {v!r}")
    return v


def _owner(d: dict[str, Any]) -> tuple[int | None, int | None]:
    uid, gid = d.get("uid"), d.get("gid")
    if isinstance(uid, int) and isinstance(gid, int) and uid >= 0 and gid >= 0:
        return uid, gid
    return None, None


def parse_manifest(raw: bytes, *, what: str = "manifest") -> Manifest:
    """Untrusted bytes from the store -> a checked ``Manifest``, or ``IntegrityError``.

    Refuses unsafe paths, duplicates, and any entry below a file or a symlink (a
    symlink in the tree must never let a later write land outside the staging dir),
    and chunk lists that do not match the file size on the snapshot's chunk grid.
    """
    try:
        d = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise IntegrityError(f"{what}: not a format-{FORMAT} snapshot manifest")
    chunk_size = _int(d, "chunk_size", what)
    if chunk_size < 1:
        raise IntegrityError(f"{what}: bad chunk_size {chunk_size}")
    files: list[FileEntry] = []
    for f in d.get("files") or []:
        if not isinstance(f, dict):
            raise IntegrityError(f"{what}: file entry is not an object")
        path = safe_rel(f.get("path"))
        size = _int(f, "size", f"{what} {path}")
        chunks = f.get("chunks")
        if not isinstance(chunks, list) or not all(is_sha(c) for c in chunks):
            raise IntegrityError(f"{what} {path}: bad chunk list")
        if len(chunks) != len(chunk_lengths(size, chunk_size)):
            raise IntegrityError(f"{what} {path}: {len(chunks)} chunks for {size} bytes")
        if not is_sha(f.get("sha256")):
            raise IntegrityError(f"{what} {path}: bad sha256")
        uid, gid = _owner(f)
        files.append(
            FileEntry(
                path,
                _int(f, "mode", path) & 0o7777,
                size,
                float(f.get("mtime") or 0),
                f["sha256"],
                tuple(chunks),
                uid,
                gid,
            )
        )
    dirs: list[DirEntry] = []
    for e in d.get("dirs") or []:
        if not isinstance(e, dict):
            raise IntegrityError(f"{what}: dir entry is not an object")
        path = safe_rel(e.get("path"))
        uid, gid = _owner(e)
        dirs.append(
            DirEntry(path, _int(e, "mode", path) & 0o7777, float(e.get("mtime") or 0), uid, gid)
        )
    links: list[LinkEntry] = []
    for e in d.get("symlinks") or []:
        if not isinstance(e, dict):
            raise IntegrityError(f"{what}: symlink entry is not an object")
        path = safe_rel(e.get("path"))
        target = e.get("target")
        if not isinstance(target, str) or not target or "\x00" in target:
            raise IntegrityError(f"{what} {path}: bad symlink target")
        links.append(LinkEntry(path, target))
    check_tree([f.path for f in files], [x.path for x in dirs], [x.path for x in links], what)
    ruid, rgid = _owner({"uid": d.get("root_uid"), "gid": d.get("root_gid")})
    return Manifest(
        id=str(d.get("id", "")),
        group=str(d.get("group", "")),
        name=str(d.get("name", "")),
        created=float(d.get("created") or 0),
        instance_id=str(d.get("instance_id", "")),
        chunk_size=chunk_size,
        files=tuple(files),
        dirs=tuple(dirs),
        symlinks=tuple(links),
        root_mode=_int(d, "root_mode", what) & 0o7777 if "root_mode" in d else 0o755,
        root_uid=ruid,
        root_gid=rgid,
        final=bool(d.get("final")),
    )


def check_tree(
    files: Sequence[str], dirs: Sequence[str], links: Sequence[str], what: str = "manifest"
) -> None:
    """Every path once; every ancestor of an entry is a directory (never a file or a link)."""
    seen: set[str] = set()
    for p in (*files, *dirs, *links):
        if p in seen:
            raise IntegrityError(f"{what}: path appears twice: {p!r}")
        seen.add(p)
    leaves = set(files) | set(links)
    for p in seen:
        parts = p.split("/")
        for i in range(1, len(parts)):
            anc = "/".join(parts[:i])
            if anc in leaves:
                raise IntegrityError(f"{what}: {p!r} lies below the file or symlink {anc!r}")


# -- retention and garbage collection -------------------------------------------------------------


@dataclass(frozen=True)
class GcPolicy:
    """How cautious collection is; ages are judged on the store's clock."""

    min_chunk_age_s: float = 3600.0
    lock_ttl_s: float = 3600.0


def retire(ids: Sequence[str], keep: int) -> tuple[list[str], list[str]]:
    """(kept, retired): the newest ``keep`` snapshot ids stay. ``keep`` < 1 is refused."""
    if keep < 1:
        raise ValueError("keep must be at least 1: a snapshot store with none is a wipe")
    ordered = sorted(ids)
    return ordered[-keep:], ordered[:-keep]


def collectable(
    chunks: Iterable[tuple[str, float]], referenced: set[str], store_now: float, min_age_s: float
) -> list[str]:
    """Chunks no remaining manifest references and old enough that no live backup can be
    about to reference them as new uploads. ``chunks``: (sha, last_modified) on the store clock."""
    return sorted(
        sha for sha, lm in chunks if sha not in referenced and store_now - lm >= min_age_s
    )


def fresh(last_modified: float, store_now: float, ttl_s: float) -> bool:
    return store_now - last_modified < ttl_s


# -- schedule and restore decisions ---------------------------------------------------------------


def due(last_backup_at: float | None, interval_s: float, now: float) -> bool:
    """A backup is due when none was made yet or ``interval_s`` has passed (now on one clock)."""
    if last_backup_at is None:
        return True
    return now - last_backup_at >= interval_s


@dataclass(frozen=True)
class RestoreDecision:
    action: str  # "restore" | "keep"
    reason: str
    move_aside: bool = False


def decide_restore(boot_kind: str, local: str, restored_here: bool) -> RestoreDecision:
    """Whether boot restores a data entry. ``local``: "missing" | "empty" | "data".

    Local data is never destroyed: on a reboot (or a re-run of this instance's first boot
    after a restore already happened) it is kept as is. A brand-new instance whose data
    dir already holds something (seed data baked into the image, a stray volume) gets the
    group's snapshot, and the local content is moved aside, not deleted.
    """
    if local in ("missing", "empty"):
        return RestoreDecision("restore", f"data dir {local}")
    if boot_kind == "first" and not restored_here:
        return RestoreDecision("restore", "first boot of this instance", move_aside=True)
    return RestoreDecision("keep", "kept local data")


@dataclass
class Progress:
    """Bytes done / total and a rate; ``tick`` says when a report is worth sending."""

    total: int
    started: float
    done: int = 0
    last_report: float = field(default=-1e18)
    every_s: float = 0.5

    def add(self, n: int) -> None:
        self.done += n

    def info(self, now: float) -> dict[str, Any]:
        elapsed = max(now - self.started, 1e-9)
        return {"bytes": self.done, "total": self.total, "rate": round(self.done / elapsed, 1)}

    def tick(self, now: float) -> bool:
        if now - self.last_report >= self.every_s or self.done >= self.total:
            self.last_report = now
            return True
        return False
