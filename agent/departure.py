"""What IMDS tells an instance before it goes away, and what the agent does about it. Pure.

Observations in, a decision out; the IMDS reads live in ``agent.daemon.notices`` (the adapter)
and the daemon only applies the decision. Nothing here reads a clock or the network.

Signals (IMDS paths under ``latest/meta-data/``)::

    spot/instance-action                 {"action": "terminate|stop|hibernate", "time": T}
    spot/termination-time                T (text; the older form: terminate implied)
    autoscaling/target-lifecycle-state   InService, Terminated, Warmed:*, Standby, Detached
    events/recommendations/rebalance     {"noticeTime": T}
    events/maintenance/scheduled         [{"Code", "State", "NotBefore", "EventId", ...}]

Membership, as this module sees it::

    member     a record in the store, heartbeating
    held       never joined: the boot found a warm pool / standby state; joins on InService
    suspended  left, but the same instance id comes back (spot stop/hibernate, warm pool,
               standby, detached, a scheduled stop): local data kept, rejoins when clear
    left       left for good (terminate, Terminated, a configured early leave)

Decisions: ``stay`` (nothing to do), ``join`` (held/suspended -> member), ``leave``
(-> left), ``suspend`` (member -> suspended), ``hold`` (stay held, new reason).
Leaving is never dying: a leave deletes the record first, so nobody replaces it.

A source that could not be read is unknown, never "absent": it never starts a
departure, and it blocks a rejoin (a suspended member waits until IMDS answers).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MEMBERSHIP = ("member", "held", "suspended", "left")
ACTIONS = ("stay", "join", "leave", "suspend", "hold")
SOURCES = ("spot", "termination-time", "lifecycle", "rebalance", "maintenance")
SPOT_ACTIONS = ("terminate", "stop", "hibernate")
MAINTENANCE_TIME_FORMAT = "%d %b %Y %H:%M:%S GMT"  # "21 Jan 2019 09:00:43 GMT"


# -- Auto Scaling target lifecycle states -----------------------------------------------------

@dataclass(frozen=True)
class LifecycleRule:
    """What one ``autoscaling/target-lifecycle-state`` value means for membership.

    ``joins``: an instance in this state may be a member. ``departs``: a member in
    this state leaves (its record is deleted; nobody replaces it). ``resumable``:
    the same instance id may come back InService: keep the local data, rejoin then.
    """

    joins: bool
    departs: bool
    resumable: bool
    why: str


LIFECYCLE: Mapping[str, LifecycleRule] = {
    "InService": LifecycleRule(True, False, False, "in service"),
    "Terminated": LifecycleRule(False, True, False, "being terminated (scale-in)"),
    "Warmed:Terminated": LifecycleRule(False, True, False, "warm pool instance being terminated"),
    "Warmed:Stopped": LifecycleRule(False, True, True, "going to the warm pool, stopped"),
    "Warmed:Hibernated": LifecycleRule(False, True, True, "going to the warm pool, hibernated"),
    "Warmed:Running": LifecycleRule(False, True, True, "going to the warm pool, running"),
    "Standby": LifecycleRule(False, True, True, "put in standby"),
    "Detached": LifecycleRule(False, True, True, "detached from its Auto Scaling group"),
}
# No ASG (404 on the path) behaves as InService: the instance is its own master.
NO_ASG = LifecycleRule(True, False, False, "not in an Auto Scaling group")


def lifecycle_rule(state: str | None) -> LifecycleRule | None:
    """The rule for ``state``; NO_ASG for None; None for a value this agent does not know."""
    if state is None:
        return NO_ASG
    return LIFECYCLE.get(state.strip())


def boot_joins(state: str | None) -> tuple[bool, str]:
    """At boot: does the instance register, given the target lifecycle state? And why.

    A warmed, standby or detached instance does the whole boot (config, data,
    render) but writes no member record: peers must never see it, or they would
    see it die when the warm pool stops it. A state this agent does not know
    joins (as the agent always did) with the reason saying so.
    """
    rule = lifecycle_rule(state)
    if rule is None:
        return True, f"unknown target lifecycle state {state!r}: joining"
    if rule.joins:
        return True, rule.why
    return False, f"auto scaling target lifecycle state {state}: {rule.why}; not joining"


# -- observations -----------------------------------------------------------------------------

def parse_maintenance_time(text: str) -> float | None:
    """``NotBefore`` and friends ("21 Jan 2019 09:00:43 GMT") -> epoch seconds; None if bad."""
    try:
        when = _dt.datetime.strptime(text.strip(), MAINTENANCE_TIME_FORMAT)
    except (ValueError, AttributeError):
        return None
    return when.replace(tzinfo=_dt.timezone.utc).timestamp()


@dataclass(frozen=True)
class MaintenanceEvent:
    code: str
    state: str
    not_before: str = ""
    not_after: str = ""
    event_id: str = ""
    description: str = ""

    @classmethod
    def from_imds(cls, item: Mapping[str, Any]) -> MaintenanceEvent:
        return cls(code=str(item.get("Code", "")), state=str(item.get("State", "")),
                   not_before=str(item.get("NotBefore", "")),
                   not_after=str(item.get("NotAfter", "")),
                   event_id=str(item.get("EventId", "")),
                   description=str(item.get("Description", "")))

    @property
    def starts_at(self) -> float | None:
        return parse_maintenance_time(self.not_before) if self.not_before else None

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "state": self.state, "not_before": self.not_before,
                "not_after": self.not_after, "event_id": self.event_id,
                "description": self.description}


@dataclass(frozen=True)
class Observations:
    """One reading of every signal. ``failed`` names the sources IMDS did not answer."""

    spot_action: str | None = None
    spot_time: str | None = None
    termination_time: str | None = None
    lifecycle_state: str | None = None
    rebalance_time: str | None = None
    maintenance: tuple[MaintenanceEvent, ...] = ()
    failed: frozenset[str] = frozenset()
    errors: tuple[str, ...] = ()

    def notices(self) -> dict[str, Any]:
        """What ``status`` and the metrics show: every signal that is present now."""
        out: dict[str, Any] = {}
        if self.spot_action or self.termination_time:
            out["spot"] = {"action": self.spot_action or "terminate",
                           "time": self.spot_time or self.termination_time or ""}
        if self.lifecycle_state is not None and self.lifecycle_state != "InService":
            out["lifecycle"] = {"target_state": self.lifecycle_state}
        if self.rebalance_time is not None:
            out["rebalance"] = {"notice_time": self.rebalance_time}
        active = [e.as_dict() for e in self.maintenance if e.state == "active"]
        if active:
            out["maintenance"] = active
        return out


# -- policy -----------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Policy:
    """The ``departure`` config section; its defaults are the schema's
    (agent/config/schema/config.schema.json; ``agent.config.model.defaults("departure")``).
    """

    on_rebalance: str          # report | leave
    on_maintenance: str        # report | leave
    maintenance_codes: tuple[str, ...]
    maintenance_lead_s: float
    final_backup: bool

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> Policy:
        """From the section as validated and completed by the schema (lists as tuples)."""
        return cls(**{**raw, "maintenance_codes": tuple(raw["maintenance_codes"])})


# Scheduled event codes whose instance comes back with the same id (a stop).
RESUMABLE_CODES = frozenset({"instance-stop"})


@dataclass(frozen=True)
class Decision:
    action: str  # one of ACTIONS
    reason: str
    final_backup: bool = False
    notices: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def next_membership(self) -> str | None:
        """The membership state after this decision (None: unchanged)."""
        return {"join": "member", "leave": "left", "suspend": "suspended",
                "hold": "held"}.get(self.action)


def _spot_reasons(obs: Observations) -> tuple[list[str], list[str]]:
    final: list[str] = []
    resumable: list[str] = []
    if obs.spot_action:
        when = obs.spot_time or obs.termination_time or "?"
        why = f"spot interruption notice: {obs.spot_action} at {when}"
        if obs.spot_action in ("stop", "hibernate"):
            resumable.append(why + " (the instance comes back: data kept, rejoin on resume)")
        else:  # terminate, or an action this agent does not know: the safe side is to leave
            final.append(why)
    elif obs.termination_time:
        final.append(f"spot termination-time notice: {obs.termination_time}")
    return final, resumable


def due_maintenance(obs: Observations, policy: Policy, now: float) -> list[MaintenanceEvent]:
    """Active scheduled events of the configured codes that start within the lead time."""
    due = []
    for ev in obs.maintenance:
        if ev.state != "active" or ev.code not in policy.maintenance_codes:
            continue
        start = ev.starts_at
        if start is not None and now >= start - policy.maintenance_lead_s:
            due.append(ev)
    return due


def decide(obs: Observations, policy: Policy, membership: str, now: float) -> Decision:
    """What to do now, given every signal, the policy, our membership and the wall time."""
    if membership not in MEMBERSHIP:
        raise ValueError(f"unknown membership state {membership!r}")
    notices = obs.notices()
    if membership == "left":
        return Decision("stay", "already left the group", notices=notices)
    final, resumable = _spot_reasons(obs)
    rule = lifecycle_rule(obs.lifecycle_state) if "lifecycle" not in obs.failed else None
    if rule is not None and rule.departs:
        why = f"auto scaling target lifecycle state {obs.lifecycle_state}: {rule.why}"
        (resumable if rule.resumable else final).append(why)
    if policy.on_rebalance == "leave" and obs.rebalance_time is not None:
        final.append(f"rebalance recommendation at {obs.rebalance_time} "
                     "(departure.on_rebalance: leave)")
    if policy.on_maintenance == "leave":
        for ev in due_maintenance(obs, policy, now):
            why = (f"scheduled {ev.code} {ev.event_id or ''} not before {ev.not_before} "
                   f"(within departure.maintenance_lead_s {policy.maintenance_lead_s:g})")
            (resumable if ev.code in RESUMABLE_CODES else final).append(why)
    backup = policy.final_backup
    if final:
        # A held instance has no record: it leaves without a final backup of data it
        # never served from. A suspended one already took its backup when it left.
        return Decision("leave", "; ".join(final), backup and membership == "member", notices)
    if resumable:
        if membership == "member":
            return Decision("suspend", "; ".join(resumable), backup, notices)
        if membership == "held":
            return Decision("hold", "; ".join(resumable), notices=notices)
        return Decision("stay", "; ".join(resumable), notices=notices)
    if membership == "member":
        return Decision("stay", "nothing announced", notices=notices)
    # held or suspended, and no signal says go: rejoin only on a full, known picture.
    unknown = sorted(obs.failed & {"spot", "lifecycle"})
    if unknown:
        return Decision("stay", f"waiting: IMDS did not answer for {', '.join(unknown)}",
                        notices=notices)
    if rule is None:
        return Decision("stay", f"unknown target lifecycle state {obs.lifecycle_state!r}: "
                        "not rejoining", notices=notices)
    return Decision("join", f"{rule.why}: no departure notice", notices=notices)


def observations_from_imds(
    *,
    spot: Mapping[str, Any] | None = None,
    termination_time: str | None = None,
    lifecycle_state: str | None = None,
    rebalance: Mapping[str, Any] | None = None,
    maintenance: Sequence[Mapping[str, Any]] | None = None,
    failed: Sequence[str] = (),
    errors: Sequence[str] = (),
) -> Observations:
    """Observations from the parsed IMDS documents (the adapter's output). Pure."""
    action = str(spot.get("action", "")) if spot else None
    return Observations(
        spot_action=action or None,
        spot_time=str(spot.get("time", "")) if spot else None,
        termination_time=(termination_time or "").strip() or None,
        lifecycle_state=lifecycle_state.strip() if lifecycle_state else None,
        rebalance_time=str(rebalance.get("noticeTime", "")) if rebalance else None,
        maintenance=tuple(MaintenanceEvent.from_imds(m) for m in (maintenance or ())
                          if isinstance(m, Mapping)),
        failed=frozenset(failed),
        errors=tuple(errors),
    )
