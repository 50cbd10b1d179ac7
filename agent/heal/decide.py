"""Safe replacement: observations in, decision out. Pure.

``decide(view, policy)`` looks at one observer's picture of its group (``HealView``:
verdicts from ``agent.group.membership``, suspicion records, the EC2 and Auto Scaling
view, direct probes, leases, budget, failures) and returns a ``Decision``: a freeze
with its reason, the actions to take, and a refusal with reasons for every member
it considered and did not act on (invariant 11: taken or refused, every decision is
an event). It reads no clock, store or API: the daemon gathers the view, records
the decision, takes the lease, consumes the budget, and only then calls the cloud.

Every rule is from DESIGN.md "Safe replacement: the invariants":

* mode ``off`` → nothing at all; ``dry-run`` → the same decision, actions marked
  ``dry_run`` (decided and recorded; the adapter executes nothing) (9);
* a sick observer, or one that has not yet watched a full window since its own
  restart, abstains (3);
* paused (kill switch), the API failing, more than ``freeze_fraction`` of the group
  dead or suspect at once, or ``failed_before_freeze`` failed replacements in a
  row → the group freezes (4, 6, 9);
* a member is acted on only if this observer's verdict is ``dead`` (never grace,
  leaving, suspect or unknown) (7, 8), at least ``confirm_observers`` distinct
  observers including this one agree, EC2's own state is known and says the
  instance is not already going away, and nobody holds its lease (1, 2);
* EC2 says running (and the ASG does not say unhealthy) but the agent is silent →
  only with ``replace_silent``, a failed direct probe and ``silent_for >=
  silent_after_s`` (2);
* at most ``max_per_window`` per window and ``max(1, 10 %)`` in flight (5);
* only a ``dead`` verdict written by another observer confirms (a ``suspect`` one
  counts towards a mass death, never as a confirmation) (2);
* a direct probe that answers, from this observer or any confirming one, vetoes
  whatever EC2 says; a probe that fails is no evidence of death by itself: a
  running-but-silent member needs ``confirm_observers`` observers whose probes all
  failed (14);
* EC2 "no such instance" is believed only once it persists (``not_found_belief``) (14);
* terminated or shutting-down and no longer listed by the Auto Scaling group whose
  tag it carries, or a newer pending/running instance whose ``ec2-agent:replaces``
  tag names it (``replaced_by``) → already replaced: forget its record, act on
  nothing, count no failure (15);
* zones are judged as well as the group (``disrupted_zones``): a zone where most
  members fell silent at once is disrupted, nothing in it is acted on, and it is
  left out of the group's mass-death fraction so the rest of the group still heals;
  every zone disrupted means the observer side is sick (15); zones are judged on
  every member, the stale records of a fresh LIST counted with this observer's own
  verdicts (``zone_stale``: abstain-only evidence) (15);
* a view whose counts cannot be true (more stale members than members) is refused:
  the observer abstains with ``inconsistent-view`` (6).

Members are considered in sorted id order so that two observers with the same view
reach the same decision. Note: with the default ``freeze_fraction`` 0.34 a group of
two never heals one death (1/2 > 0.34): deliberate; such a group cannot confirm with
two observers anyway.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from agent.errors import ConfigError
from agent.group.membership import LIVENESS, FrozenMap, MalformedRecord

Mode = Literal["armed", "dry-run", "off"]
ActionKind = Literal["asg-mark", "asg-terminate", "launch", "hook"]
MODES: tuple[str, ...] = ("armed", "dry-run", "off")
ACTION_KINDS: tuple[str, ...] = ("asg-mark", "asg-terminate", "launch", "hook")
EC2_STATES: tuple[str, ...] = (
    "pending", "running", "shutting-down", "stopping", "stopped", "terminated",
)
# EC2 states in which the instance is already on its way out: not a new death.
GOING_AWAY = frozenset({"shutting-down", "stopping"})
# EC2 states in which the instance cannot be serving: the heartbeat's silence is believed.
NOT_SERVING = frozenset({"stopped", "terminated"})

OBSERVER_REASONS = ("observer-sick", "observer-fresh", "inconsistent-view",
                    "all-zones-disrupted")
STALE = frozenset({"dead", "suspect"})

# The zone rule (invariant 15), after Kubernetes' node lifecycle controller
# (unhealthyZoneThreshold 0.55) and the EBS outage of April 2011, where one zone going
# dark made automation elsewhere re-mirror everything at once. A zone is disrupted when
# more than this fraction of its members is stale at once...
ZONE_DISRUPTED_FRACTION = 0.55
# ...and at least this many of them are: one silent member of a zone of one or two
# cannot be told from an ordinary death by counting, and an ordinary death must heal.
ZONE_MIN_STALE = 2


class PolicyError(ConfigError, ValueError):
    """A heal policy value that cannot be right (names the key under ``heal``)."""


def _num(name: str, v: object, *, low: float, low_ok: bool = True,
         high: float | None = None, integer: bool = False) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int,) if integer else (int, float))
    if ok:
        ok = math.isfinite(v) and (v >= low if low_ok else v > low)  # type: ignore[arg-type]
        if ok and high is not None:
            ok = v <= high  # type: ignore[operator]
    if not ok:
        rng = f"{'>=' if low_ok else '>'} {low:g}"
        if high is not None:
            rng += f" and <= {high:g}"
        kind = "an integer" if integer else "a number"
        raise PolicyError(f"must be {kind} {rng}, got {v!r}", path=f"heal.{name}")


@dataclass(frozen=True)
class HealPolicy:
    """The group's replacement policy (``heal:`` in the config, plus heartbeat timing)."""

    mode: str = "armed"
    action: str = "asg-terminate"
    grace_s: float = 300.0
    max_per_window: int = 1
    window_s: float = 300.0
    freeze_fraction: float = 0.34
    confirm_observers: int = 2
    dead_after_s: float = 30.0
    silent_after_s: float = 120.0
    replace_silent: bool = True  # same default as the config schema
    failed_before_freeze: int = 3
    max_in_flight_fraction: float = 0.10

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PolicyError(f"must be one of {', '.join(MODES)}, got {self.mode!r}",
                              path="heal.mode")
        if self.action not in ACTION_KINDS:
            raise PolicyError(f"must be one of {', '.join(ACTION_KINDS)}, got {self.action!r}",
                              path="heal.action")
        _num("grace_s", self.grace_s, low=0)
        _num("max_per_window", self.max_per_window, low=0, integer=True)
        _num("window_s", self.window_s, low=0, low_ok=False)
        _num("freeze_fraction", self.freeze_fraction, low=0, low_ok=False, high=1)
        _num("confirm_observers", self.confirm_observers, low=1, integer=True)
        _num("dead_after_s", self.dead_after_s, low=0, low_ok=False)
        _num("silent_after_s", self.silent_after_s, low=0, low_ok=False)
        _num("failed_before_freeze", self.failed_before_freeze, low=1, integer=True)
        _num("max_in_flight_fraction", self.max_in_flight_fraction, low=0, low_ok=False, high=1)
        if not isinstance(self.replace_silent, bool):
            raise PolicyError(f"must be true or false, got {self.replace_silent!r}",
                              path="heal.replace_silent")

    def in_flight_cap(self, group_size: int) -> int:
        """``max(1, floor(fraction × group))``: the floor lets a small group heal at all."""
        # The epsilon keeps 0.1 * 30 == 3.0000000000000004 and friends on the right side.
        return max(1, math.floor(self.max_in_flight_fraction * max(0, group_size) + 1e-9))


