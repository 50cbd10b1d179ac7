"""Reading the group: who is in it, how old their heartbeats are, and who I watch.

Scale is the design constraint (issue #4, docs/cost-model.md). A member must not
LIST the whole group every interval: that is O(N/1000) pages per member and
O(N²) in aggregate. Per interval a member makes a constant number of requests:

* 1 PUT of its own record (``agent.group.heartbeat``);
* 1 conditional GET of the change marker ``groups/<g>/members.version`` (a 304
  almost always). The marker is a small JSON log of the last ``MARKER_KEEP``
  membership changes (join, ready, degraded, leave, superseded, deleted-by-heal:
  ``{v, id, state, ip, az}``), bumped with compare-and-swap by whoever makes the
  change. A member that sees a new marker applies the deltas to its cached view
  with no further reads, so templates learn of a join within one interval;
* ``k`` (default 3) conditional GETs of the members it watches. Watch sets come
  from a hash ring: each member watches the ``k`` members after it on the ring of
  ``blake2b(id)``, so every member has exactly ``k`` watchers and a join or leave
  moves ``O(k)`` assignments (``agent.group.membership.watch_set``, O(N log N)).

A full LIST of ``members/`` happens rarely: every ``list_s`` (300 s) as a safety
net, sooner when the marker log overflowed, and never more often than the page
budget allows (``list_pages_per_hour``, default 60 pages: at N = 10,000 that is a
10-page LIST every 600 s). Records the marker did not describe are fetched once
(``fetch_per_tick`` at most per interval) and then kept in the cache.

Ages are always on the store's clock: ``store_now`` (the response's ``Date``)
minus ``LastModified`` from the same response. The local clock is used only for
the observer's own monotonic timing; a local wall clock off by ten minutes
changes nothing here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from agent.clock import SYSTEM_CLOCK, Clock
from agent.errors import NotFound, PreconditionFailed, StoreError
from agent.group.membership import (
    DEPARTING_STATES,
    FrozenMap,
    LivenessState,
    MalformedRecord,
    MemberRecord,
    Ring,
    Verdict,
    checked_row,
    liveness,
)
from agent.interfaces import NotModified, StoreAPI
from agent.layout import id_from_key, marker_key, member_key, members_prefix  # noqa: F401
from agent.retry import CAS_RETRY, Retry

log = logging.getLogger(__name__)

MARKER_KEEP = 64
DEFAULT_K = 3
GONE_KEEP_S = 600.0  # how long a watcher remembers a member it saw leave (then: a new life)


# -- keys --------------------------------------------------------------------------------------










# -- pure: the peer view -----------------------------------------------------------------------


class PeerInfo(NamedTuple):
    """What this observer knows about one member. Ages are on the store's clock.

    An immutable named tuple, not a dataclass: every observer rebuilds one per member
    at each LIST (new ``store_now``), and a frozen dataclass costs ~10x more to build
    and ~2x the memory (issue #11). Make changed copies with ``_replace``.
    """

    id: str
    az: str = ""
    ip: str = ""
    state: str = "booting"
    health: str = ""
    endpoint: str = ""
    seq: int | None = None
    last_modified: float | None = None  # store clock
    store_now: float | None = None  # store clock, same response as last_modified
    etag: str = ""

    @property
    def age_s(self) -> float | None:
        if self.last_modified is None or self.store_now is None:
            return None
        return max(0.0, self.store_now - self.last_modified)

    def to_json(self) -> dict[str, Any]:
        age = self.age_s
        return {
            "id": self.id,
            "az": self.az,
            "ip": self.ip,
            "state": self.state,
            "health": self.health or None,
            "endpoint": self.endpoint or None,
            "seq": self.seq,
            "age_s": None if age is None else round(age, 1),
        }

    @classmethod
    def from_record(
        cls,
        rec: MemberRecord,
        *,
        etag: str = "",
        last_modified: float | None = None,
        store_now: float | None = None,
    ) -> PeerInfo:
        return cls(
            id=rec.instance_id,
            az=rec.az,
            ip=rec.private_ip,
            state=rec.state,
            health=str(rec.health.get("status", "")),
            endpoint=rec.endpoint,
            seq=rec.seq,
            last_modified=last_modified,
            store_now=store_now,
            etag=etag,
        )

    @classmethod
    def from_read(cls, r: Read) -> PeerInfo:
        """The peer a changed read shows (raises MalformedRecord for a body that is not one)."""
        if cls is not PeerInfo:
            return cls.from_record(_record_of(r.body), etag=r.etag,
                                   last_modified=r.last_modified, store_now=r.store_now)
        # The record's part, parsed (and its strings interned) once per body for every
        # observer: equal to from_record's (issue #11: memory and time).
        return _new_tuple(PeerInfo, RECORDS.peer_part(r.body) + (
            r.last_modified, r.store_now, r.etag))


def template_peers(view: Iterable[PeerInfo]) -> list[dict[str, str]]:
    """The template context's ``peers``: ready members (self included), sorted by id."""
    return [
        {"id": p.id, "ip": p.ip, "az": p.az, "state": p.state}
        for p in sorted(view, key=lambda p: p.id)
        if p.state == "ready"
    ]


def peers_hash(peers: Sequence[Mapping[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(list(peers), sort_keys=True).encode()).hexdigest()[:16]


def should_rerender(
    changes: Sequence[tuple[float, str]], now: float, min_s: float = 5.0, max_s: float = 30.0
) -> bool:
    """Quiescence for re-rendering on membership changes (consul-template's ``wait``).

    ``changes``: the unapplied ``(time, peers_hash)`` changes, oldest first, times on
    one clock (the daemon's monotonic). Re-render once the membership has been
    stable for ``min_s``, or ``max_s`` after the first unapplied change even if it
    keeps changing, so a flapping group still converges.
    """
    if not changes:
        return False
    first, last = changes[0][0], changes[-1][0]
    return now - last >= min_s or now - first >= max_s


def list_period_s(pages: int, list_s: float = 300.0, pages_per_hour: float = 60.0) -> float:
    """How often a member may LIST the whole group: flat requests/hour whatever N is."""
    return max(list_s, max(1, pages) * 3600.0 / pages_per_hour)


# -- pure: the change marker -------------------------------------------------------------------


def marker_apply(
    marker: Mapping[str, Any] | None, change: Mapping[str, Any], keep: int = MARKER_KEEP
) -> dict[str, Any]:
    """The marker after one more change: version + 1, the change appended, old ones dropped."""
    version = int((marker or {}).get("version", 0)) + 1
    changes = [*list((marker or {}).get("changes", []))[-(keep - 1) :], {**change, "v": version}]
    return {"version": version, "changes": changes}


def changes_since(marker: Mapping[str, Any], version: int | None) -> list[dict[str, Any]] | None:
    """Changes after ``version``, oldest first; None when the log no longer reaches back."""
    current = int(marker.get("version", 0))
    if version is not None and version >= current:
        return []
    if version is None:
        return None
    newer = [dict(c) for c in marker.get("changes", []) if int(c.get("v", 0)) > version]
    if not newer or int(newer[0].get("v", 0)) != version + 1:
        return None
    return newer


def apply_changes_into(
    out: dict[str, PeerInfo], changes: Iterable[Mapping[str, Any]]
) -> dict[str, PeerInfo]:
    """The marker's changes applied to a view the caller owns, in place: O(changes), not
    a copy of all N entries per change for every watcher (issue #11)."""
    for c in changes:
        mid = str(c.get("id", ""))
        if not mid:
            continue
        state = str(c.get("state", ""))
        if state in ("gone", "leaving"):
            out.pop(mid, None)
            continue
        prev = out.get(mid, PeerInfo(mid))
        out[mid] = prev._replace(
            state=state or prev.state,
            ip=str(c.get("ip") or prev.ip),
            az=str(c.get("az") or prev.az),
        )
    return out


# -- I/O: reads that keep the store's clock ----------------------------------------------------


class Read(NamedTuple):
    """A conditional GET: ``changed`` (body), ``unchanged`` (304) or ``gone`` (404).
    (An immutable named tuple: one per read, built cheaply; issue #11.)"""

    status: str
    etag: str = ""
    last_modified: float | None = None
    store_now: float = 0.0
    body: bytes = b""


def read_if_changed(store: StoreAPI, rel: str, etag: str | None = None) -> Read:
    """A conditional GET as ``changed`` / ``unchanged`` / ``gone``, each with the store clock.

    The store clock of a 304 is what lets a watcher age a record that stopped
    changing without downloading it again.
    """
    try:
        got = store.get(rel, if_none_match=etag)
    except NotFound as exc:
        return Read("gone", "", None, exc.store_now or 0.0)
    if isinstance(got, NotModified):
        return Read("unchanged", etag or "", None, got.store_now)
    return Read("changed", got.etag, got.last_modified, got.store_now, got.body)


def bump_marker(
    store: StoreAPI,
    group: str,
    change: Mapping[str, Any],
    *,
    retry: Retry = CAS_RETRY,
    known: tuple[str, Mapping[str, Any]] | None = None,
) -> int:
    """Append one change to the marker with compare-and-swap; the new version.

    ``known``: (etag, marker) if the caller already holds a fresh copy (saves a GET).
    A lost race re-reads and retries; the log is what keeps concurrent joins from
    erasing each other, which a plain overwrite would do.
    """
    rel = marker_key(group)
    while True:
        if known is None:
            r = read_if_changed(store, rel)
            known = (r.etag, json.loads(r.body)) if r.status == "changed" else ("", {})
        etag, current = known
        new = marker_apply(current, change)
        body = json.dumps(new, sort_keys=True, separators=(",", ":")).encode()
        try:
            if etag:
                store.put(rel, body, if_match=etag, content_type="application/json")
            else:
                store.put(rel, body, if_none_match=True, content_type="application/json")
            return int(new["version"])
        # NotFound: deleted between our GET and PUT (an operator reset it)
        except (PreconditionFailed, NotFound) as exc:
            known = None
            retry = retry.increment(str(exc))
            if retry.exhausted:
                raise StoreError(f"could not bump the membership marker after "
                                 f"{len(retry.history)} races: {exc}") from exc
            retry.sleep()


def member_change(rec: MemberRecord, state: str | None = None) -> dict[str, Any]:
    return {"id": rec.instance_id, "state": state or rec.state, "ip": rec.private_ip, "az": rec.az}


def read_group(store: StoreAPI, group: str, *, workers: int = 16) -> tuple[list[PeerInfo], float]:
    """Everything, fresh: one LIST plus a GET per record (for ``ec2-agent peers``, not the loop).

    Returns the peers (ids whose record cannot be parsed are shown with state
    ``unknown``) and the store's clock of the LIST.
    """
    listing = store.list(members_prefix(group))
    entries = [e for e in listing.entries if id_from_key(e.key)]

    def fetch(e: Any) -> PeerInfo:
        mid = id_from_key(e.key) or e.key
        r = read_if_changed(store, e.key)
        if r.status != "changed":
            return PeerInfo(
                mid, state="gone", last_modified=e.last_modified, store_now=listing.store_now
            )
        try:
            return PeerInfo.from_read(r)
        except MalformedRecord:
            return PeerInfo(mid, state="unknown", last_modified=r.last_modified,
                            store_now=r.store_now, etag=r.etag)

    if not entries:
        return [], listing.store_now
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(entries)))) as pool:
        peers = [p for p in pool.map(fetch, entries) if p.state != "gone"]
    return sorted(peers, key=lambda p: p.id), listing.store_now


