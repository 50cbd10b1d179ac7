"""Leases, suspicions, the budget and the kill switch: the store objects replacement runs on.

Keys (all under ``<prefix>/groups/<group>/``)::

    leases/<member>                  create-only (If-None-Match: *): exactly one actor
    suspicions/<member>/<observer>   one per observer that judges the member stale
    budget.json                      replacements in the current window (If-Match CAS)
    inflight.json                    members being replaced now, group-wide (If-Match CAS)
    control/pause, control/resumed   the kill switch, and when it was last lifted

The records and the small judgements on them are pure; the store operations others
need too (``ec2-agent pause``/``resume``, the daemon's ``superseded`` check) are
here so that they do not need the controller (``agent.heal.controller``).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.clock import SYSTEM_CLOCK, Clock
from agent.errors import NotFound, PreconditionFailed, StoreError
from agent.group.membership import MalformedRecord
from agent.heal.decide import (
    budget_after,
    budget_give_back,
    budget_take,
    is_failed_replacement,
    lease_clearable,
)
from agent.interfaces import StoreAPI
from agent.layout import (  # noqa: F401 - re-exported
    adoption_key,
    budget_key,
    closed_lease_key,
    closed_leases_prefix,
    control_prefix,
    inflight_key,
    lease_key,
    leases_prefix,
    pause_key,
    resumed_key,
    suspicion_key,
    suspicions_prefix,
)
from agent.retry import CAS_RETRY, Retry

log = logging.getLogger(__name__)

LEASE_SCHEMA = 1
LEASE_STATES = ("held", "acting", "acted", "done", "failed", "refused")
OPEN_STATES = frozenset({"held", "acting", "acted"})


# -- pure: records and small judgements --------------------------------------------------------

@dataclass(frozen=True)
class Lease:
    """One replacement lease (invariant 13: a life cycle, and an expiry).

    ``state``: held → acting → acted → done | failed; or refused; or failed before
    any action happened (``acted_at`` None). ``held``: taken, nothing done yet;
    ``acting``: fenced and about to call the cloud (written with If-Match right
    before every mutating call); ``acted``: the call succeeded (``acted_at`` on the
    store's clock); ``refused``: refused before acting (budget full, paused, EC2
    disagreed, fence failed). Only an action that happened (``acted_at`` set) means
    "you were replaced" (``supersedes``). A ``held`` lease older than the expiry
    (holder died before acting), a ``refused`` one, and one that ``failed`` before
    acting may be taken over by CAS; any lease without an action is removed when its
    member heartbeats again. ``asg_before``: the ASG's instances just before an ASG
    action, so the holder can find the replacement the ASG launched; ``adopt_since``:
    the store's clock no later than the action landed (written by a resolver: the
    ``acting`` write before the call; unset, the holder's ``acted_at`` less a slack is
    meant), so an instance the ASG launched before, for another member, is not taken
    for this one's replacement.
    ``pending_terminate``: a launch happened, the old instance's terminate did not
    yet (retried by the holder, fenced). ``token``: the death's RunInstances
    ClientToken, from the ``nonce`` of the first lease written for this death
    (``agent.heal.resolve.death_token``): a takeover keeps both. An ``acting`` lease
    older than the expiry is resolved from what the cloud says (``resolve_acting``).
    ``etag``/``last_modified`` come from the store, not the body.
    """

    member: str
    holder: str
    action: str
    state: str = "held"
    token: str = ""
    replacement: str = ""
    acted_at: float | None = None
    asg: str = ""
    asg_before: tuple[str, ...] = ()
    adopt_since: float | None = None
    reasons: tuple[str, ...] = ()
    detail: str = ""
    nonce: str = ""
    pending_terminate: str = ""
    etag: str = field(default="", compare=False)
    last_modified: float | None = field(default=None, compare=False)

    def body(self) -> bytes:
        doc = {"schema": LEASE_SCHEMA, "member": self.member, "holder": self.holder,
               "action": self.action, "state": self.state, "token": self.token,
               "replacement": self.replacement, "acted_at": self.acted_at, "asg": self.asg,
               "asg_before": list(self.asg_before), "adopt_since": self.adopt_since,
               "reasons": list(self.reasons),
               "detail": self.detail, "nonce": self.nonce,
               "pending_terminate": self.pending_terminate}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, raw: bytes, *, etag: str = "", last_modified: float | None = None) -> Lease:
        try:
            d = json.loads(raw)
            if not isinstance(d, dict):
                raise ValueError("not an object")
            lease = cls(
                member=str(d["member"]), holder=str(d["holder"]), action=str(d["action"]),
                state=str(d.get("state", "held")), token=str(d.get("token") or ""),
                replacement=str(d.get("replacement") or ""),
                acted_at=None if d.get("acted_at") is None else float(d["acted_at"]),
                asg=str(d.get("asg") or ""),
                asg_before=tuple(str(x) for x in d.get("asg_before") or ()),
                adopt_since=(None if d.get("adopt_since") is None
                             else float(d["adopt_since"])),
                reasons=tuple(str(x) for x in d.get("reasons") or ()),
                detail=str(d.get("detail") or ""), nonce=str(d.get("nonce") or ""),
                pending_terminate=str(d.get("pending_terminate") or ""),
                etag=etag, last_modified=last_modified)
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedRecord(f"lease record: {exc}") from exc
        if lease.state not in LEASE_STATES:
            raise MalformedRecord(f"lease record state: {lease.state!r}")
        return lease


    @property
    def acted(self) -> bool:
        """Did an action really happen through this lease?"""
        return self.acted_at is not None and self.state in ("acted", "done", "failed")

    @property
    def supersedes(self) -> bool:
        """Does this lease mean its member was replaced? Only if an action happened."""
        return self.acted

    def age(self, store_now: float) -> float | None:
        return None if self.last_modified is None else max(0.0, store_now - self.last_modified)

    def takeover_allowed(self, store_now: float, expiry_s: float) -> bool:
        """May another observer take this lease over (by CAS)? Never once it acted."""
        if self.acted:
            return False
        if self.state == "refused":
            return True
        age = self.age(store_now)
        return self.state in ("held", "failed") and age is not None and age >= expiry_s

    def clearable(self, store_now: float, acting_ttl_s: float) -> bool:
        """May it be removed because its member heartbeats again?"""
        return lease_clearable(self.state, self.acted, self.age(store_now), acting_ttl_s)


def lease_outcome(lease: Lease, now: float, deadline_s: float, heartbeated: bool | None,
                  expiry_s: float | None = None, acting_ttl_s: float | None = None) -> str:
    """``refused`` | ``done`` | ``failed`` | ``aborted`` | ``expired`` | ``in-flight``.

    On the store's clock ``now``. ``heartbeated`` None: nobody could tell (the
    replacement's record or EC2 could not be read); never ``failed`` then, still in
    flight (chaos seed 7009: three such "failures" froze a healthy group). ``aborted``:
    failed before any action (not a failed replacement: it does not count towards the
    streak). ``expired``: ``held`` longer than ``expiry_s`` (its holder is gone; nothing
    was done), or ``acting`` without an act time longer than ``acting_ttl_s`` (the
    controller's age at which the call is over; None: such a lease never expires here).
    """
    if lease.state == "failed" and not lease.acted:
        return "aborted"
    if lease.state in ("refused", "done", "failed"):
        return lease.state
    if lease.state == "held" or (lease.state == "acting" and lease.acted_at is None):
        age = lease.age(now)
        # An acting lease is given longer (its call may take a while); past that its
        # holder died mid-call. It stops counting as in flight, so the group is not
        # blocked; it is never taken over blindly (the call may have happened): the
        # controller resolves it from what the cloud says (agent.heal.resolve).
        limit = expiry_s if lease.state == "held" else acting_ttl_s
        if limit is not None and age is not None and age >= limit:
            return "expired"
        return "in-flight"
    started = lease.acted_at if lease.acted_at is not None else lease.last_modified
    if heartbeated:
        return "done"
    if (heartbeated is not None and started is not None
            and is_failed_replacement(started, now, deadline_s, heartbeated)):
        return "failed"
    return "in-flight"


def streak(leases: Iterable[Lease], outcomes: Mapping[str, str], since: float | None) -> int:
    """Consecutive failed replacements, oldest first by act time, after ``since``.

    ``failure_streak`` of the closed leases sorted by ``(time, member)``: the failures
    that sort after the last success. Counted in one pass, without sorting every lease
    a long-lived group ever had at every step (issue #11)."""
    last_ok: tuple[float, str] | None = None
    failed: list[tuple[float, str]] = []
    for lease in leases:
        out = outcomes.get(lease.member)
        if out != "done" and out != "failed":
            continue
        t = lease.acted_at if lease.acted_at is not None else (lease.last_modified or 0.0)
        if since is not None and t <= since:
            continue
        key = (t, lease.member)
        if out == "failed":
            failed.append(key)
        elif last_ok is None or key > last_ok:
            last_ok = key
    if last_ok is None:
        return len(failed)
    return sum(1 for key in failed if key > last_ok)


def _act_key(lease: Lease) -> tuple[float, str]:
    return (lease.acted_at if lease.acted_at is not None else (lease.last_modified or 0.0),
            lease.member)


def archivable(leases: Iterable[Lease], store_now: float, after_s: float) -> list[Lease]:
    """Closed leases that may move to ``closed-leases/`` (issue #11: every observer LISTs
    ``leases/`` at every step, so one kept lease per death made each step O(deaths)).

    Closed: an action happened and its outcome is final (``done`` or ``failed``, no
    terminate pending), at least ``after_s`` ago on the store's clock; and it sorts before
    the newest success (by act time, then member), which itself stays. ``streak`` counts
    only the failures after the newest success, so moving these never changes it."""
    closed = [x for x in leases if x.acted and x.state in ("done", "failed")
              and not x.pending_terminate]
    ok = [_act_key(x) for x in closed if x.state == "done"]
    if not ok:
        return []
    newest = max(ok)
    return [x for x in closed if _act_key(x) < newest
            and (age := x.age(store_now)) is not None and age >= after_s]


def parse_suspicion(rel: str, group: str) -> tuple[str, str] | None:
    prefix = suspicions_prefix(group)
    if not rel.startswith(prefix):
        return None
    parts = rel[len(prefix):].split("/")
    return (parts[0], parts[1]) if len(parts) == 2 and parts[0] and parts[1] else None


def count_suspicions(entries: Iterable[Any], group: str, store_now: float,
                     ttl_s: float) -> dict[str, frozenset[str]]:
    """Distinct observers per member among suspicion objects younger than ``ttl_s``."""
    out: dict[str, set[str]] = {}
    for e in entries:
        mo = parse_suspicion(e.key, group)
        if mo is None or store_now - e.last_modified > ttl_s:
            continue
        out.setdefault(mo[0], set()).add(mo[1])
    return {m: frozenset(o) for m, o in out.items()}


# -- store operations others use too -----------------------------------------------------------

def _cas_json(store: StoreAPI, key: str, what: str, *, store_now: float,
              update: Callable[[dict[str, Any] | None, float], tuple[dict[str, Any] | None, str]],
              retry: Retry) -> tuple[dict[str, Any] | None, str, bool]:
    """Read a JSON record, apply the pure ``update``, write it back by compare-and-swap.

    ``update(record, store_time)`` returns ``(new record, "")`` or ``(None, refusal)``.
    Returns ``(new, "", False)`` once written, ``(None, refusal, False)`` when refused, or
    ``(None, reason, True)`` when the race could not be won within ``retry``.
    ``store_now`` is the clock used only when the record does not exist yet (a 404
    carries no body to read a clock from).
    """
    while True:
        obj = store.get_or_none(key)
        rec = None
        now = store_now
        if obj is not None:
            now = obj.store_now
            try:
                rec = json.loads(obj.body)
            except ValueError as exc:
                raise MalformedRecord(f"{what} is not JSON: {exc}") from exc
        new, refusal = update(rec, now)
        if new is None:
            return None, refusal, False
        body = json.dumps(new, sort_keys=True).encode()
        try:
            if obj is None:
                store.create(key, body, content_type="application/json")
            else:
                store.put(key, body, if_match=obj.etag, content_type="application/json")
            return new, "", False
        except (PreconditionFailed, NotFound) as exc:
            retry = retry.increment(type(exc).__name__)
            if retry.exhausted:
                return None, f"lost {len(retry.history)} compare-and-swap races", True
            retry.sleep()


def take_budget(store: StoreAPI, group: str, *, window_s: float, max_per_window: int,
                store_now: float, retry: Retry = CAS_RETRY) -> tuple[bool, str]:
    """Spend one replacement from the group's counter with compare-and-swap.

    ``(True, detail)`` when spent; ``(False, reason)`` when the window is full or the
    race could not be won within ``retry``.
    """
    def update(rec: dict[str, Any] | None, now: float) -> tuple[dict[str, Any] | None, str]:
        new = budget_take(rec, now, window_s, max_per_window)
        if new is None:
            _, used = budget_after(rec, now, window_s)
            return None, f"rate-limit: {used}/{max_per_window} used in this {window_s:g}s window"
        return new, ""

    new, why, lost = _cas_json(store, budget_key(group), "budget counter",
                               store_now=store_now, update=update, retry=retry)
    if new is None:
        return False, f"budget-contention: {why}" if lost else why
    return True, f"budget {new['used']}/{max_per_window}"


def give_back_budget(store: StoreAPI, group: str, *, window_s: float, taken_at: float,
                     store_now: float, retry: Retry = CAS_RETRY) -> bool:
    """Return one unit an attempt spent at ``taken_at`` and then refused before acting.

    Under load every fence may refuse a decision grown too old; without this, those
    attempts that did nothing used up the window, and a real death waited ``window_s``.
    True when given back; False when there was nothing to give back into the unit's
    window or the race was lost (the unit stays spent: the safe side). Raises
    ``StoreError`` / ``MalformedRecord`` as the other counters do.
    """
    def update(rec: dict[str, Any] | None, now: float) -> tuple[dict[str, Any] | None, str]:
        new = budget_give_back(rec, now, window_s, taken_at)
        return (new, "") if new is not None else (None, "nothing to give back")

    new, _, _ = _cas_json(store, budget_key(group), "budget counter",
                          store_now=store_now, update=update, retry=retry)
    return new is not None


def inflight_take(record: Mapping[str, Any] | None, member: str, now: float, cap: int,
                  open_members: Iterable[str], expiry_s: float) -> dict[str, Any] | None:
    """The in-flight record to CAS-write to add ``member``, or None if the cap is reached.

    Pure. ``{"members": {id: store_time}}``. An entry stays while its lease is open
    (``open_members``) or it is younger than ``expiry_s`` (another observer may have
    just taken a lease this observer's listing has not seen yet).
    """
    raw = (record or {}).get("members") or {}
    if not isinstance(raw, Mapping):
        raise MalformedRecord(f"in-flight record members must be an object, got {raw!r}")
    opened = set(open_members)
    keep = {str(m): float(t) for m, t in raw.items()
            if m in opened or now - float(t) < expiry_s}
    if member not in keep and len(keep) >= cap:
        return None
    # A claim again (a new attempt on a member whose old entry was never given back) is
    # dated now: kept at its old date, it outlived ``expiry_s`` while its lease was still
    # too new for another observer's listing, which dropped it and took a second slot
    # (flaky-store seed 13: an entry 133 s old, re-claimed 4 s before the second take).
    keep[member] = now
    return {"members": keep}


def take_inflight(store: StoreAPI, group: str, member: str, *, cap: int,
                  open_members: Iterable[str], expiry_s: float, store_now: float,
                  retry: Retry = CAS_RETRY) -> tuple[bool, str]:
    """Claim one of the group's ``cap`` in-flight slots by compare-and-swap (invariant 5)."""
    opened = set(open_members)

    def update(rec: dict[str, Any] | None, now: float) -> tuple[dict[str, Any] | None, str]:
        new = inflight_take(rec, member, now, cap, opened, expiry_s)
        if new is None:
            return None, (f"in-flight: {len((rec or {}).get('members') or {})}/{cap} "
                          "replacements in flight group-wide")
        return new, ""

    new, why, lost = _cas_json(store, inflight_key(group), "in-flight record",
                               store_now=store_now, update=update, retry=retry)
    if new is None:
        return False, f"in-flight-contention: {why}" if lost else why
    return True, f"in-flight {len(new['members'])}/{cap}"


def release_inflight(store: StoreAPI, group: str, member: str,
                     retry: Retry = CAS_RETRY) -> None:
    """Give the slot back (best effort: an entry left behind expires)."""
    key = inflight_key(group)
    while not retry.exhausted:
        obj = store.get_or_none(key)
        if obj is None:
            return
        try:
            rec = json.loads(obj.body)
        except ValueError:
            return
        members = dict((rec or {}).get("members") or {})
        if member not in members:
            return
        members.pop(member)
        try:
            store.put(key, json.dumps({"members": members}, sort_keys=True).encode(),
                      if_match=obj.etag, content_type="application/json")
            return
        except (PreconditionFailed, NotFound) as exc:
            retry = retry.increment(type(exc).__name__)
            if not retry.exhausted:
                retry.sleep()


@functools.lru_cache(maxsize=1024)
def parse_lease(raw: bytes, etag: str, last_modified: float | None) -> Lease:
    """``Lease.parse``, remembered for the last few versions: a lease is immutable, and
    every observer of a group (thousands in one simulator process, issue #11) reads the
    same version. A malformed body raises each time (never cached)."""
    return Lease.parse(raw, etag=etag, last_modified=last_modified)


def read_lease(store: StoreAPI, group: str, member: str) -> Lease | None:
    obj = store.get_or_none(lease_key(group, member))
    if obj is None:
        return None
    return parse_lease(obj.body, obj.etag, obj.last_modified)


def read_closed_lease(store: StoreAPI, group: str, member: str) -> Lease | None:
    obj = store.get_or_none(closed_lease_key(group, member))
    if obj is None:
        return None
    return parse_lease(obj.body, obj.etag, obj.last_modified)


def claim_released(owner: Lease, instance_id: str) -> bool:
    """Has ``owner``'s lease let go of its claim on ``instance_id``: it names another
    launch, or it closed without naming one (its adoption's write lost the race)."""
    return owner.replacement != instance_id and (bool(owner.replacement)
                                                 or owner.state not in OPEN_STATES)


def claim_launch(store: StoreAPI, group: str, instance_id: str, lease: Lease,
                 *, over: str | None = None) -> bool:
    """Claim the Auto Scaling launch ``instance_id`` as ``lease``'s replacement before the
    lease names it (docs/safety.md 13): create-only, or in place of the released claim
    whose ETag is ``over``. False when another claim is there. Raises ``StoreError``."""
    body = json.dumps({"member": lease.member, "holder": lease.holder, "nonce": lease.nonce},
                      sort_keys=True, separators=(",", ":")).encode()
    try:
        store.put(adoption_key(group, instance_id), body, if_none_match=over is None,
                  if_match=over, content_type="application/json")
    except (PreconditionFailed, NotFound):
        return False
    return True


def launch_claimant(store: StoreAPI, group: str, instance_id: str) -> tuple[str, str] | None:
    """Whose claim ``instance_id`` is, and the claim's ETag: ("", etag) for a body that
    names no member, None for no claim. Raises ``StoreError``."""
    obj = store.get_or_none(adoption_key(group, instance_id))
    if obj is None:
        return None
    try:
        doc = json.loads(obj.body)
        member = str(doc["member"]) if isinstance(doc, dict) else ""
    except (ValueError, KeyError):
        member = ""
    return member, obj.etag


def read_lease_anywhere(store: StoreAPI, group: str, member: str) -> Lease | None:
    """The member's lease in ``leases/``, else as archived in ``closed-leases/``."""
    return read_lease(store, group, member) or read_closed_lease(store, group, member)


def close_lease(store: StoreAPI, group: str, lease: Lease) -> bool:
    """Move a closed lease to ``closed-leases/``: copy first, then delete the original
    only if it is unchanged (If-Match). So at any moment a replaced member's lease is in
    one of the two places; an observer that creates ``leases/<m>`` afresh did so after
    the copy landed, and sees it (``HealController._execute``). Raises ``StoreError``."""
    store.put(closed_lease_key(group, lease.member), lease.body(),
              content_type="application/json")
    try:
        store.delete(lease_key(group, lease.member), if_match=lease.etag)
    except (PreconditionFailed, NotFound):
        return False
    return True


def superseded(store: StoreAPI, group: str, my_id: str) -> bool:
    """Is there a lease against me (in ``leases/``, or moved to ``closed-leases/``) through
    which an action really happened?

    Only then was I replaced (invariant 13): a ``held``, ``acting``, ``refused`` lease,
    or one that failed before acting, exiles nobody. A store error answers False (not
    knowing is not being replaced); so does a malformed lease.
    """
    try:
        lease = read_lease_anywhere(store, group, my_id)
    except (StoreError, MalformedRecord) as exc:
        log.warning("cannot read my own lease key: %s", exc)
        return False
    return lease is not None and lease.supersedes


def write_event(store: StoreAPI, group: str, actor: str, kind: str, member: str = "",
           reasons: Iterable[str] = (), details: Mapping[str, Any] | None = None,
           clock: Clock = SYSTEM_CLOCK) -> bool:
    from agent.group.events import append_event

    try:
        append_event(store, group, actor=actor, kind=kind, member=member, reasons=list(reasons),
                     details=dict(details or {}), now=clock.time)
        return True
    except StoreError as exc:
        log.warning("could not record event %s %s: %s", kind, member, exc)
        return False


def pause(store: StoreAPI, group: str, who: str, reason: str = "", *,
          clock: Clock = SYSTEM_CLOCK) -> None:
    """Flip the kill switch: no peer replaces anything while the object exists."""
    body = json.dumps({"who": who, "reason": reason, "time": clock.time()},
                      sort_keys=True).encode()
    store.put(pause_key(group), body, content_type="application/json")
    write_event(store, group, who, "pause", reasons=[reason or "operator pause"], clock=clock)


def resume(store: StoreAPI, group: str, who: str, reason: str = "", *,
           clock: Clock = SYSTEM_CLOCK) -> None:
    """Remove the kill switch; failure streaks restart from now (store clock).

    ``control/resumed`` is rewritten first: its LastModified is the point before
    which failed replacements no longer count, so an operator who fixed the cause
    of three failures can let the group heal again.
    """
    body = json.dumps({"who": who, "reason": reason, "time": clock.time()},
                      sort_keys=True).encode()
    store.put(resumed_key(group), body, content_type="application/json")
    try:
        store.delete(pause_key(group))
    except NotFound:
        pass
    write_event(store, group, who, "resume", reasons=[reason or "operator resume"], clock=clock)
