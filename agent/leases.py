"""Leases, suspicions, the budget and the kill switch: the store objects replacement runs on.

Keys (all under ``<prefix>/groups/<group>/``)::

    leases/<member>                  create-only (If-None-Match: *): exactly one actor
    suspicions/<member>/<observer>   one per observer that judges the member stale
    budget.json                      replacements in the current window (If-Match CAS)
    control/pause, control/resumed   the kill switch, and when it was last lifted

The records and the small judgements on them are pure; the store operations others
need too (``ec2-agent pause``/``resume``, the daemon's ``superseded`` check) are
here so that they do not need the controller (``agent.replace``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.clock import SYSTEM_CLOCK, Clock
from agent.errors import NotFound, PreconditionFailed, StoreError
from agent.heal import budget_after, budget_take, failure_streak, is_failed_replacement
from agent.interfaces import StoreAPI
from agent.layout import (  # noqa: F401 - re-exported
    budget_key,
    control_prefix,
    lease_key,
    leases_prefix,
    pause_key,
    resumed_key,
    suspicion_key,
    suspicions_prefix,
)
from agent.membership import MalformedRecord
from agent.retry import CAS_RETRY, Retry

log = logging.getLogger(__name__)

LEASE_SCHEMA = 1
LEASE_STATES = ("held", "acted", "done", "failed", "refused")
OPEN_STATES = frozenset({"held", "acted"})


# -- keys ---------------------------------------------------------------------------------------

















# -- pure: records and small judgements --------------------------------------------------------

@dataclass(frozen=True)
class Lease:
    """One replacement lease. ``state``: held → acted → done | failed; or refused.

    ``refused``: taken, then refused before acting (budget full, paused, EC2
    disagreed): nothing was done, so another observer may take it over by CAS.
    ``acted_at`` is on the store's clock. ``asg_before``: the ASG's instances just
    before an ASG action, so the holder can find the replacement the ASG launched.
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
    reasons: tuple[str, ...] = ()
    detail: str = ""
    nonce: str = ""
    etag: str = field(default="", compare=False)
    last_modified: float | None = field(default=None, compare=False)

    def body(self) -> bytes:
        doc = {"schema": LEASE_SCHEMA, "member": self.member, "holder": self.holder,
               "action": self.action, "state": self.state, "token": self.token,
               "replacement": self.replacement, "acted_at": self.acted_at, "asg": self.asg,
               "asg_before": list(self.asg_before), "reasons": list(self.reasons),
               "detail": self.detail, "nonce": self.nonce}
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
                reasons=tuple(str(x) for x in d.get("reasons") or ()),
                detail=str(d.get("detail") or ""), nonce=str(d.get("nonce") or ""),
                etag=etag, last_modified=last_modified)
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedRecord(f"lease record: {exc}") from exc
        if lease.state not in LEASE_STATES:
            raise MalformedRecord(f"lease record state: {lease.state!r}")
        return lease


def lease_outcome(lease: Lease, now: float, deadline_s: float, heartbeated: bool) -> str:
    """``refused`` | ``done`` | ``failed`` | ``in-flight`` on the store's clock ``now``."""
    if lease.state in ("refused", "done", "failed"):
        return lease.state
    started = lease.acted_at if lease.acted_at is not None else lease.last_modified
    if heartbeated and lease.state == "acted":
        return "done"
    if started is not None and is_failed_replacement(started, now, deadline_s, heartbeated):
        return "failed"
    return "in-flight"


def streak(leases: Iterable[Lease], outcomes: Mapping[str, str], since: float | None) -> int:
    """Consecutive failed replacements, oldest first by act time, after ``since``."""
    closed = []
    for lease in leases:
        out = outcomes.get(lease.member)
        if out not in ("done", "failed"):
            continue
        t = lease.acted_at if lease.acted_at is not None else (lease.last_modified or 0.0)
        if since is not None and t <= since:
            continue
        closed.append((t, lease.member, out == "failed"))
    return failure_streak([f for _, _, f in sorted(closed)])


def parse_suspicion(rel: str, group: str) -> tuple[str, str] | None:
    rest = rel[len(suspicions_prefix(group)):] if rel.startswith(suspicions_prefix(group)) else ""
    parts = rest.split("/")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


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

def take_budget(store: StoreAPI, group: str, *, window_s: float, max_per_window: int,
                store_now: float, retry: Retry = CAS_RETRY) -> tuple[bool, str]:
    """Spend one replacement from the group's counter with compare-and-swap.

    ``(True, detail)`` when spent; ``(False, reason)`` when the window is full or the
    race could not be won within ``retry``. ``store_now`` is used only when the
    counter does not exist yet (a 404 carries no body to read a clock from).
    """
    key = budget_key(group)
    while True:
        obj = store.get_or_none(key)
        rec = None
        now = store_now
        if obj is not None:
            now = obj.store_now
            try:
                rec = json.loads(obj.body)
            except ValueError as exc:
                raise MalformedRecord(f"budget counter is not JSON: {exc}") from exc
        new = budget_take(rec, now, window_s, max_per_window)
        if new is None:
            _, used = budget_after(rec, now, window_s)
            return False, f"rate-limit: {used}/{max_per_window} used in this {window_s:g}s window"
        body = json.dumps(new, sort_keys=True).encode()
        try:
            if obj is None:
                store.create(key, body, content_type="application/json")
            else:
                store.put(key, body, if_match=obj.etag, content_type="application/json")
            return True, f"budget {new['used']}/{max_per_window}"
        except (PreconditionFailed, NotFound) as exc:
            retry = retry.increment(type(exc).__name__)
            if retry.exhausted:
                return False, (f"budget-contention: lost {len(retry.history)} "
                               f"compare-and-swap races")
            retry.sleep()


def read_lease(store: StoreAPI, group: str, member: str) -> Lease | None:
    obj = store.get_or_none(lease_key(group, member))
    if obj is None:
        return None
    return Lease.parse(obj.body, etag=obj.etag, last_modified=obj.last_modified)


def superseded(store: StoreAPI, group: str, my_id: str) -> bool:
    """Is there a lease against me (other than a refused one)? Then I was replaced.

    A store error answers False (not knowing is not being replaced); so does a
    malformed lease.
    """
    try:
        lease = read_lease(store, group, my_id)
    except (StoreError, MalformedRecord) as exc:
        log.warning("cannot read my own lease key: %s", exc)
        return False
    return lease is not None and lease.state != "refused"


def write_event(store: StoreAPI, group: str, actor: str, kind: str, member: str = "",
           reasons: Iterable[str] = (), details: Mapping[str, Any] | None = None,
           clock: Clock = SYSTEM_CLOCK) -> bool:
    from agent.events import append_event

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
