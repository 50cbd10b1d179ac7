"""Pack objects, the pure part: blobs packed into larger immutable objects; fetch plans.

A *blob* is one chunk's bytes, named by its sha256. A *pack* is an immutable object
``packs/<id>`` holding blobs back to back (no header); ``id`` is the sha256 of the ids
of its blobs in order, so a pack's name is derived from its content. Where each blob
lives (pack, offset, length) is recorded in the snapshot manifest that uses it, which
is written last: a pack no manifest names is an upload in flight or a crashed one's
garbage, never half of a snapshot.

Small files become blobs in a few packs, so a backup or a restore costs requests in
proportion to bytes (one per ``PACK_TARGET``), not to files. Restore reads packs with
ranged GETs: the blobs it needs from one pack, merged into one range when the gap
between them is small (``plan_fetches``).

Garbage collection works on packs: a pack is collectable when no remaining manifest
names it (no blob in it is referenced) and it is older than ``min_chunk_age_s`` on the
store's clock; the lock handshake of ``agent.data.plan`` protects a live backup that reuses
blobs in an old pack. A pack with some referenced blobs stays whole: there is no
repacking (restic's ``prune`` repacks), so the dead bytes of a kept pack stay until
every blob in it is dead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MIB = 1024 * 1024
PACK_TARGET = 4 * MIB  # a pack is sealed once it holds this much
MAX_RANGE = 8 * MIB  # a ranged GET never asks for more (memory: ``PIECE``)
MAX_GAP = 256 * 1024  # read through a gap this small rather than issue another request
PIECE = 512 * 1024  # a range is read, checked and written a piece at a time, not held whole


@dataclass(frozen=True, slots=True)  # one per blob of a snapshot: no __dict__
class Loc:
    """Where a blob lives: the object (``packs/<id>``, or format 1's ``chunks/<sha>``),
    offset and length."""

    obj: str
    offset: int
    length: int


def pack_id(blob_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(blob_ids).encode()).hexdigest()


class PackBuilder:
    """Collects blobs until a pack is worth sealing (``full``); ``seal`` hands it over."""

    def __init__(self, target: int = PACK_TARGET) -> None:
        self.target = target
        self.buf = bytearray()
        self.ids: list[str] = []
        self.offsets: list[int] = []

    def add(self, sha: str, data: bytes | memoryview) -> None:
        self.ids.append(sha)
        self.offsets.append(len(self.buf))
        self.buf += data

    @property
    def full(self) -> bool:
        return len(self.buf) >= self.target

    def __len__(self) -> int:
        return len(self.ids)

    def seal(self) -> tuple[str, bytes, dict[str, Loc]]:
        """(pack id, bytes, blob -> Loc) and start a new pack."""
        pid = pack_id(self.ids)
        obj = f"packs/{pid}"
        body = bytes(self.buf)
        ends = [*self.offsets[1:], len(body)]
        locs = {sha: Loc(obj, off, end - off)
                for sha, off, end in zip(self.ids, self.offsets, ends, strict=True)}
        self.buf = bytearray()
        self.ids = []
        self.offsets = []
        return pid, body, locs


Blob = tuple[str, int, int]  # (sha, offset in the object, length)


@dataclass(frozen=True)
class Fetch:
    """One GET: ``obj`` bytes [start, end) and the blobs in it (sha, offset in the object)."""

    obj: str
    start: int
    end: int
    blobs: tuple[Blob, ...]  # in offset order
    whole: bool = False  # a format-1 chunk object: plain GET, its length is the blob's


def plan_fetches(needed: Iterable[str], locs: dict[str, Loc], *, max_gap: int = MAX_GAP,
                 max_range: int = MAX_RANGE) -> list[Fetch]:
    """The fewest bounded requests that read every needed blob once.

    Blobs of one object, in offset order, share a range while the gap between them is at
    most ``max_gap`` and the range stays within ``max_range`` (a single larger blob gets
    its own range). Format-1 chunk objects are fetched whole.
    """
    by_obj: dict[str, list[tuple[int, int, str]]] = {}
    for sha in set(needed):
        loc = locs[sha]
        by_obj.setdefault(loc.obj, []).append((loc.offset, loc.length, sha))
    out: list[Fetch] = []
    for obj in sorted(by_obj):
        items = sorted(by_obj[obj])
        if obj.startswith("chunks/"):
            for off, ln, sha in items:
                out.append(Fetch(obj, off, off + ln, ((sha, off, ln),), whole=True))
            continue
        cur: list[Blob] = []
        start = end = 0
        for off, ln, sha in items:
            if cur and (off - end > max_gap or max(end, off + ln) - start > max_range):
                out.append(Fetch(obj, start, end, tuple(cur)))
                cur = []
            if not cur:
                start = off
                end = off
            cur.append((sha, off, ln))
            end = max(end, off + ln)
        if cur:
            out.append(Fetch(obj, start, end, tuple(cur)))
    # the largest first: the tail of a restore is then many small requests in parallel
    out.sort(key=lambda f: -(f.end - f.start))
    return out


def pieces(fx: Fetch, max_piece: int = PIECE) -> list[tuple[int, tuple[Blob, ...]]]:
    """A range cut into consecutive reads that each hold whole blobs: (bytes to read, the
    blobs that end within them). A piece ends at the end of its last blob and grows to at
    most ``max_piece`` (one larger blob is a piece of its own); a gap the range reads
    through belongs to the piece after it. The sizes add up to ``end - start``."""
    out: list[tuple[int, tuple[Blob, ...]]] = []
    start = end = fx.start
    cur: list[Blob] = []
    for sha, off, ln in fx.blobs:
        if cur and max(end, off + ln) - start > max_piece:
            out.append((end - start, tuple(cur)))
            start, cur = end, []
        cur.append((sha, off, ln))
        end = max(end, off + ln)
    if cur:
        out.append((end - start, tuple(cur)))
    return out


def collectable_objects(objects: Iterable[tuple[str, float]], referenced: set[str],
                        store_now: float, min_age_s: float) -> list[str]:
    """Pack or chunk objects no remaining manifest names, old enough that no live backup can
    be about to name them as its own new uploads. ``objects``: (name, last_modified)."""
    return sorted(o for o, lm in objects if o not in referenced and store_now - lm >= min_age_s)