def format_peers(peers: Iterable[PeerInfo]) -> str:
    lines = [f"{'id':<22} {'zone':<12} {'ip':<16} {'state':<10} {'age':>7} health"]
    for p in peers:
        age = p.age_s
        lines.append(
            f"{p.id:<22} {p.az or '-':<12} {p.ip or '-':<16} {p.state:<10} "
            f"{'-' if age is None else f'{age:.0f}s':>7} {p.health or '-'}"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Roster:
    """The group as one view says: ``members`` (self included, departing ones not),
    ``zones`` and ``endpoints`` by id, ``departing`` (records that say leaving or
    superseded, self excluded). Built once per change of the view, shared read-only."""

    members: frozenset[str]
    zones: Mapping[str, str]
    endpoints: Mapping[str, str]
    departing: frozenset[str]

    @classmethod
    def of(cls, view: Mapping[str, PeerInfo], self_id: str) -> Roster:
        departing = frozenset(m for m, p in view.items()
                              if p.state in DEPARTING_STATES and m != self_id)
        members = (frozenset(view) - departing) | {self_id}
        return cls(
            members=members,
            zones=FrozenMap((m, p.az) for m, p in view.items() if m in members and p.az),
            endpoints=FrozenMap((m, p.endpoint) for m, p in view.items() if p.endpoint),
            departing=departing,
        )


    def patched(self, view: Mapping[str, PeerInfo], self_id: str,
                ids: Iterable[str]) -> Roster:
        """``Roster.of(view, self_id)`` when only the entries of ``ids`` changed since this
        roster was built from the view: O(N) copies at C speed, O(len(ids)) work (#11)."""
        members, departing = set(self.members), set(self.departing)
        zones: dict[str, str | None] = {}
        endpoints: dict[str, str | None] = {}
        for m in ids:
            p = view.get(m)
            leaving = p is not None and p.state in DEPARTING_STATES and m != self_id
            if leaving:
                departing.add(m)
            else:
                departing.discard(m)
            member = m == self_id or (p is not None and not leaving)
            if member:
                members.add(m)
            else:
                members.discard(m)
            zones[m] = p.az if p is not None and member and p.az else None
            endpoints[m] = p.endpoint if p is not None and p.endpoint else None
        return Roster(members=frozenset(members), zones=_frozen(self.zones).updated(zones),
                      endpoints=_frozen(self.endpoints).updated(endpoints),
                      departing=frozenset(departing))


_INF = float("inf")
_new_tuple = tuple.__new__  # a PeerInfo from a full tuple of its fields, no checks


def _frozen(m: Mapping[str, str]) -> FrozenMap:
    return m if isinstance(m, FrozenMap) else FrozenMap(m)


def _marker_of(body: bytes) -> dict[str, Any]:
    """The marker a body says (``{}`` for one that is not JSON), parsed once for every
    watcher that reads the same bytes (the last body is remembered; never changed)."""
    last_body, last = _MARKER_LAST[0]
    if last_body == body:
        return last
    try:
        marker = json.loads(body)
    except ValueError:
        marker = {}
    _MARKER_LAST[0] = (body, marker)  # one store: a thread never sees half a pair
    return marker


_MARKER_LAST: list[tuple[bytes | None, dict[str, Any]]] = [(None, {})]


@functools.lru_cache(maxsize=1 << 16)
def _id_of(key: str) -> str | None:
    """``id_from_key``, remembered: one string object per id for every observer (memory:
    each observer keeps every id), parsed once per key instead of once per LIST entry."""
    return id_from_key(key)


class RecordCache:
    """``MemberRecord.loads`` remembered for the last ``size`` bodies (oldest forgotten
    first). A record body is immutable bytes, so the same bytes always parse to the same
    record; a changed body is other bytes and is parsed anew. A malformed body is never
    cached (it raises every time). Records are shared, never changed.

    One per process (``RECORDS``); every ``PeerWatcher`` grows it by a couple of entries:
    in the daemon (one watcher) it stays small, in the simulator (thousands of watchers in
    one process, issue #11) it holds about two intervals of heartbeats, so the ``k``
    watchers of a member parse its new record once instead of ``k`` times.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._d: dict[bytes, tuple[MemberRecord, tuple[Any, ...]]] = {}
        self._lock = threading.Lock()  # ``read_group`` parses from a thread pool

    def grow(self, by: int) -> None:
        with self._lock:
            self.size += by

    def __len__(self) -> int:
        return len(self._d)

    def __call__(self, body: bytes) -> MemberRecord:
        return self._get(body)[0]

    def peer_part(self, body: bytes) -> tuple[Any, ...]:
        """The first seven fields of the ``PeerInfo`` the record says (``from_record``'s),
        strings interned: every observer's view shares them instead of holding its own."""
        return self._get(body)[1]

    def _get(self, body: bytes) -> tuple[MemberRecord, tuple[Any, ...]]:
        got = self._d.get(body)
        if got is None:
            rec = MemberRecord.loads(body)
            got = rec, tuple(_interned(v) for v in PeerInfo.from_record(rec)[:7])
            with self._lock:
                d = self._d
                d[body] = got
                while len(d) > self.size:
                    del d[next(iter(d))]
        return got


def _interned(v: Any) -> Any:
    return sys.intern(v) if type(v) is str else v


RECORDS = RecordCache()


def _record_of(body: bytes) -> MemberRecord:
    """The record of a body, through ``RECORDS``. Used only to build a ``PeerInfo``."""
    return RECORDS(body)


# -- I/O: the watcher the daemon ticks ---------------------------------------------------------


@dataclass
class TickReport:
    requests: int = 0
    listed: bool = False
    marker_changed: bool = False
    fetched: int = 0
    watched: int = 0
    errors: list[str] = field(default_factory=list)
    store_errors: list[str] = field(default_factory=list)  # failed reads (not bad records)


class PeerWatcher:
    """This member's view of its group, refreshed by ``tick()`` once per interval.

    State is in memory only (a restarted agent starts from nothing, as liveness
    requires). ``view`` has every member it knows of; ``liveness`` holds what it has
    itself observed, for ``agent.group.membership.liveness`` / the heal controller.
    """

    def __init__(
        self,
        store: StoreAPI,
        group: str,
        self_id: str,
        *,
        clock: Clock = SYSTEM_CLOCK,
        k: int = DEFAULT_K,
        list_s: float = 300.0,
        list_pages_per_hour: float = 60.0,
        fetch_per_tick: int = 100,
        dead_after_s: float | None = None,
    ) -> None:
        self.store = store
        # Members whose record is this old are passed over (still watched) until ``k``
        # fresh ones are (``watch_set``); None: the plain ring.
        self.dead_after_s = dead_after_s
        self.group = group
        self.self_id = self_id
        self.clock = clock
        self.k = k
        self.list_s = list_s
        self.list_pages_per_hour = list_pages_per_hour
        self.fetch_per_tick = fetch_per_tick
        self.view: dict[str, PeerInfo] = {}
        self.liveness = LivenessState()
        self.watching: list[str] = []
        self.marker_etag: str | None = None
        self.marker_version: int | None = None
        self.marker: dict[str, Any] = {}
        self.last_list_mono: float | None = None
        self.last_pages = 1
        self.need_list = True
        self.need_fetch: set[str] = set()
        self.store_now: float | None = None
        self._ids_for_ring: frozenset[str] = frozenset()
        self._ring: list[str] = []
        self._ringer = Ring(self_id, k)
        # Per-tick work stays O(watched), not O(N) (issue #11): the ring is recomputed only
        # after the view's ids may have changed, the roster (members, zones, endpoints, who
        # is departing) only after an id, a state, a zone or an endpoint may have changed.
        self._ring_dirty = True
        self._roster: Roster | None = None
        # ids whose entry changed since the roster was built (None: rebuild it whole)
        self._roster_dirty: set[str] | None = None
        self.last_store_errors: list[str] = []  # the last tick's failed reads (heal abstains)
        RECORDS.grow(2)

    # -- one interval ----------------------------------------------------------------------------
    def tick(self) -> TickReport:
        """One interval's reads. A failing read is reported, never read as 'nobody there'."""
        rep = TickReport()
        self._check_marker(rep)
        now = self.clock.monotonic()
        if self._list_due(now):
            self._list(rep)
        self._fetch_unknown(rep)
        self._watch(rep)
        # Members seen gone long ago are forgotten: memory stays bounded by the live group.
        self.liveness = self.liveness.prune_gone(self.clock.monotonic() - GONE_KEEP_S)
        self.last_store_errors = rep.store_errors
        return rep

    def _check_marker(self, rep: TickReport) -> None:
        try:
            r = read_if_changed(self.store, marker_key(self.group), self.marker_etag)
        except StoreError as exc:
            rep.errors.append(f"marker: {exc}")
            rep.store_errors.append(f"marker: {exc}")
            return
        rep.requests += 1
        if r.status == "changed":
            rep.marker_changed = True
            marker = _marker_of(r.body)
            deltas = changes_since(marker, self.marker_version)
            if deltas is None:
                self.need_list = True  # first sight, or fell behind the log
            else:
                apply_changes_into(self.view, deltas)
                self._view_changed(str(c.get("id", "")) for c in deltas)
                gone = [str(c.get("id")) for c in deltas if c.get("state") in ("gone", "leaving")]
                if gone:
                    self.liveness = self.liveness.update([], self.clock.monotonic(), gone=gone)
            self.marker, self.marker_etag = marker, r.etag
            self.marker_version = int(marker.get("version", 0))

    def _list_due(self, now: float) -> bool:
        if self.last_list_mono is None:
            return True
        since = now - self.last_list_mono
        floor = list_period_s(self.last_pages, 0.0, self.list_pages_per_hour)
        if self.need_list:
            return since >= floor
        return since >= list_period_s(self.last_pages, self.list_s, self.list_pages_per_hour)

    def _list(self, rep: TickReport) -> None:
        try:
            listing = self.store.list(members_prefix(self.group))
        except StoreError as exc:
            rep.errors.append(f"list: {exc}")
            rep.store_errors.append(f"list: {exc}")
            return
        mono = self.clock.monotonic()
        rep.requests += listing.pages
        rep.listed = True
        self.last_list_mono = mono
        self.last_pages = listing.pages
        self.need_list = False
        self.store_now = listing.store_now
        store_now = listing.store_now
        present: dict[str, Any] = {}
        for e in listing.entries:
            mid = _id_of(e.key)
            if mid:
                present[mid] = e
        # One LIST touches every member: this loop is most of a member's work at large N
        # (issue #11), so it builds plain tuples, no per-entry dataclass or Observation.
        old = self.view
        need = self.need_fetch
        view: dict[str, PeerInfo] = {}
        rows = []
        new = _new_tuple
        times_ok = type(store_now) is float and type(mono) is float and \
            -_INF < store_now < _INF and -_INF < mono < _INF
        for mid, e in present.items():
            prev = old.get(mid)
            if prev is None or prev.state == "booting" or not prev.ip:
                need.add(mid)
                prev = prev or PeerInfo(mid)
            etag, lm = e.etag, e.last_modified
            if lm == prev.last_modified:
                lm = prev.last_modified  # one float object for equal times (memory)
            row = (mid, etag, lm, store_now, mono, prev.state if prev.ip else None)
            if not (times_ok and type(etag) is str and etag and type(lm) is float
                    and -_INF < lm < _INF):
                row = checked_row(*row)  # Observation's checks: raises what it raises
            view[mid] = new(PeerInfo, prev[:7] + (lm, store_now, etag))
            rows.append(row)
        self.view = view
        if view.keys() != old.keys():
            # A LIST keeps every known member's state, zone and endpoint: only a changed
            # set of ids changes the ring or the roster.
            self._view_changed(view.keys() ^ old.keys())
        if need:
            need.intersection_update(view)
        self.liveness = self.liveness.update_rows(rows, mono, listing=True)

    def _fetch_unknown(self, rep: TickReport) -> None:
        if not self.need_fetch:
            return
        todo = sorted(self.need_fetch - set(self.watch_set()))[: self.fetch_per_tick]
        for mid in todo:
            if self._read_member(mid, rep):
                rep.fetched += 1
                self.need_fetch.discard(mid)

    def _watch(self, rep: TickReport) -> None:
        self.watching = self.watch_set()
        for mid in self.watching:
            if self._read_member(mid, rep):
                rep.watched += 1
                self.need_fetch.discard(mid)

    def _read_member(self, mid: str, rep: TickReport) -> bool:
        prev = self.view.get(mid)
        etag = prev.etag if prev is not None and prev.ip else None
        try:
            r = read_if_changed(self.store, member_key(self.group, mid), etag)
        except StoreError as exc:
            rep.errors.append(f"{mid}: {exc}")
            rep.store_errors.append(f"{mid}: {exc}")
            return False
        rep.requests += 1
        mono = self.clock.monotonic()
        if r.status == "gone":
            if self.view.pop(mid, None) is not None:
                self._view_changed((mid,))
            self.liveness = self.liveness.update([], mono, gone=[mid])
            return True
        if r.status == "unchanged":
            assert prev is not None
            self.view[mid] = _new_tuple(PeerInfo, prev[:8] + (r.store_now, prev.etag))
            if prev.last_modified is not None:
                self.liveness = self.liveness.update_rows(
                    [checked_row(mid, prev.etag, prev.last_modified, r.store_now, mono,
                                 prev.state)],
                    mono,
                )
            return True
        try:
            peer = PeerInfo.from_read(r)
        except MalformedRecord as exc:
            rep.errors.append(f"{mid}: {exc}")
            return False
        assert r.last_modified is not None
        if prev is None or (prev.state, prev.az, prev.endpoint) != (
                peer.state, peer.az, peer.endpoint):
            self._view_changed((mid,))
        self.view[mid] = peer
        self.liveness = self.liveness.update_rows(
            [checked_row(mid, r.etag, r.last_modified, r.store_now, mono, peer.state)], mono
        )
        return True

    # -- views -----------------------------------------------------------------------------------
    def _view_changed(self, ids: Iterable[str] | None = None) -> None:
        """The view's entries for ``ids`` (None: any) may have a new id, state, zone or
        endpoint: the ring and the roster are brought up to date when next asked."""
        self._ring_dirty = True
        if ids is None or self._roster is None:
            self._roster_dirty = None
        elif self._roster_dirty is not None:
            self._roster_dirty.update(ids)

    def watch_set(self) -> list[str]:
        if self._ring_dirty:
            self._ring_dirty = False
            ids = frozenset(self.view)
            if ids != self._ids_for_ring:
                self._ids_for_ring = ids
                self._ring = self._ringer.watch_set(ids)
        ring = self._ring if self._ids_for_ring else []
        if self.dead_after_s is None or not any(map(self._stale, ring)):
            return list(ring)
        # A member whose ring predecessors are dead is watched by fewer than ``k`` live
        # observers, and may never find the ``confirm_observers`` its replacement needs
        # (stall-zone seed 520: two of a member's three watchers were dead in a zone the
        # zone rule kept from being replaced, and it stayed hung for an hour and more).
        # So the walk goes on past the stale, up to ``k`` more: every member keeps up to
        # ``k`` live watchers while its dead predecessors go unreplaced.
        out: list[str] = []
        fresh = 0
        for m in self._ringer.after(2 * self.k):
            out.append(m)
            if not self._stale(m):
                fresh += 1
                if fresh == self.k:
                    break
        return out

    def _stale(self, mid: str) -> bool:
        """Its record was at least ``dead_after_s`` old when this observer last read it."""
        p = self.view.get(mid)
        age = p.age_s if p is not None else None
        return age is not None and self.dead_after_s is not None and age >= self.dead_after_s

    def roster(self) -> Roster:
        """Who is in the group as this view says (cached until the view's ids, states,
        zones or endpoints change; the mappings are never changed once built)."""
        dirty = self._roster_dirty
        if self._roster is None or dirty is None or 8 * len(dirty) > len(self.view) + 64:
            self._roster = Roster.of(self.view, self.self_id)
        elif dirty:
            self._roster = self._roster.patched(self.view, self.self_id, dirty)
        self._roster_dirty = set()
        return self._roster

    def peers(self) -> list[PeerInfo]:
        return sorted(self.view.values(), key=lambda p: p.id)

    def template_peers(self) -> list[dict[str, str]]:
        return template_peers(self.view.values())

    def verdicts(self, *, dead_after_s: float, grace_s: float) -> dict[str, Verdict]:
        """Verdicts for the members this observer watches (the only ones it judges)."""
        mono = self.clock.monotonic()
        return {
            m: liveness(self.liveness, m, dead_after_s=dead_after_s, grace_s=grace_s,
                        mono_now=mono)
            for m in self.watching
        }

    def state_doc(self) -> dict[str, Any]:
        """What goes into state.json: ``peers`` (ready, for templates) and ``watch``."""
        return {
            "peers": self.template_peers(),
            "peers_view": {
                "members": len(self.view),
                "marker_version": self.marker_version,
                "watching": list(self.watching),
                "list_pages": self.last_pages,
            },
        }

    def write_state(self, path: Any) -> None:
        from agent.host import state as statefile

        doc = self.state_doc()
        statefile.update(path, lambda d: d.update(doc))
