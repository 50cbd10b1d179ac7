"""Data snapshots, the pure part: layout, manifests, retention, GC, restore decisions.

Layout under ``<prefix>/data/<group>/<name>/``::

    packs/<id>                      blobs (chunks) back to back; immutable (``agent.data.packs``)
    snapshots/<snapshot-id>.json    one manifest per snapshot, which is also the index of
                                    where its blobs live; written last (commit point)
    locks/backup-<snapshot-id>      "a backup is in flight" (removed at its end)
    locks/gc-<token>                "packs are being collected" (removed at its end)
    chunks/<sha256>                 format 1 (before packs): one object per chunk; read and
                                    collected, never written now

There is no ``latest`` pointer: ids sort by time (``20261127T001500Z-000-<instance>-<rand>``,
the timestamp taken from the *store's* clock, so ids written by different instances order on
one clock), and the latest snapshot is the greatest id in a listing of ``snapshots/``. A
pointer would be a second object that can disagree with the manifests; a listing cannot.

Chunking is content-defined (``agent.data.chunking``: FastCDC, 256 KiB average by default, 1/4x
to 4x), so an insertion moves the chunk boundaries around it only. Chunks are blobs named
by their sha256 and packed into pack objects (``agent.data.packs``): requests grow with bytes,
not with files. A backup dedups against every blob of the snapshots it can see, and skips
reading a file whose size, mtime, ctime and inode match the previous snapshot taken on this
instance (``unchanged``), except every ``REHASH_EVERY``-th backup, which reads everything.

Garbage collection must not race a concurrent backup, which can (a) have uploaded packs
that no manifest references yet, and (b) be about to commit a manifest that *reuses* a blob
in an old pack that only a snapshot being retired references. (a) is covered by age: a pack
is only collected when its LastModified is older than ``min_chunk_age_s`` on the store's
clock. (b) needs a handshake, because a reused pack is old: a backup writes its
``locks/backup-*`` marker and then lists locks; a collector writes its ``locks/gc-*`` marker
and then lists locks. S3 is strongly consistent, so at least one of the two sees the other:
the backup then waits for the collection to finish before reading the manifests it dedups
against, or the collector skips deleting packs this round. Markers older than ``lock_ttl_s``
(store clock) are a crashed process's and are ignored; a long backup refreshes its own
marker. A pack is collected only when no remaining manifest names it (none of its blobs is
referenced); partly dead packs are kept whole (no repacking).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import secrets
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent import layout
from agent.data.packs import Loc
from agent.errors import IntegrityError

MIB = 1024 * 1024
DEFAULT_CHUNK_SIZE = 256 * 1024  # average; an edit re-uploads ~one or two average chunks
MAX_CHUNK_SIZE = 8 * MIB
MIN_CHUNK_SIZE = 4096
FORMAT_V1 = 1  # chunks as objects (read, never written now)
FORMAT = 2  # blobs in packs; the manifest is the index
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


_SHA = re.compile(r"[0-9a-f]{64}")


def is_sha(s: object) -> bool:
    return isinstance(s, str) and _SHA.fullmatch(s) is not None


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


@dataclass(frozen=True, slots=True)  # one per file of a snapshot: no __dict__
class FileEntry:
    path: str
    mode: int
    size: int
    mtime: float
    sha256: str  # the whole file's (format 1); "" in format 2, where the blobs are the checks
    chunks: tuple[str, ...]
    uid: int | None = None
    gid: int | None = None
    # format 2: what a later backup compares to skip an unchanged file without reading it
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    ino: int | None = None


@dataclass(frozen=True, slots=True)
class DirEntry:
    path: str
    mode: int
    mtime: float
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True, slots=True)
class LinkEntry:
    path: str
    target: str


@dataclass(frozen=True)
class Manifest:
    """One snapshot. Format 2 (written now) also says where each blob lives (``blobs``:
    sha -> pack, offset, length): the manifest is the index, written last. Format 1
    (written before packs) stored each chunk as its own object ``chunks/<sha>``; parsing
    it fills ``blobs`` with those objects, so one restore path reads both."""

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
    format: int = FORMAT
    blobs: dict[str, Loc] = field(default_factory=dict)
    chunker: str = ""
    since_full: int = 0  # backups since the last one that re-read every file

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def chunk_set(self) -> set[str]:
        return {c for f in self.files for c in f.chunks}

    def objects(self) -> set[str]:
        """The store objects (``packs/<id>``, format 1 ``chunks/<sha>``) this snapshot needs."""
        if self.format == FORMAT_V1:
            return {f"chunks/{c}" for c in self.chunk_set()}
        return {self.blobs[c].obj for c in self.chunk_set()}

    def to_json(self) -> dict[str, Any]:
        def own(e: FileEntry | DirEntry) -> dict[str, Any]:
            return {} if e.uid is None else {"uid": e.uid, "gid": e.gid}

        def file(f: FileEntry) -> dict[str, Any]:
            d: dict[str, Any] = {"path": f.path, "mode": f.mode, "size": f.size,
                                 "mtime": f.mtime, "chunks": list(f.chunks), **own(f)}
            if self.format == FORMAT_V1:
                d["sha256"] = f.sha256
            else:
                d.update({k: v for k, v in (("mtime_ns", f.mtime_ns), ("ctime_ns", f.ctime_ns),
                                            ("ino", f.ino)) if v is not None})
            return d

        extra: dict[str, Any] = {}
        if self.format != FORMAT_V1:
            packs: dict[str, list[list[Any]]] = {}
            for sha in sorted(self.chunk_set()):
                loc = self.blobs[sha]
                packs.setdefault(loc.obj.removeprefix("packs/"), []).append(
                    [sha, loc.offset, loc.length])
            for v in packs.values():
                v.sort(key=lambda b: b[1])
            extra = {"chunker": self.chunker, "since_full": self.since_full, "packs": packs}
        return {
            "format": self.format,
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
            **extra,
            "files": [file(f) for f in self.files],
            "dirs": [
                {"path": d.path, "mode": d.mode, "mtime": d.mtime, **own(d)} for d in self.dirs
            ],
            "symlinks": [{"path": s.path, "target": s.target} for s in self.symlinks],
        }

    def dumps(self) -> bytes:
        """Format 1: JSON. Format 2: gzipped JSON (a manifest of many files is mostly
        repeated keys and hex; it is the only object an incremental backup always writes)."""
        body = json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()
        if self.format == FORMAT_V1:
            return body
        return gzip.compress(body, compresslevel=3, mtime=0)


def _int(d: dict[str, Any], k: str, what: str) -> int:
    v = d.get(k)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise IntegrityError(f"snapshot {what}: bad {k!r}: {v!r}")
    return v


def _opt_int(d: dict[str, Any], k: str) -> int | None:
    v = d.get(k)
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _owner(d: dict[str, Any]) -> tuple[int | None, int | None]:
    uid, gid = d.get("uid"), d.get("gid")
    if isinstance(uid, int) and isinstance(gid, int) and uid >= 0 and gid >= 0:
        return uid, gid
    return None, None


def _blob_table(d: dict[str, Any], what: str) -> dict[str, Loc]:
    packs = d.get("packs")
    if not isinstance(packs, dict):
        raise IntegrityError(f"{what}: no pack table")
    blobs: dict[str, Loc] = {}
    while packs:  # each entry goes once it is read: the raw table and ours are never both whole
        pid, entries = packs.popitem()
        if not is_sha(pid) or not isinstance(entries, list):
            raise IntegrityError(f"{what}: bad pack entry {pid!r}")
        obj = f"packs/{pid}"  # one string per pack, shared by its blobs
        for e in entries:
            if (not isinstance(e, list) or len(e) != 3 or not is_sha(e[0])
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in e[1:])
                    or e[1] < 0 or e[2] < 1):
                raise IntegrityError(f"{what}: bad blob entry in pack {pid}: {e!r}")
            blobs[sys.intern(e[0])] = Loc(obj, e[1], e[2])
    return blobs


def _decode(raw: bytes, what: str) -> dict[str, Any]:
    """Manifest bytes (gzip or plain JSON) -> the top-level object of a known format."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IntegrityError(f"{what}: not a readable gzip stream: {exc}") from exc
    try:
        d = json.loads(raw)
    except ValueError as exc:
        raise IntegrityError(f"{what}: not valid JSON: {exc}") from exc
    if not isinstance(d, dict) or d.get("format") not in (FORMAT_V1, FORMAT):
        raise IntegrityError(f"{what}: not a format-{FORMAT_V1} or format-{FORMAT} "
                             "snapshot manifest")
    return d


