"""Member records, liveness observations and verdicts, and who watches whom. Pure.

Nothing here reads a clock, a file or the network: the adapters pass in what they
saw (records, ETags, the store's ``LastModified`` and ``Date``, the observer's own
monotonic time) and get values back.

Liveness never compares two hosts' clocks (DESIGN.md, invariants 2, 3, 7, 8). A
member is ``dead`` only when two independent sources agree:

* the store's clock: ``store_now - last_modified`` of the same LIST/GET response is
  at least ``dead_after`` (both numbers come from the store; no host clock involved);
* the observer's own monotonic clock: the observer itself has watched the record's
  ETag stay unchanged for at least ``dead_after`` (the DynamoDB lock client rule),
  which forces an observer that has just (re)started to watch a full window first.

Every other situation is something weaker than dead: ``suspect`` (stale, not enough
evidence), ``unknown`` (the observer has not watched a full window yet), ``grace``
(not judged before first appearance + ``grace_s``), ``leaving`` (the record was
deleted or says leaving: leaving is not dying). ``LivenessState`` is deliberately
in-memory only: a restarted observer starts from nothing and must re-observe.

Watch sets (issue #4): with rendezvous hashing each member is watched by ``k`` peers,
so requests per instance-hour stay flat as the group grows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from agent.errors import IntegrityError

MemberState = Literal["booting", "ready", "degraded", "leaving", "superseded"]
MEMBER_STATES: tuple[str, ...] = ("booting", "ready", "degraded", "leaving", "superseded")
HEALTH_STATUSES: tuple[str, ...] = ("passing", "warning", "critical")
# Record states that mean "do not replace me": planned exit or already replaced.
DEPARTING_STATES = frozenset({"leaving", "superseded"})

Liveness = Literal["alive", "suspect", "dead", "grace", "leaving", "unknown"]
LIVENESS: tuple[str, ...] = ("alive", "suspect", "dead", "grace", "leaving", "unknown")

RECORD_SCHEMA = 1

# An ``Observation``'s values as a plain tuple: (instance_id, etag, last_modified,
# store_now, observed_mono, state). ``LivenessState.update_rows`` folds these without
# building an object per row (a LIST is one row per member; issue #11).
ObservationRow = tuple[str, str, float, float, float, "str | None"]


class MalformedRecord(IntegrityError, ValueError):
    """A member record (or counter) in the store is not what the agent writes.

    Both an ``AgentError`` (callers catch one tree) and a ``ValueError`` (it is bad
    input). A malformed record is never evidence of death: callers treat the member
    as ``unknown``.
    """


# --------------------------------------------------------------------------- records


def _default_health() -> dict[str, Any]:
    return {"status": "passing", "checks": {}}


@dataclass(frozen=True)
class MemberRecord:
    """One member's heartbeat record, ``groups/<group>/members/<id>.json``.

    ``seq`` goes up by one every heartbeat, so every write has new content and a new
    ETag: an unchanged ETag really means "no heartbeat". ``launch_time``, ``first_seen``
    and ``started`` are the member's own claims from its own clock: informational
    only, never used to judge liveness. ``health`` is the instance's own health only
    (invariant 10); it is reported, never a reason to replace. ``health`` is a plain
    dict for JSON's sake: treat it as read-only.
    """

    instance_id: str
    group: str
    seq: int
    state: str = "booting"
    image_id: str = ""
    az: str = ""
    private_ip: str = ""
    launch_time: str = ""
    boot_id: str = ""
    health: Mapping[str, Any] = field(default_factory=_default_health, hash=False)
    agent_version: str = ""
    endpoint: str = ""
    first_seen: float | None = None
    started: float | None = None
    observer_sick: bool = False

    def __post_init__(self) -> None:
        _validate_record(self)

    def heartbeat(self, **changes: Any) -> MemberRecord:
        """The next record this member writes: ``seq + 1`` plus any changes."""
        # ``replace`` without its per-field bookkeeping: every field is an init field.
        return type(self)(**{**self.__dict__, "seq": self.seq + 1, **changes})

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (fresh copy; mutating it does not touch the record)."""
        out: dict[str, Any] = {"schema": RECORD_SCHEMA}
        for name in _RECORD_FIELDS:
            out[name] = getattr(self, name)
        out["health"] = json.loads(json.dumps(dict(self.health)))
        return out

    def dumps(self) -> bytes:
        """Canonical bytes for the store (sorted keys, compact)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, obj: object) -> MemberRecord:
        """Parse a record dict; unknown keys are ignored (newer agents may add some).

        Raises ``MalformedRecord`` naming the offending key.
        """
        return cls._from_obj(obj, copy_health=True)

    @classmethod
    def _from_obj(cls, obj: object, *, copy_health: bool) -> MemberRecord:
        if not isinstance(obj, Mapping):
            raise MalformedRecord(f"member record must be a JSON object, got {type(obj).__name__}")
        missing = [k for k in ("instance_id", "group", "seq", "state") if k not in obj]
        if missing:
            raise MalformedRecord(f"member record missing {', '.join(missing)}")
        kwargs: dict[str, Any] = {name: obj[name] for name in _RECORD_FIELDS if name in obj}
        if copy_health and "health" in kwargs and isinstance(kwargs["health"], Mapping):
            try:
                kwargs["health"] = json.loads(json.dumps(dict(kwargs["health"])))
            except (TypeError, ValueError) as exc:
                raise MalformedRecord(f"member record health is not JSON: {exc}") from exc
        return cls(**kwargs)

    @classmethod
    def loads(cls, raw: bytes | str) -> MemberRecord:
        """Parse the bytes of a record object from the store."""
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise MalformedRecord(f"member record is not valid JSON: {exc}") from exc
        # What json.loads made is already a fresh JSON value: no copy of health needed.
        return cls._from_obj(obj, copy_health=False)


_RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(MemberRecord))


def _validate_record(r: MemberRecord) -> None:
    def bad(key: str, why: str) -> MalformedRecord:
        return MalformedRecord(f"member record {key}: {why}")

    for key in ("instance_id", "group"):
        v = getattr(r, key)
        if not isinstance(v, str) or not v:
            raise bad(key, f"must be a non-empty string, got {v!r}")
    for key in ("image_id", "az", "private_ip", "launch_time", "boot_id", "agent_version",
                "endpoint"):
        v = getattr(r, key)
        if not isinstance(v, str):
            raise bad(key, f"must be a string, got {type(v).__name__}")
    if isinstance(r.seq, bool) or not isinstance(r.seq, int) or r.seq < 0:
        raise bad("seq", f"must be a non-negative integer, got {r.seq!r}")
    if r.state not in MEMBER_STATES:
        raise bad("state", f"must be one of {', '.join(MEMBER_STATES)}, got {r.state!r}")
    if not isinstance(r.health, Mapping):
        raise bad("health", f"must be an object, got {type(r.health).__name__}")
    status = r.health.get("status")
    if status not in HEALTH_STATUSES:
        raise bad("health.status", f"must be one of {', '.join(HEALTH_STATUSES)}, got {status!r}")
    if not isinstance(r.health.get("checks", {}), Mapping):
        raise bad("health.checks", "must be an object")
    if r.endpoint and not r.endpoint.startswith(("http://", "https://")):
        raise bad("endpoint", f"must be an http(s) URL, got {r.endpoint!r}")
    for key in ("first_seen", "started"):
        v = getattr(r, key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v)):
            raise bad(key, f"must be a number or null, got {v!r}")
    if not isinstance(r.observer_sick, bool):
        raise bad("observer_sick", f"must be true or false, got {r.observer_sick!r}")


def _finite(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")


@dataclass(frozen=True)
class Observation:
    """What one successful LIST/GET said about one member's record.

    ``last_modified`` and ``store_now`` are both the store's clock (the object's
    ``LastModified`` and the same response's ``Date`` header), so their difference
    is an age no host clock touched. ``observed_mono`` is the observer's own
    monotonic clock when the response arrived. ``state`` is the record's ``state``
    field when the observer read the body (``None`` after a LIST/HEAD only).
    """

    instance_id: str
    etag: str
    last_modified: float
    store_now: float
    observed_mono: float
    state: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.instance_id, str) or not self.instance_id:
            raise ValueError(f"instance_id must be a non-empty string, got {self.instance_id!r}")
        if not isinstance(self.etag, str) or not self.etag:
            raise ValueError(f"etag must be a non-empty string, got {self.etag!r}")
        _finite("last_modified", self.last_modified)
        _finite("store_now", self.store_now)
        _finite("observed_mono", self.observed_mono)


class MemberTrack(NamedTuple):
    """What one observer remembers about one member between observations.

    ``etag_since_mono``: the observer's monotonic time when it first saw the
    current ETag. ``first_appearance``: store-clock ``LastModified`` of the first
    version this observer saw in the member's current life (grace starts there).
    ``gone_mono``: set when the record was seen absent (left, not dead).

    An immutable named tuple, not a dataclass: every observer makes one per member per
    LIST, so building one must be cheap (a frozen dataclass costs ~10x more to build and
    ~2x the memory; issue #11). Make changed copies with ``_replace``.
    """

    etag: str
    etag_since_mono: float
    first_appearance: float
    last_modified: float
    store_now: float
    observed_mono: float
    state: str | None = None
    gone_mono: float | None = None


_new_tuple = tuple.__new__  # builds a MemberTrack / PeerInfo from a full tuple, no checks
_INF = math.inf


def _row_ok(mid: object, etag: object, last_modified: object, store_now: object,
            observed_mono: object) -> bool:
    """Cheap form of ``Observation``'s checks for the common case (str ids, float times)."""
    return (type(mid) is str and mid != "" and type(etag) is str and etag != ""
            and type(last_modified) is float and -_INF < last_modified < _INF
            and type(store_now) is float and -_INF < store_now < _INF
            and type(observed_mono) is float and -_INF < observed_mono < _INF)


def _next_track(prev: MemberTrack | None, etag: str, lm: float, store_now: float,
                omono: float, state: str | None) -> MemberTrack:
    """The track after one observation: of a live ``prev``, or (None) of a new life (new,
    or back after leaving: a new grace period). The one fold both update paths use."""
    if prev is None:
        return _new_tuple(MemberTrack, (etag, omono, lm, lm, store_now, omono, state, None))
    fa = prev.first_appearance
    return _new_tuple(MemberTrack, (
        etag,
        prev.etag_since_mono if etag == prev.etag else omono,
        fa if fa <= lm else lm,  # min(): the first of equals, as min() keeps
        lm, store_now, omono,
        state if state is not None else prev.state,
        None))


def checked_row(mid: str, etag: str, last_modified: float, store_now: float,
                observed_mono: float, state: str | None = None) -> ObservationRow:
    """One observation as a row for ``LivenessState.update_rows``, checked as
    ``Observation`` checks (the same ``ValueError`` for a bad value)."""
    if not _row_ok(mid, etag, last_modified, store_now, observed_mono):
        Observation(mid, etag, last_modified, store_now, observed_mono, state)
    return (mid, etag, last_modified, store_now, observed_mono, state)


@dataclass(frozen=True)
class Verdict:
    """One member's liveness as this observer judges it, with the numbers why."""

    member_id: str
    status: Liveness
    reason: str
    store_age_s: float | None = None
    unchanged_s: float | None = None
    # The observer's monotonic time of the newest read behind it (not part of the verdict's
    # value: shifting the observer's clock changes no verdict).
    evidence_mono: float | None = field(default=None, compare=False)


_ABSENT: Any = object()


class FrozenMap(Mapping[str, Any]):
    """A mapping nobody can change once built, so nobody needs to copy it again.

    ``agent.heal.decide`` keeps one as it is where it would copy any other mapping, and
    ``counts()`` (how many entries hold each non-empty value: members per zone) is computed
    once. The peer watcher builds its zones and endpoints as these, once per change of its
    view, instead of every heal step copying O(N) entries (issue #11).
    """

    __slots__ = ("_d", "_counts")

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        self._d: dict[str, Any] = dict(items)
        self._counts: Mapping[Any, int] | None = None

    def __getitem__(self, key: str) -> Any:
        return self._d[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._d.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def keys(self) -> Any:
        return self._d.keys()

    def items(self) -> Any:
        return self._d.items()

    def values(self) -> Any:
        return self._d.values()

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"

    def updated(self, changes: Mapping[str, Any]) -> FrozenMap:
        """A new map with ``changes`` applied (``None`` removes the key); this one unchanged.
        O(N) at C speed plus O(len(changes)); ``counts()`` carried over when known."""
        d = self._d.copy()
        counts = None if self._counts is None else dict(self._counts)
        for k, v in changes.items():
            was = d.pop(k, None) if v is None else d.get(k)
            if v is not None:
                d[k] = v
            if counts is not None and was != v:
                if was:
                    counts[was] -= 1
                    if not counts[was]:
                        del counts[was]
                if v:
                    counts[v] = counts.get(v, 0) + 1
        out = FrozenMap.__new__(FrozenMap)
        out._d = d
        out._counts = None if counts is None else MappingProxyType(counts)
        return out

    def counts(self) -> Mapping[Any, int]:
        """How many entries hold each non-empty value, in first-seen order (cached)."""
        if self._counts is None:
            c: dict[Any, int] = {}
            for v in self._d.values():
                if v:
                    c[v] = c.get(v, 0) + 1
            self._counts = MappingProxyType(c)
        return self._counts


class TrackMap(Mapping[str, "MemberTrack"]):
    """An immutable id -> ``MemberTrack`` map whose versions share structure.

    ``LivenessState.update`` makes a new version per read; copying N tracks each time made a
    watcher's every read O(N) (issue #11). A version is a frozen ``base`` dict shared with
    its ancestors plus a small ``over`` dict of what changed since (``None``: removed);
    ``evolve`` copies only ``over`` and folds it into a new base once it outgrows about
    sqrt(N), so a change costs O(sqrt N) and a lookup O(1). No version is ever mutated.
    """

    __slots__ = ("_base", "_over", "_len")

    def __init__(self, base: Mapping[str, MemberTrack] | None = None) -> None:
        self._base: dict[str, MemberTrack] = dict(base or {})
        self._over: dict[str, MemberTrack | None] = {}
        self._len = len(self._base)

    def __getitem__(self, key: str) -> MemberTrack:
        v = self._over.get(key, _ABSENT)
        if v is _ABSENT:
            return self._base[key]
        if v is None:
            raise KeyError(key)
        return v

    def get(self, key: str, default: Any = None) -> Any:
        v = self._over.get(key, _ABSENT)
        if v is _ABSENT:
            return self._base.get(key, default)
        return default if v is None else v

    def __contains__(self, key: object) -> bool:
        v = self._over.get(key, _ABSENT)  # type: ignore[call-overload]
        return key in self._base if v is _ABSENT else v is not None

    def __iter__(self) -> Iterator[str]:
        over = self._over
        if not over:
            yield from self._base
            return
        for k in self._base:
            if over.get(k, _ABSENT) is not None:
                yield k
        for k, v in over.items():
            if v is not None and k not in self._base:
                yield k

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TrackMap({dict(self)!r})"

    def getter(self) -> Any:
        """``self.get``, or the base dict's own ``get`` when nothing is layered over it."""
        return self.get if self._over else self._base.get

    def ids(self) -> Iterable[str]:
        """The ids, in iteration order (the base dict's keys when nothing is layered)."""
        return self if self._over else self._base.keys()

    def evolve(self, changes: Mapping[str, MemberTrack | None]) -> TrackMap:
        """A new version with ``changes`` applied (``None`` removes); this one is unchanged."""
        if not changes:
            return self
        out = TrackMap.__new__(TrackMap)
        over = {**self._over, **changes}
        if len(over) * len(over) > 4 * max(64, len(self._base)):
            base = self._base.copy()
            base.update(over)  # same order as applying ``over`` one key at a time
            if None in over.values():
                for k in [k for k, v in over.items() if v is None]:
                    del base[k]
            out._base, out._over, out._len = base, {}, len(base)
        else:
            n = self._len
            for k, v in changes.items():
                n += (v is not None) - (k in self)
            out._base, out._over, out._len = self._base, over, n
        return out


@dataclass(frozen=True)
class LivenessState:
    """An observer's memory of its peers' records: an immutable value.

    ``update`` returns a new state; nothing is persisted, on purpose: a restarted
    observer starts empty and must watch a full ``dead_after`` before it can call
    anyone dead (invariant 3). ``started_mono``/``last_mono`` bound the span this
    observer has actually watched.
    """

    members: Mapping[str, MemberTrack] = field(default_factory=lambda: MappingProxyType({}))
    started_mono: float | None = None
    last_mono: float | None = None
    # Ids whose track says gone (an index kept by ``update``, so ``prune_gone`` need not scan
    # every member each tick); None when unknown (a state built by hand): then it scans.
    gone_ids: frozenset[str] | None = field(default=None, compare=False, repr=False)

    def update(
        self,
        observations: Iterable[Observation],
        mono_now: float,
        *,
        listing: bool = False,
        gone: Iterable[str] = (),
    ) -> LivenessState:
        """Fold one round of successful reads into a new state.

        ``listing=True``: the observations are a complete LIST of the members prefix,
        so tracked members missing from it are gone. ``gone``: ids whose GET/HEAD
        said 404. A member both observed and gone counts as gone (the conservative
        reading: gone members are never replaced). Responses older than what is
        already known (by ``observed_mono``) are ignored. Call only with reads that
        succeeded: a failed LIST is not an empty group.
        """
        rows = [(ob.instance_id, ob.etag, ob.last_modified, ob.store_now, ob.observed_mono,
                 ob.state) for ob in observations]
        return self.update_rows(rows, mono_now, listing=listing, gone=gone)

    def update_rows(
        self,
        rows: Iterable[ObservationRow],
        mono_now: float,
        *,
        listing: bool = False,
        gone: Iterable[str] = (),
    ) -> LivenessState:
        """``update`` for observations as rows (``checked_row``): no object per row."""
        _finite("mono_now", mono_now)
        members = self.members
        if (not listing and not gone and type(rows) is list and len(rows) == 1
                and isinstance(members, TrackMap)):
            return self._observe_one(rows[0], mono_now)
        get = members.getter() if isinstance(members, TrackMap) else members.get
        changes: dict[str, MemberTrack | None] = {}
        seen: set[str] = set()
        for mid, etag, lm, store_now, omono, state in rows:
            seen.add(mid)
            prev = changes.get(mid) or get(mid)
            if prev is not None and prev.gone_mono is None:
                if omono < prev.observed_mono:
                    continue  # an older response overtaken by a newer one
                changes[mid] = _next_track(prev, etag, lm, store_now, omono, state)
            else:
                changes[mid] = _next_track(None, etag, lm, store_now, omono, state)
        departed = set(gone)
        if listing:
            ids = members.ids() if isinstance(members, TrackMap) else members
            departed |= {mid for mid in ids if mid not in seen}
        gone_ids = self._gone_ids()
        marked: list[str] = []
        for mid in departed:
            prev = changes.get(mid) or get(mid)
            if prev is not None and prev.gone_mono is None:
                changes[mid] = prev._replace(gone_mono=mono_now)
                marked.append(mid)
        if gone_ids is not None:
            # Gone now: the ones just marked; no longer gone: those observed in a new life.
            if marked:
                gone_ids = gone_ids.union(marked)
            if gone_ids:
                back = [m for m in gone_ids if (t := changes.get(m)) is not None
                        and t.gone_mono is None]
                if back:
                    gone_ids = gone_ids.difference(back)
        tracks = members.evolve(changes) if isinstance(members, TrackMap) else \
            TrackMap({**members, **changes})
        started = mono_now if self.started_mono is None else min(self.started_mono, mono_now)
        last = mono_now if self.last_mono is None else max(self.last_mono, mono_now)
        return LivenessState(tracks, started, last, gone_ids)

    def _observe_one(self, row: ObservationRow, mono_now: float) -> LivenessState:
        """``update_rows`` for one read of one member (a watcher's GET): the same result,
        without the bookkeeping of a round."""
        mid, etag, lm, store_now, omono, state = row
        members = self.members
        assert isinstance(members, TrackMap)
        prev = members.get(mid)
        gone_ids = self._gone_ids()
        if prev is not None and prev.gone_mono is None:
            if omono < prev.observed_mono:
                tracks = members  # an older response overtaken by a newer one
            else:
                tracks = members.evolve(
                    {mid: _next_track(prev, etag, lm, store_now, omono, state)})
        else:
            tracks = members.evolve({mid: _next_track(None, etag, lm, store_now, omono, state)})
            if gone_ids and mid in gone_ids:
                gone_ids = gone_ids.difference((mid,))  # back: a new life
        started = mono_now if self.started_mono is None else min(self.started_mono, mono_now)
        last = mono_now if self.last_mono is None else max(self.last_mono, mono_now)
        return LivenessState(tracks, started, last, gone_ids)

    def _gone_ids(self) -> frozenset[str] | None:
        """The ids whose track says gone, when known without a scan (see ``gone_ids``)."""
        if self.gone_ids is not None:
            return self.gone_ids
        if not self.members:
            return frozenset()
        return None

    def prune_gone(self, before_mono: float) -> LivenessState:
        """Forget members seen gone before ``before_mono`` (bounded memory)."""
        gone_ids = self._gone_ids()
        if gone_ids is None:  # built by hand: scan
            gone_ids = frozenset(m for m, t in self.members.items() if t.gone_mono is not None)
        drop = {m: None for m in gone_ids
                if (t := self.members.get(m)) is not None and t.gone_mono is not None
                and t.gone_mono < before_mono}
        if not drop:
            return self if self.gone_ids is not None else replace(self, gone_ids=gone_ids)
        members = self.members
        tracks = members.evolve(drop) if isinstance(members, TrackMap) else TrackMap(
            {m: t for m, t in members.items() if m not in drop})
        return replace(self, members=tracks, gone_ids=gone_ids.difference(drop))

    def watched_for(self) -> float:
        """How long (own monotonic clock) this observer has been watching."""
        if self.started_mono is None or self.last_mono is None:
            return 0.0
        return self.last_mono - self.started_mono

    def observer_fresh(self, dead_after_s: float) -> bool:
        """True until this observer has watched for a full ``dead_after`` (invariant 3)."""
        return self.watched_for() < dead_after_s

    def verdicts(self, *, dead_after_s: float, grace_s: float,
                 mono_now: float | None = None) -> dict[str, Verdict]:
        """A verdict for every member this observer tracks, by id."""
        return {
            mid: liveness(self, mid, dead_after_s=dead_after_s, grace_s=grace_s,
                          mono_now=mono_now)
            for mid in sorted(self.members)
        }



def liveness(
    state: LivenessState, member_id: str, *, dead_after_s: float, grace_s: float,
    mono_now: float | None = None,
) -> Verdict:
    """Judge one member from what this observer has itself seen.

    Order: never seen → ``unknown``; record gone or state leaving/superseded →
    ``leaving``; evidence older than ``dead_after_s`` at ``mono_now`` (the observer's
    reads of it failed since) → ``unknown``: a verdict expires with its evidence
    (invariant 8); fresh by both clocks → ``alive``; before first appearance +
    ``grace_s`` (store clock) → ``grace`` (not judged); stale by both → ``dead``; otherwise
    ``unknown`` while the observer has not watched a full window, else ``suspect``.
    """
    if dead_after_s <= 0 or grace_s < 0:
        raise ValueError(f"dead_after_s={dead_after_s} must be > 0, grace_s={grace_s} >= 0")
    t = state.members.get(member_id)
    if t is None:
        return Verdict(member_id, "unknown", "never observed")
    if t.gone_mono is not None:
        return Verdict(member_id, "leaving", "record deleted: leaving is not dying")
    if t.state in DEPARTING_STATES:
        return Verdict(member_id, "leaving", f"record says {t.state}")
    if mono_now is not None and mono_now - t.observed_mono > dead_after_s:
        old = mono_now - t.observed_mono
        return Verdict(member_id, "unknown",
                       f"evidence {old:.0f}s old > dead_after {dead_after_s:g}s: reads failing",
                       evidence_mono=t.observed_mono)
    age = t.store_now - t.last_modified
    unchanged = t.observed_mono - t.etag_since_mono
    stale_store = age >= dead_after_s
    stale_mono = unchanged >= dead_after_s
    nums = f"store age {age:.0f}s, etag unchanged {unchanged:.0f}s, dead_after {dead_after_s:g}s"
    if not stale_store and not stale_mono:
        return Verdict(member_id, "alive", nums, age, unchanged, t.observed_mono)
    if t.store_now < t.first_appearance + grace_s:
        left = t.first_appearance + grace_s - t.store_now
        return Verdict(member_id, "grace", f"in grace for another {left:.0f}s (store clock)",
                       age, unchanged, t.observed_mono)
    if stale_store and stale_mono:
        return Verdict(member_id, "dead", f"stale on both clocks: {nums}", age, unchanged,
                       t.observed_mono)
    if state.observer_fresh(dead_after_s):
        return Verdict(member_id, "unknown",
                       f"observer has watched {state.watched_for():.0f}s < dead_after: {nums}",
                       age, unchanged, t.observed_mono)
    return Verdict(member_id, "suspect", f"clocks disagree or window incomplete: {nums}",
                   age, unchanged, t.observed_mono)


# --------------------------------------------------------------------------- watch sets


@functools.lru_cache(maxsize=1 << 14)
def ring_position(instance_id: str) -> int:
    """Place on the hash ring: stable across processes and Python versions (not ``hash()``).

    Remembered (a pure function of the id): every membership change re-sorts the ring."""
    d = hashlib.blake2b(instance_id.encode(), digest_size=8, person=b"ec2a-ring").digest()
    return int.from_bytes(d, "big")


def watch_set(observer_id: str, member_ids: Iterable[str], k: int) -> list[str]:
    """The ``k`` members after ``observer_id`` on the hash ring (all others if fewer).

    Every member is watched by exactly ``min(k, N-1)`` others; one join or leave
    changes at most ``k`` observers' sets. O(N log N): cheap at N = 10,000, where a
    rendezvous (HRW) form costs O(N²) hashes per recomputation.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    ids = sorted({m for m in member_ids if m != observer_id}, key=lambda m: (ring_position(m), m))
    if k == 0 or not ids:
        return []
    if len(ids) <= k:
        return ids
    start = bisect_right([ring_position(m) for m in ids], ring_position(observer_id))
    return [ids[(start + i) % len(ids)] for i in range(k)]


@functools.lru_cache(maxsize=1 << 16)
def _ring_key(instance_id: str) -> tuple[int, str]:
    """``(ring_position, id)``: one tuple per id, shared by every observer's ring (memory)."""
    return ring_position(instance_id), instance_id


class Ring:
    """``watch_set(observer, ids, k)`` for a set of ids that changes a little at a time.

    Keeps the ring (``(ring_position, id)`` sorted, the observer left out) between calls
    and applies only what was added or removed: O(changes · log N) plus an O(N) set
    difference at C speed, instead of sorting N ids per membership change in every
    observer (issue #11). The answer is ``watch_set``'s, always.
    """

    __slots__ = ("observer", "k", "_ids", "_keys")

    def __init__(self, observer: str, k: int) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.observer, self.k = observer, k
        self._ids: frozenset[str] = frozenset()
        self._keys: list[tuple[int, str]] = []

    def watch_set(self, member_ids: frozenset[str]) -> list[str]:
        self._sync(member_ids)
        keys, k = self._keys, self.k
        if k == 0 or not keys:
            return []
        if len(keys) <= k:
            return [m for _, m in keys]
        return self.after(k)

    def after(self, n: int) -> list[str]:
        """The first ``n`` members after the observer on the ring (fewer if there are
        fewer), in ring order, as the last ``watch_set`` left it."""
        keys = self._keys
        start = bisect_left(keys, (ring_position(self.observer) + 1,))
        return [keys[(start + i) % len(keys)][1] for i in range(min(n, len(keys)))]

    def _sync(self, member_ids: frozenset[str]) -> None:
        if member_ids != self._ids:
            added, removed = member_ids - self._ids, self._ids - member_ids
            keys = self._keys
            if len(added) + len(removed) > 8 + len(keys) // 16:
                keys[:] = sorted(_ring_key(m) for m in member_ids if m != self.observer)
            else:
                for m in removed:
                    if m != self.observer:
                        del keys[bisect_left(keys, _ring_key(m))]
                for m in added:
                    if m != self.observer:
                        insort(keys, _ring_key(m))
            self._ids = member_ids


def watchers(member_id: str, member_ids: Iterable[str], k: int) -> list[str]:
    """Who watches ``member_id``: the ``k`` members before it on the ring, never itself."""
    ids = set(member_ids) | {member_id}
    return sorted(o for o in ids if o != member_id and member_id in watch_set(o, ids, k))