def _frozen_map(m: Mapping[str, Any]) -> Mapping[str, Any]:
    return m if isinstance(m, FrozenMap) else MappingProxyType(dict(m))


@dataclass(frozen=True)
class HealView:
    """Everything one observer knows when it decides; gathered by the daemon.

    ``verdicts``: liveness per member this observer judges (``Verdict`` objects or
    their status strings). ``suspicions``: per member, the distinct observer ids
    whose suspicion records say it is stale. ``ec2_state``: ``None`` means unknown
    or the API failed. ``asg_health``: "Healthy" | "Unhealthy" | None. ``probe_ok``:
    the direct probe of the member's health endpoint (None = not probed / no
    answer either way). ``silent_for``: store-clock seconds since its last
    heartbeat. ``leases``: members with a lease, whoever holds it. ``in_flight``:
    replacements launched and not yet heartbeating. ``budget``: replacements used in
    the current window (the store's counter). ``now``: the store's clock.
    ``record_stale``: members whose record, in one LIST of every record taken just
    before acting, is older than ``dead_after_s`` on the store's clock. One clock only:
    it may make a zone disrupted (abstain), never a member dead (``zone_stale``).
    """

    observer_id: str
    group_size: int
    verdicts: Mapping[str, Any] = field(default_factory=dict)
    suspicions: Mapping[str, Any] = field(default_factory=dict)
    ec2_state: Mapping[str, str | None] = field(default_factory=dict)
    asg_health: Mapping[str, str | None] = field(default_factory=dict)
    probe_ok: Mapping[str, bool | None] = field(default_factory=dict)
    silent_for: Mapping[str, float | None] = field(default_factory=dict)
    leases: frozenset[str] = frozenset()
    in_flight: int = 0
    budget: int = 0
    consecutive_failures: int = 0
    observer_sick: bool = False
    observer_fresh: bool = False
    paused: bool = False
    api_healthy: bool = True
    now: float = 0.0
    confirmations: Mapping[str, Any] | None = None
    peer_probes: Mapping[str, Any] = field(default_factory=dict)
    zones: Mapping[str, str] = field(default_factory=dict)
    asg_of: Mapping[str, str] = field(default_factory=dict)
    in_asg: frozenset[str] = frozenset()
    replaced_by: Mapping[str, str] = field(default_factory=dict)
    record_stale: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        statuses = {m: getattr(v, "status", v) for m, v in self.verdicts.items()}
        for m, s in statuses.items():
            if s not in LIVENESS:
                raise ValueError(f"verdict for {m} must be one of {', '.join(LIVENESS)}, got {s!r}")
        for name in ("group_size", "in_flight", "budget", "consecutive_failures"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        object.__setattr__(self, "verdicts", MappingProxyType(statuses))
        object.__setattr__(self, "suspicions", MappingProxyType(
            {m: frozenset(obs) for m, obs in self.suspicions.items()}))
        for name in ("ec2_state", "asg_health", "probe_ok", "silent_for"):
            object.__setattr__(self, name, _frozen_map(getattr(self, name)))
        object.__setattr__(self, "leases", frozenset(self.leases))
        conf = self.suspicions if self.confirmations is None else self.confirmations
        object.__setattr__(self, "confirmations", MappingProxyType(
            {m: frozenset(obs) for m, obs in conf.items()}))
        object.__setattr__(self, "peer_probes", MappingProxyType(
            {m: _frozen_map(p) for m, p in self.peer_probes.items()}))
        for name in ("zones", "asg_of", "replaced_by"):
            object.__setattr__(self, name, _frozen_map(getattr(self, name)))
        object.__setattr__(self, "in_asg", frozenset(self.in_asg))
        object.__setattr__(self, "record_stale", frozenset(self.record_stale))


@dataclass(frozen=True)
class FreezeState:
    """Why nothing is replaced right now.

    ``scope`` "observer": this observer abstains (sick, or fresh after a restart);
    its own view is not to be trusted, so it records no group-wide freeze. "group":
    the whole group is frozen (paused, API failing, mass death, failed replacements).
    ``reasons`` lists every cause; ``reason`` is the first, for display.
    """

    frozen: bool
    reason: str
    reasons: tuple[str, ...] = ()
    scope: Literal["group", "observer"] = "group"


@dataclass(frozen=True)
class Action:
    """Replace ``member_id`` with ``kind``. ``dry_run``: record it, execute nothing."""

    member_id: str
    kind: str
    reasons: tuple[str, ...]
    dry_run: bool = False


@dataclass(frozen=True)
class Refusal:
    """A member considered and not acted on, with every reason that applied."""

    member_id: str
    reasons: tuple[str, ...]

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


@dataclass(frozen=True)
class Decision:
    """``forget``: members whose record is to be removed (the ASG already replaced
    them: no action, no failure). ``disrupted_zones``: zones judged disrupted."""

    freeze: FreezeState | None = None
    actions: tuple[Action, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    forget: tuple[Refusal, ...] = ()
    disrupted_zones: tuple[str, ...] = ()

    @property
    def frozen(self) -> bool:
        return self.freeze is not None and self.freeze.frozen


def already_replaced(m: str, view: HealView) -> str | None:
    """Why ``m`` was already replaced, or None (invariant 15).

    Terminated or shutting-down, and either: it carries an ``aws:autoscaling:groupName``
    tag and that group no longer lists it (the ASG's own health check took it and
    launched another); or a newer instance, pending or running, carries the
    ``ec2-agent:replaces`` tag naming it (``replaced_by``: a standalone group's
    replacement already took its place). Not a new death, not a failed replacement.
    """
    ec2 = view.ec2_state.get(m)
    if ec2 not in ("terminated", "shutting-down"):
        return None
    asg = view.asg_of.get(m)
    if asg and m not in view.in_asg:
        return f"already-replaced: ec2 says {ec2} and {asg} no longer lists it"
    newer = view.replaced_by.get(m)
    if newer:
        return f"already-replaced: ec2 says {ec2} and {newer} took its place (replaces tag)"
    return None


def disrupted_zones(stale: Mapping[str, int], sizes: Mapping[str, int]) -> tuple[str, ...]:
    """Zones where more than 55 % of the members, and at least two, are stale at once."""
    return tuple(sorted(
        z for z, n in stale.items()
        if z and n >= ZONE_MIN_STALE and n > ZONE_DISRUPTED_FRACTION * max(sizes.get(z, 0), n)))


def _zone_sizes(view: HealView) -> dict[str, int]:
    sizes: dict[str, int] = {}
    if isinstance(view.zones, FrozenMap):  # built once per change of the view (issue #11)
        sizes.update(view.zones.counts())
    else:
        for z in view.zones.values():
            if z:
                sizes[z] = sizes.get(z, 0) + 1
    return sizes


def _zone_counts(view: HealView, stale_members: set[str]) -> tuple[dict[str, int], dict[str, int]]:
    stale: dict[str, int] = {}
    zone_of = view.zones.get
    for m in stale_members:
        z = zone_of(m, "")
        if z:
            stale[z] = stale.get(z, 0) + 1
    return stale, _zone_sizes(view)


def zone_stale(view: HealView, stale_members: set[str]) -> set[str]:
    """The members counted stale when zones are judged: this observer's own stale
    verdicts and others' suspicions (``stale_members``), plus every member whose record a
    fresh LIST shows stale (``record_stale``), unless this observer itself sees it alive.

    An observer watches only ``k`` peers: when two zones go dark, the only watchers of
    some members of one dark zone may sit in the other, so no suspicion of them ever
    reaches the store and the zone looks half lit (zone-outage seed 129). The store's
    record ages cover every member; as evidence for abstaining, one clock is enough.
    ``grace`` is not seen alive: it means not judged yet. A replacement that started
    during a zone outage has every member in grace for ``grace_s`` after the record it
    first saw, and acted on the one dark member past that while its zone looked lit
    (stall-zone seed 143).
    """
    seen_alive = {m for m, s in view.verdicts.items() if s in ("alive", "leaving")}
    return stale_members | {m for m in view.record_stale if m in view.zones
                            and m not in seen_alive and m != view.observer_id}


def silence_since_lit(verdicts: Mapping[str, str], silent_for: Mapping[str, float | None],
                      zones: Mapping[str, str], dark_for: Mapping[str, float],
                      dead_after_s: float
                      ) -> tuple[Mapping[str, str], Mapping[str, float | None]]:
    """A zone's silence does not count while the zone could not be heard (invariant 15).

    ``dark_for``: zone -> seconds since this observer last judged it disrupted. A member
    of such a zone is silent at most that long (a member's record aged while its zone
    was dark, which says nothing of the member), and is not ``dead`` until the zone has
    been lit for ``dead_after_s``: long enough for its agent to heartbeat again. After
    Kubernetes' node lifecycle controller, which restarts its nodes' grace periods when a
    zone leaves full disruption. Returns the verdicts and silences to decide on (the
    ones given when no zone is recovering).
    """
    if not dark_for:
        return verdicts, silent_for
    out_v = dict(verdicts)
    out_s = dict(silent_for)
    # only the members judged (watched or suspected), never the whole roster: this runs
    # at every step of every member (issue #11: a loop over all zones was 5 % of a run)
    for m in {*out_v, *out_s}:
        since = dark_for.get(zones.get(m, ""))
        if since is None:
            continue
        s = out_s.get(m)
        if s is not None and s > since:
            out_s[m] = since
        if since < dead_after_s and out_v.get(m) == "dead":
            out_v[m] = "suspect"
    return out_v, out_s


def stale_records(ages: Mapping[str, float], dead_after_s: float) -> frozenset[str]:
    """Members whose record age (``store_now - LastModified`` of one LIST) is at least
    ``dead_after_s``: ``HealView.record_stale``."""
    return frozenset(m for m, age in ages.items() if age >= dead_after_s)


def _freeze(view: HealView, policy: HealPolicy,
            stale_members: set[str], zones: tuple[str, ...]) -> FreezeState | None:
    reasons: list[str] = []
    if view.observer_sick:
        reasons.append("observer-sick: own heartbeat writes or API calls failing")
    if view.observer_fresh:
        reasons.append("observer-fresh: has not watched a full window since its restart")
    if len(stale_members) > view.group_size:
        reasons.append(f"inconsistent-view: {len(stale_members)} stale members in a group "
                       f"of {view.group_size}")
    sizes = _zone_sizes(view)
    if sum(sizes.values()) > view.group_size:
        reasons.append(f"inconsistent-view: {sum(sizes.values())} members in zones, group of "
                       f"{view.group_size}")
    if zones and len(sizes) > 1 and set(zones) >= set(sizes):
        reasons.append(f"all-zones-disrupted: {', '.join(zones)}: the observer side is sick")
    if view.paused:
        reasons.append("paused: kill switch present")
    if not view.api_healthy:
        reasons.append("api-failing")
    if view.consecutive_failures >= policy.failed_before_freeze:
        reasons.append(f"failed-replacements: {view.consecutive_failures}")
    # A disrupted zone is one correlated fault, handled by the zone rule: the rest of
    # the group is judged as a group of its own.
    outside = ({m for m in stale_members if view.zones.get(m, "") not in zones} if zones
               else stale_members)
    size = view.group_size - sum(sizes.get(z, 0) for z in zones)
    if outside and len(outside) / max(size, 1) > policy.freeze_fraction:
        where = f" outside {', '.join(zones)}" if zones else ""
        reasons.append(f"mass-death: {len(outside)}/{size} dead/suspect{where} > "
                       f"{policy.freeze_fraction:g}")
    if not reasons:
        return None
    first = next((r for r in reasons if r.startswith(OBSERVER_REASONS)), reasons[0])
    scope: Literal["group", "observer"] = (
        "observer" if first.startswith(OBSERVER_REASONS) else "group")
    ordered = (first, *[r for r in reasons if r != first])
    return FreezeState(True, first, ordered, scope)


_VERDICT_REFUSALS = {
    "alive": "alive",
    "grace": "grace: not judged before first heartbeat + grace_s",
    "leaving": "leaving: leaving is not dying",
    "suspect": "suspect: stale, not confirmed on both clocks",
    "unknown": "unknown: insufficient data",
}


def _judge(m: str, view: HealView, policy: HealPolicy) -> tuple[list[str], list[str]]:
    """(refusal reasons, action reasons) for one member, before the caps."""
    no: list[str] = []
    yes: list[str] = []
    verdict = view.verdicts.get(m, "unknown")
    if m == view.observer_id:
        no.append("self: an observer never replaces itself")
    if verdict != "dead":
        # Not dead in this observer's own judgement: nothing else about it matters.
        return [*no, _VERDICT_REFUSALS[verdict]], []
    yes.append(f"dead: stale >= {policy.dead_after_s:g}s on the store's and own clocks")
    leased = m in view.leases
    if leased:
        no.append("leased: a replacement already owns this member")
    ec2 = view.ec2_state.get(m)
    probe = view.probe_ok.get(m)
    agree = (set(view.confirmations.get(m, frozenset())) | {view.observer_id}) - {m}
    probes = {view.observer_id: probe}
    probes.update({o: p for o, p in view.peer_probes.get(m, {}).items() if o != m})
    answered = sorted(o for o, p in probes.items() if p is True)
    failed = {o for o, p in probes.items() if p is False and o in agree}
    if answered:
        no.append(f"probe-ok: its health endpoint answers ({', '.join(answered)})")
    if ec2 is None:
        if not leased:  # a leased member is not asked about (its lease is the reason)
            no.append("ec2-state-unknown: an API error or insufficient data never counts as dead")
    elif ec2 == "pending":
        no.append("ec2-pending: the instance is booting")
    elif ec2 in GOING_AWAY:
        no.append(f"already-being-replaced: ec2 says {ec2}")
    elif ec2 == "terminated" and leased:
        no.append("already-being-replaced: terminated and leased")
    elif ec2 in NOT_SERVING:
        yes.append(f"ec2 says {ec2}")
    elif ec2 == "running":
        if view.asg_health.get(m) == "Unhealthy":
            no.append("already-being-replaced: the ASG marked it Unhealthy")
        else:
            silent = view.silent_for.get(m)
            if not policy.replace_silent:
                no.append("silent-but-running: ec2 says running; policy.replace_silent is off")
            need = min(policy.confirm_observers, len(agree))
            if probe is None:
                no.append("probe-unknown: no direct probe result")
            elif len(failed) < max(need, 1):
                # One failed probe is no evidence (a security group, a route, a busy
                # observer): every confirming observer must have failed to reach it.
                no.append(f"probe-unconfirmed: {len(failed)}/{need} confirming observers' "
                          "probes failed")
            if silent is None or silent < policy.silent_after_s:
                shown = "unknown" if silent is None else f"{silent:.0f}s"
                no.append(f"silent {shown} < silent_after_s {policy.silent_after_s:g}s")
            if probe is False and silent is not None:
                yes.append(f"ec2 says running; silent {silent:.0f}s and {len(failed)} "
                           "observers' probes fail")
    else:
        no.append(f"ec2-state-unrecognised: {ec2!r}")
    if len(agree) < policy.confirm_observers:
        no.append(f"unconfirmed: {len(agree)}/{policy.confirm_observers} observers agree")
    else:
        yes.append(f"confirmed by {len(agree)} observers: {', '.join(sorted(agree))}")
    return no, yes


def decide(view: HealView, policy: HealPolicy) -> Decision:
    """The replacement decision for one observer's view under a policy. Pure."""
    if policy.mode == "off":
        return Decision()
    considered = sorted(m for m, s in view.verdicts.items() if s != "alive")
    # Already replaced by its ASG: not counted as stale (dead or only suspected), and
    # forgotten by an observer whose own verdict is dead.
    replaced = {m: why for m in considered if m != view.observer_id
                and view.verdicts[m] in STALE and (why := already_replaced(m, view))}
    gone = {m: why for m, why in replaced.items() if view.verdicts[m] == "dead"}
    stale_members = {m for m, s in view.verdicts.items() if s in STALE and m not in replaced}
    stale_z, sizes = _zone_counts(view, zone_stale(view, stale_members) - set(replaced))
    zones = disrupted_zones(stale_z, sizes)
    freeze = _freeze(view, policy, stale_members, zones)
    if freeze is not None:
        refusals = tuple(Refusal(m, (f"frozen: {freeze.reason}",)) for m in considered)
        forget: tuple[Refusal, ...] = ()
        if freeze.scope == "group" and not view.paused:
            forget = tuple(Refusal(m, (w,)) for m, w in sorted(gone.items()))
        return Decision(freeze, (), refusals, forget, zones)
    cap = policy.in_flight_cap(view.group_size)
    actions: list[Action] = []
    refused: list[Refusal] = []
    for m in considered:
        if m in replaced:
            continue
        no, yes = _judge(m, view, policy)
        z = view.zones.get(m, "")
        if z in zones:
            no.append(f"zone-disrupted: {z}: most of its members fell silent at once")
        if not no:
            used = view.budget + len(actions)
            flying = view.in_flight + len(actions)
            if used >= policy.max_per_window:
                no.append(f"rate-limit: {used}/{policy.max_per_window} used in this "
                          f"{policy.window_s:g}s window")
            elif flying >= cap:
                no.append(f"in-flight: {flying}/{cap} replacements in flight")
        if no:
            refused.append(Refusal(m, tuple(no)))
        else:
            actions.append(Action(m, policy.action, tuple(yes), policy.mode == "dry-run"))
    forget = tuple(Refusal(m, (w,)) for m, w in sorted(gone.items()))
    return Decision(None, tuple(actions), tuple(refused), forget, zones)


def not_found_belief(first_missing: float, now: float, reads: int,
                     persist_s: float) -> str | None:
    """What EC2's "no such instance" is worth: ``terminated`` or None (unknown).

    In 2007 EC2's own control plane described and terminated instances wrongly; an
    eventually consistent DescribeInstances also misses instances just launched. One
    answer is never believed (invariant 14): "not found" counts as terminated only
    after at least two reads spread over ``persist_s`` on the observer's clock.
    """
    if reads >= 2 and now - first_missing >= persist_s:
        return "terminated"
    return None


def lease_clearable(state: str, acted: bool, age_s: float | None, acting_ttl_s: float) -> bool:
    """May a lease against a member that heartbeats again be removed? (invariant 13)

    Only if no action happened through it: ``held``, ``refused``, or ``failed`` before
    acting; an ``acting`` lease only once older than ``acting_ttl_s`` (its call is over).
    """
    if acted:
        return False
    if state in ("held", "refused", "failed"):
        return True
    return state == "acting" and age_s is not None and age_s >= acting_ttl_s


# --------------------------------------------------------------------------- helpers


def lease_token(group: str, member_id: str, lease_etag_or_id: str) -> str:
    """An idempotency token (RunInstances ClientToken: ≤ 64 ASCII) from the lease.

    The controller passes the nonce of the first lease generation for the death
    (``agent.heal.resolve.death_token``): every retry, by the holder or by an observer
    that took the lease over, sends the same token, so EC2 launches at most one
    replacement per death (invariant 1). Quotes and a weak ``W/`` prefix are
    stripped so the same ETag read from different responses gives the same token.
    """
    lease = lease_etag_or_id.strip()
    if lease.startswith("W/"):
        lease = lease[2:]
    lease = lease.strip('"')
    for name, v in (("group", group), ("member_id", member_id), ("lease", lease)):
        if not v:
            raise ValueError(f"lease_token needs a non-empty {name}")
    digest = hashlib.sha256(f"ec2-agent\x00{group}\x00{member_id}\x00{lease}".encode())
    return f"ec2a-{digest.hexdigest()[:48]}"


def budget_after(counter_record: Mapping[str, Any] | None, now: float,
                 window_s: float) -> tuple[float, int]:
    """``(window_start, used)`` of the replacement budget at store time ``now``.

    The counter is a JSON object ``{"window_start": t, "used": n}`` updated with
    compare-and-swap (invariant 5). Absent, or its window over → a new window opens
    at ``now`` with nothing used. A ``now`` before ``window_start`` (store frontends
    a little apart) keeps the current window: never a free reset.
    """
    if counter_record is None:
        return (now, 0)
    if not isinstance(counter_record, Mapping):
        raise MalformedRecord(f"budget counter must be an object, got {counter_record!r}")
    start = counter_record.get("window_start")
    used = counter_record.get("used")
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not math.isfinite(start):
        raise MalformedRecord(f"budget counter window_start must be a number, got {start!r}")
    if isinstance(used, bool) or not isinstance(used, int) or used < 0:
        raise MalformedRecord(f"budget counter used must be a non-negative integer, got {used!r}")
    if now >= start + window_s:
        return (now, 0)
    return (float(start), used)


def budget_take(counter_record: Mapping[str, Any] | None, now: float, window_s: float,
                max_per_window: int) -> dict[str, Any] | None:
    """The counter to CAS-write to spend one replacement, or None if none is left."""
    start, used = budget_after(counter_record, now, window_s)
    if used >= max_per_window:
        return None
    return {"window_start": start, "used": used + 1}


def budget_give_back(counter_record: Mapping[str, Any] | None, now: float, window_s: float,
                     taken_at: float) -> dict[str, Any] | None:
    """The counter to CAS-write to return one unit spent at store time ``taken_at`` by an
    attempt that did nothing (refused before its first mutating call), or None.

    Only into the window the unit came from: a window that started after ``taken_at`` (or
    a counter already at zero) gets nothing back, so a refund can never make room that
    an action used. Spent units a refund misses stay spent: the limit errs on the safe side.
    """
    if counter_record is None:
        return None
    start, used = budget_after(counter_record, now, window_s)
    if used <= 0 or start > taken_at:
        return None
    return {"window_start": start, "used": used - 1}


def is_failed_replacement(launched_at: float, now: float, deadline_s: float,
                          heartbeated: bool) -> bool:
    """A replacement that has not heartbeated ``deadline_s`` after launch failed (6).

    ``launched_at`` and ``now`` must be on the same clock (the store's: the lease's
    LastModified and a response's Date).
    """
    return not heartbeated and now - launched_at >= deadline_s


def failure_streak(outcomes: Sequence[bool]) -> int:
    """Consecutive failures at the end of ``outcomes`` (oldest first, True = failed)."""
    n = 0
    for failed in reversed(outcomes):
        if not failed:
            break
        n += 1
    return n