def _drain(d: dict[str, Any], key: str, what: str) -> Iterator[Any]:
    """The items of the list ``d[key]`` in order, each let go once the next is asked for:
    a large manifest's raw entries and its checked ones are never all in memory at once."""
    items = d.pop(key, None) or []
    if not isinstance(items, list):
        raise IntegrityError(f"{what}: bad {key} list")
    items.reverse()
    while items:
        yield items.pop()


def parse_manifest(raw: bytes, *, what: str = "manifest") -> Manifest:
    """Untrusted bytes from the store -> a checked ``Manifest``, or ``IntegrityError``.

    Refuses unsafe paths, duplicates, and any entry below a file or a symlink (a
    symlink in the tree must never let a later write land outside the staging dir),
    and chunk lists that do not add up to the file size (format 1: on the snapshot's
    chunk grid; format 2: by the blob lengths of the pack table, where every chunk must be).
    """
    d = _decode(raw, what)
    fmt = d["format"]
    chunk_size = _int(d, "chunk_size", what)
    if chunk_size < 1:
        raise IntegrityError(f"{what}: bad chunk_size {chunk_size}")
    blobs = _blob_table(d, what) if fmt == FORMAT else {}
    files: list[FileEntry] = []
    for f in _drain(d, "files", what):
        if not isinstance(f, dict):
            raise IntegrityError(f"{what}: file entry is not an object")
        path = safe_rel(f.get("path"))
        size = _int(f, "size", f"{what} {path}")
        chunks = f.get("chunks")
        if not isinstance(chunks, list) or not all(is_sha(c) for c in chunks):
            raise IntegrityError(f"{what} {path}: bad chunk list")
        chunks = [sys.intern(c) for c in chunks]  # one string per blob, not one per use
        if fmt == FORMAT_V1:
            lengths = chunk_lengths(size, chunk_size)
            if len(chunks) != len(lengths):
                raise IntegrityError(f"{what} {path}: {len(chunks)} chunks for {size} bytes")
            if not is_sha(f.get("sha256")):
                raise IntegrityError(f"{what} {path}: bad sha256")
            for c, ln in zip(chunks, lengths, strict=True):
                if blobs.setdefault(c, Loc(f"chunks/{c}", 0, ln)).length != ln:
                    raise IntegrityError(f"{what} {path}: chunk {c} has two lengths")
        else:
            missing = [c for c in chunks if c not in blobs]
            if missing:
                raise IntegrityError(f"{what} {path}: chunk {missing[0]} is in no pack")
            total = sum(blobs[c].length for c in chunks)
            if total != size:
                raise IntegrityError(f"{what} {path}: chunks hold {total} bytes, "
                                     f"the file {size}")
        uid, gid = _owner(f)
        files.append(
            FileEntry(
                path,
                _int(f, "mode", path) & 0o7777,
                size,
                float(f.get("mtime") or 0),
                f["sha256"] if fmt == FORMAT_V1 else "",
                tuple(chunks),
                uid,
                gid,
                _opt_int(f, "mtime_ns"),
                _opt_int(f, "ctime_ns"),
                _opt_int(f, "ino"),
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
    used = {c for f in files for c in f.chunks}
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
        format=fmt,
        blobs={c: loc for c, loc in blobs.items() if c in used},
        chunker=str(d.get("chunker") or ""),
        since_full=_opt_int(d, "since_full") or 0,
    )


def referenced_objects(raw: bytes, *, what: str = "manifest") -> set[str]:
    """The store objects a manifest needs, without checking the rest of it: what collection
    must keep. Anything unreadable raises ``IntegrityError``, so collection stops rather
    than deleting what an unreadable snapshot may need."""
    d = _decode(raw, what)
    if d["format"] == FORMAT:
        packs = d.get("packs")
        if not isinstance(packs, dict):
            raise IntegrityError(f"{what}: no pack table")
        return {f"packs/{p}" for p in packs}
    files = d.get("files") or []
    if not isinstance(files, list):
        raise IntegrityError(f"{what}: bad file list")
    out: set[str] = set()
    for f in files:
        chunks = f.get("chunks") if isinstance(f, dict) else None
        if not isinstance(chunks, list):
            raise IntegrityError(f"{what}: bad chunk list")
        out.update(f"chunks/{c}" for c in chunks)
    return out


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


def unchanged(prev: FileEntry | None, size: int, mtime_ns: int, ctime_ns: int, ino: int) -> bool:
    """May a backup reuse ``prev``'s chunks for a file without reading it? Only when size,
    mtime, ctime and inode all match (restic's rule, plus ctime, which a write that
    restores its old mtime still moves)."""
    return (prev is not None and prev.ino is not None
            and (prev.size, prev.mtime_ns, prev.ctime_ns, prev.ino) == (size, mtime_ns, ctime_ns,
                                                                          ino))


REHASH_EVERY = 24  # every n-th backup reads every file again, unchanged or not


def full_rehash_due(prev_since_full: int | None, every: int = REHASH_EVERY) -> bool:
    """Re-read everything when there is no previous snapshot to compare with, or when
    ``every`` backups have trusted metadata since the last full read."""
    return prev_since_full is None or prev_since_full + 1 >= every


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
    """Bytes and files done / total, a rate and an ETA; ``tick`` says when a report is due."""

    total: int
    started: float
    done: int = 0
    last_report: float = field(default=-1e18)
    every_s: float = 0.5
    files: int = 0
    files_total: int = 0

    def add(self, n: int) -> None:
        self.done += n

    def info(self, now: float) -> dict[str, Any]:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0)
        eta = round(left / rate, 1) if rate > 0 else None
        return {"bytes": self.done, "total": self.total, "rate": round(rate, 1),
                "files": self.files, "files_total": self.files_total,
                "elapsed_s": round(elapsed, 1), "eta_s": eta}

    def tick(self, now: float) -> bool:
        if now - self.last_report >= self.every_s or self.done >= self.total:
            self.last_report = now
            return True
        return False
