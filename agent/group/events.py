"""The group's audit log: one create-only object per decision (DESIGN.md invariant 11).

``<prefix>/groups/<group>/events/<YYYYmmddTHHMMSS.ffffffZ>-<instance>-<rand>.json``

One object per event, never a shared log object: appends never race (each key is
new, written with ``If-None-Match: *``), and the keys sort by time so a LIST reads
the log in order. The timestamp is the actor's own clock: good enough to read an
audit trail, and never used to judge anything. Events are kept forever unless an
operator adds an S3 lifecycle rule on the ``events/`` prefix (recommended: 90 days).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import PreconditionFailed, StoreError
from agent.interfaces import StoreAPI
from agent.layout import event_key, events_prefix, stamp  # noqa: F401 - re-exported
from agent.retry import KEY_RETRY


@dataclass(frozen=True)
class Event:
    time: float
    actor: str
    kind: str
    member: str = ""
    reasons: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "actor": self.actor,
            "kind": self.kind,
            "member": self.member,
            "reasons": list(self.reasons),
            "details": json.loads(json.dumps(dict(self.details), default=str)),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Event:
        if not isinstance(obj, Mapping) or not {"time", "actor", "kind"} <= set(obj):
            raise StoreError(f"not an event object: {str(obj)[:100]}")
        return cls(
            time=float(obj["time"]),
            actor=str(obj["actor"]),
            kind=str(obj["kind"]),
            member=str(obj.get("member") or ""),
            reasons=tuple(str(r) for r in obj.get("reasons") or ()),
            details=dict(obj.get("details") or {}),
        )


def append_event(
    store: StoreAPI,
    group: str,
    *,
    actor: str,
    kind: str,
    member: str = "",
    reasons: Iterable[str] = (),
    details: Mapping[str, Any] | None = None,
    now: Callable[[], float] = time.time,
    rand: Callable[[], str] = lambda: secrets.token_hex(4),
) -> Event:
    """Write one event (create-only); returns it. Raises ``StoreError`` if the store fails."""
    ev = Event(
        time=now(),
        actor=actor,
        kind=kind,
        member=member,
        reasons=tuple(reasons),
        details=dict(details or {}),
    )
    body = json.dumps(ev.to_json(), sort_keys=True).encode()
    retry = KEY_RETRY  # a key collision needs the same microsecond and 32 random bits
    while True:
        try:
            store.create(
                event_key(group, ev.time, actor, rand()), body, content_type="application/json"
            )
            return ev
        except PreconditionFailed as exc:
            retry = retry.increment(str(exc))
            if retry.exhausted:
                raise StoreError(f"could not find a fresh key for an event of {actor}") from exc
            retry.sleep()


def list_events(store: StoreAPI, group: str, limit: int = 50) -> list[Event]:
    """The newest ``limit`` events, oldest first. One LIST (pages) plus one GET per event."""
    listing = store.list(events_prefix(group))
    keys = sorted(e.key for e in listing.entries)[-limit:] if limit > 0 else []
    out = []
    for key in keys:
        obj = store.get_or_none(key)
        if obj is None:
            continue  # expired by a lifecycle rule between the LIST and the GET
        try:
            out.append(Event.from_json(json.loads(obj.body)))
        except (ValueError, StoreError):
            continue  # someone else's object under events/: not ours to interpret
    return out


def format_events(events: Iterable[Event]) -> str:
    lines = [f"{'time':<27} {'actor':<20} {'kind':<14} {'member':<20} reasons"]
    for ev in events:
        lines.append(
            f"{stamp(ev.time):<27} {ev.actor:<20} {ev.kind:<14} {ev.member or '-':<20} "
            f"{'; '.join(ev.reasons)}"
        )
    return "\n".join(lines)
