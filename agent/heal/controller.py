"""The heal controller: gathers one observer's view, calls ``agent.heal.decide.decide``, acts.

The decision is pure (``agent.heal.decide``); this module is the imperative shell around
it. Per step it reads, from the store (on the store's clock) and the cloud:

* suspicions, ``groups/<g>/suspicions/<member>/<observer>``: every observer that
  judges a member stale (suspect or dead) keeps such an object fresh; distinct
  observers are counted, objects older than ``suspicion_ttl_s`` (store clock) are
  ignored and eventually deleted, and an observer deletes its own when it no longer
  suspects. Members others suspect and this observer does not watch count as
  ``suspect`` in its view, so a mass death is seen even with small watch sets;
* leases, ``groups/<g>/leases/<member>`` (create-only; see ``Lease``), giving the
  members already owned, replacements in flight and the failure streak (a
  replacement that has not heartbeated ``replace_deadline_s`` after the action
  failed; the streak restarts after ``resume``);
* the budget counter ``groups/<g>/budget.json`` and the kill switch
  ``groups/<g>/control/pause``;
* EC2's and the Auto Scaling group's view of the members this observer calls dead
  (an API error is never evidence of death: it freezes with ``api-failing``), and a
  direct probe of a running-but-silent member's health endpoint.

Then, per non-dry-run action: take the lease (``If-None-Match: *``; losing is fine
and recorded; a lease left ``refused`` can be taken over by compare-and-swap),
spend one unit of budget (``If-Match`` CAS, retried on a lost race; a full window
refuses; an attempt refused before its first mutating call gives its unit back into the
window it came from), check the pause object again, ask EC2 again, act,
and record the outcome in the lease. Every decision, taken or refused, becomes an
event (``agent.group.events``), de-duplicated per member so a standing refusal is
written once, not every interval. The freeze state goes into ``state.json`` under
``heal`` (mode, frozen, reason, budget_left, in_flight, ...).

Daemon call contract (``ec2-agent run``, once per heartbeat interval, after the
peer watcher's ``tick()``)::

    ctl = HealController.for_daemon(ctx, watcher, clock=clock)   # once
    decision = ctl.step(watcher, heartbeater)   # or ctl.step(observer_sick=hb.observer_sick)
    if ctl.superseded or agent.heal.leases.superseded(store, group, my_id):
        ...  # stop claiming membership: heartbeater.leave("superseded"), status says so

``step(peers, observer_health)``: ``peers`` is a ``PeersView`` or the daemon's
``agent.group.peers.PeerWatcher`` (default: the watcher given to ``for_daemon``);
``observer_health`` is an ``ObserverHealth`` or anything with ``observer_sick`` and
``last_error`` (the ``Heartbeater``). ``step`` never raises for store or cloud trouble:
it records it (observer-sick / api-failing) and returns the ``Decision``. ``ctl.superseded`` is
refreshed at every step (one GET of our own lease key).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from operator import countOf
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agent.clock import SYSTEM_CLOCK, Clock
from agent.errors import AgentError, CloudError, NotFound, PreconditionFailed, StoreError
from agent.group.membership import DEPARTING_STATES, MalformedRecord, MemberRecord
from agent.heal.decide import (
    GOING_AWAY,
    NOT_SERVING,
    Action,
    Decision,
    HealPolicy,
    HealView,
    PolicyError,
    budget_after,
    decide,
    is_failed_replacement,
    not_found_belief,
    silence_since_lit,
    stale_records,
)
from agent.heal.leases import (
    OPEN_STATES,
    Lease,
    archivable,
    budget_key,
    claim_launch,
    claim_released,
    close_lease,
    control_prefix,
    count_suspicions,
    give_back_budget,
    launch_claimant,
    lease_key,
    lease_outcome,
    leases_prefix,
    parse_lease,
    parse_suspicion,
    pause_key,
    read_closed_lease,
    read_lease,
    read_lease_anywhere,
    release_inflight,
    resumed_key,
    streak,
    suspicion_key,
    suspicions_prefix,
    take_budget,
    take_inflight,
    write_event,
)
from agent.heal.resolve import (
    CloudSays,
    asg_replacement,
    death_token,
    launched_for,
    newer_member,
    resolve_acting,
)
from agent.interfaces import CloudAPI, Entry, InstanceInfo, Listing, StoreAPI
from agent.layout import id_from_key, member_key, members_prefix, zone_dark_key, zone_dark_prefix

if TYPE_CHECKING:
    from agent.aws.imds import Identity
    from agent.bootctx import BootContext
    from agent.config.model import Config
    from agent.group.membership import Verdict
    from agent.group.peers import PeerWatcher

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STALE_VERDICTS = frozenset({"dead", "suspect"})
# The least time a closed lease stays in ``leases/`` (``HealController.archive_after_s``).
ARCHIVE_AFTER_S = 900.0
# Refusals that only restate a verdict nobody acts on: not worth an event each. A member
# is decided about once it is dead; before that nothing was proposed. ``suspect`` too: when
# a zone goes dark every observer sees each of its members suspect for a while, and an
# event from each observer for each was N^2 writes (~240,000 in six simulated minutes at
# N = 1,000, issue #11); the zone's own event names them.
_QUIET_REFUSALS = ("alive", "grace", "leaving", "unknown", "suspect")
# Verdicts an idle step may skip the gather on (``HealController._idle``)
_IDLE_VERDICTS = frozenset({"alive", "grace", "leaving"})
# An ASG's replacement is adopted when launched no earlier than the action's ``acted_at``
# less this (``HealController._launched_after``): ``acted_at`` is read after the call
# returned, and the ASG may launch before the answer arrives.
ADOPT_SLACK_S = 5.0
# The fence's probe of the member waits at most this share of what is left of the
# decision's age (the rest is slack for the probe's own overrun).
FENCE_PROBE_SHARE = 0.8


def _all_alive(peers: PeersView) -> bool:
    """Every member this observer judges is alive, in grace or leaving: nothing to act on."""
    return all(_status(v) in _IDLE_VERDICTS for v in peers.verdicts.values())


# -- pure: small judgements ---------------------------------------------------------------

def dedupe_key(kind: str, reasons: Iterable[str]) -> tuple[str, ...]:
    """A refusal's identity without its numbers, so ``silent 31s`` and ``32s`` match."""
    return (kind, *sorted({r.split(":")[0].split(" ")[0] for r in reasons}))


def ec2_still_agrees(decided: str | None, fresh: str | None, asg_health: str | None) -> str | None:
    """Why the second look at EC2, right before acting, says no (None: go ahead)."""
    if fresh is None:
        return "ec2-state-unknown at the second look: never act on an API error"
    if fresh in GOING_AWAY:
        return f"already-being-replaced: ec2 says {fresh} at the second look"
    if decided in NOT_SERVING:
        return None if fresh in NOT_SERVING else f"ec2 changed: {decided} -> {fresh}"
    if decided == "running":
        if fresh != "running":
            return f"ec2 changed: running -> {fresh}"
        if asg_health == "Unhealthy":
            return "already-being-replaced: the ASG marked it Unhealthy"
        return None
    return f"ec2 state {decided!r} is not one the decision acts on"


def policy_from_config(config: Config) -> HealPolicy:
    """The pure policy from the agent config (``heal`` plus ``heartbeat.dead_after_s``)."""
    h = config.heal
    return HealPolicy(
        mode=h.mode, action=h.action, grace_s=float(h.grace_s),
        max_per_window=int(h.max_per_window), window_s=float(h.window_s),
        freeze_fraction=float(h.freeze_fraction), confirm_observers=int(h.confirm_observers),
        dead_after_s=float(config.heartbeat.dead_after_s),
        silent_after_s=float(h.silent_after_s), replace_silent=bool(h.replace_silent),
        failed_before_freeze=int(h.failed_before_freeze),
    )


# -- inputs from the daemon --------------------------------------------------------------------

@dataclass(frozen=True)
class PeersView:
    """This observer's picture of its group, as the peer watcher built it."""

    verdicts: Mapping[str, Verdict | str]  # a plain status string in hand-built views
    group_size: int
    endpoints: Mapping[str, str] = field(default_factory=dict)
    silent_for: Mapping[str, float | None] = field(default_factory=dict)
    observer_fresh: bool = False
    members: frozenset[str] = frozenset()
    zones: Mapping[str, str] = field(default_factory=dict)
    departed: Mapping[str, float] = field(default_factory=dict)
    read_failing: str = ""

    @classmethod
    def from_watcher(cls, watcher: PeerWatcher, *, dead_after_s: float,
                     grace_s: float) -> PeersView:
        """The watcher's picture, counted from live evidence (invariant 6).

        Records that say leaving/superseded are not members (a leave whose delete
        failed): they are left out of the group's size and listed in ``departed``
        (id → store age) for cleaning. Failing peer reads make the observer abstain.
        The roster (members, zones, endpoints) is built once per view change.
        """
        verdicts = watcher.verdicts(dead_after_s=dead_after_s, grace_s=grace_s)
        r = watcher.roster()
        return cls(
            verdicts=verdicts,
            group_size=len(r.members),
            endpoints=r.endpoints,
            silent_for={m: v.store_age_s for m, v in verdicts.items()},
            observer_fresh=watcher.liveness.observer_fresh(dead_after_s),
            members=r.members,
            zones=r.zones,
            departed={m: float(watcher.view[m].age_s or 0.0) for m in sorted(r.departing)},
            read_failing="; ".join(watcher.last_store_errors)[:300],
        )


@dataclass(frozen=True)
class ObserverHealth:
    """Is this observer itself sick (its own heartbeat writes or API calls failing)?"""

    sick: bool = False
    reason: str = ""


class ReportsSickness(Protocol):
    """What ``step`` reads from the ``Heartbeater`` when it is passed as the health."""

    observer_sick: bool
    last_error: str


def _status(v: Verdict | str | None) -> str:
    """A verdict's status (a hand-built view may give the status string itself); no
    verdict at all (a member this observer does not watch) has none."""
    if v is None:
        return ""
    return v if isinstance(v, str) else v.status


@dataclass(frozen=True)
class _ProbeAt:
    """Where the fence's last look probes: the member (the roster's endpoint, for a member
    whose record is gone) and ``controls``, endpoints of peers this observer judges alive,
    asked when the member is silent: is it, or are my probes reaching nobody?"""

    member: str = ""
    controls: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What execution did with one action: acted | lost | refused | failed | dry-run
    (``failed`` with detail "outcome unknown: ...": the call may have landed)."""

    member: str
    result: str
    detail: str = ""
    replacement: str = ""


# -- default probe and hook --------------------------------------------------------------------

PROBE_TIMEOUT_S = 2.0
# The fence asks the member once more when its controls took longer than this (a silent
# control's timeout, not an answer's few milliseconds): ``_probe_at_fence``.
FENCE_REPROBE_AFTER_S = 0.1


class AgentProbe(Protocol):
    """Does the member's agent at ``endpoint`` answer within ``timeout_s``? (None: no
    endpoint to ask.)"""

    def __call__(self, endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool | None: ...


def probe_health(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool | None:
    """Does the member's agent answer at all? Any HTTP answer (even 503) means alive."""
    if not endpoint:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(endpoint.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read(4096)
        return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def run_hook(command: str, member: str, group: str, timeout_s: float = 120.0) -> str:
    env = dict(os.environ, EC2_AGENT_DEAD_ID=member, EC2_AGENT_GROUP=group)
    try:
        p = subprocess.run(command, shell=True, env=env, capture_output=True,  # noqa: S602
                           timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"heal hook {command!r}: {exc}") from exc
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()[-300:]
        raise AgentError(f"heal hook {command!r} exited {p.returncode}: {err}")
    return p.stdout.decode(errors="replace").strip()[-300:]


# -- the controller ----------------------------------------------------------------------------

class _Fenced(Exception):
    """A fence refused the next mutating call (``lease``: the lease as it now is)."""

    def __init__(self, why: str, lease: Lease | None) -> None:
        super().__init__(why)
        self.why = why
        self.lease = lease


class _Unsure(Exception):
    """A mutating cloud call failed without saying whether it happened: a read timeout
    after the request went out, a dropped connection, a 5xx, or any error after botocore
    retried one of those. The lease stays ``acting`` for a resolver to read the cloud."""


@dataclass
class _Gathered:
    store_now: float = 0.0
    store_mono: float = 0.0  # this clock's monotonic time when ``store_now`` was read
    suspicions: dict[str, frozenset[str]] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    paused: bool = False
    resumed_at: float | None = None
    budget_used: int = 0
    errors: list[str] = field(default_factory=list)
    confirmations: dict[str, frozenset[str]] = field(default_factory=dict)
    peer_probes: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    # zone -> store age of the last judgement, by any observer, that it was disrupted
    zones_dark: dict[str, float] = field(default_factory=dict)


class HealController:
    """One observer's replacement controller. Not thread-safe: one per observer."""

    def __init__(self, store: StoreAPI, cloud: CloudAPI, config: Config, identity: str | Identity,
                 clock: Clock = SYSTEM_CLOCK, *, policy: HealPolicy | None = None,
                 state_path: Path | None = None, watcher: PeerWatcher | None = None,
                 probe: AgentProbe = probe_health,
                 hook: Callable[[str, str, str], str] = run_hook,
                 replace_deadline_s: float | None = None,
                 suspicion_ttl_s: float | None = None,
                 lease_expiry_s: float | None = None,
                 decision_max_age_s: float | None = None,
                 not_found_persist_s: float | None = None,
                 watchers_k: int | None = None,
                 archive_after_s: float | None = None,
                 idle_gather_s: float | None = None) -> None:
        self.store = store
        self.cloud = cloud
        self.config = config
        self.group: str = config.group
        self.me: str = identity if isinstance(identity, str) else identity.instance_id
        self.clock = clock
        self.policy = policy or policy_from_config(config)
        self.state_path = state_path
        self.watcher = watcher
        self.probe = probe
        self.hook = hook
        boot_s = float(config.boot.deadline_s)
        self.replace_deadline_s = (replace_deadline_s if replace_deadline_s is not None
                                   else 2 * boot_s + 2 * self.policy.dead_after_s)
        self.suspicion_ttl_s = suspicion_ttl_s or 2 * self.policy.dead_after_s
        dead = self.policy.dead_after_s
        # A held lease older than this lost its holder (it acts within one step): another
        # observer may take it over; an acting one older than twice this ended its call.
        self.lease_expiry_s = lease_expiry_s if lease_expiry_s is not None else 4 * dead
        self.acting_ttl_s = 2 * self.lease_expiry_s
        # A decision older than this is stale: the world it judged may have changed.
        self.decision_max_age_s = (decision_max_age_s if decision_max_age_s is not None
                                   else dead)
        self.not_found_persist_s = (not_found_persist_s if not_found_persist_s is not None
                                    else dead)
        # A closed lease (its replacement heartbeats, or failed to) leaves ``leases/``
        # this long after its last write (issue #11); long after any decision about its
        # member could still be in flight (decision_max_age_s fences older ones).
        self.archive_after_s = (archive_after_s if archive_after_s is not None
                                else max(ARCHIVE_AFTER_S, 2 * self.replace_deadline_s))
        # An idle observer (below, ``_idle``) still gathers at least this often: lease
        # upkeep (others' acting leases, archiving) and "was I replaced" wait at most this.
        self.idle_gather_s = idle_gather_s if idle_gather_s is not None else dead
        if watchers_k is not None and self.policy.confirm_observers > watchers_k:
            raise PolicyError(
                f"must be <= the {watchers_k} observers that watch each member, got "
                f"{self.policy.confirm_observers}: no death could ever be confirmed",
                path="heal.confirm_observers")
        self.hook_command: str | None = config.heal.hook
        self.superseded = False
        self._missing: dict[str, tuple[float, int]] = {}
        self._my_probes: dict[str, bool | None] = {}
        self._zones_recorded: tuple[str, ...] = ()
        # zone -> when (my monotonic clock) I last judged it disrupted: its members' silence
        # counts again only from then (docs/safety.md 15, the recovery grace)
        self._zone_dark_at: dict[str, float] = {}
        self._decided_mono = 0.0
        self._my_asg: str | None = None
        self.outcomes: list[Outcome] = []  # what execution did, newest last (bounded)
        self._recorded: dict[str, tuple[str, ...]] = {}
        self._recorded_prune_at = 64
        self._freeze_recorded: tuple[str, ...] = ()
        self._lease_cache: dict[str, Lease] = {}
        # launch -> the member whose lease claimed it, for claims lost to another lease
        # (``_claim``): passed by when the next step picks a replacement
        self._claims: dict[str, str] = {}
        self._stuck: dict[str, str] = {}  # member -> etag of the acting lease reported stuck
        # The last full step, when it found nothing to do (``_idle``): its decision and
        # gather are what an idle step reports.
        self._idle_after: tuple[Decision, _Gathered] | None = None
        self._gathered_mono = 0.0
        self.idle_steps = 0

    @classmethod
    def for_daemon(cls, ctx: BootContext, watcher: PeerWatcher, *,
                   clock: Clock = SYSTEM_CLOCK) -> HealController:
        from agent.aws.cloud import Cloud

        region = ctx.cfg.store.region or ctx.ident.region
        return cls(ctx.get_store(), Cloud(region), ctx.cfg, ctx.ident, clock,
                   state_path=ctx.paths.state_file, watcher=watcher,
                   watchers_k=watcher.k)

    # -- the step -------------------------------------------------------------------------------
    def step(self, peers: PeersView | PeerWatcher | None = None,
             observer_health: ObserverHealth | ReportsSickness | None = None, *,
             observer_sick: bool | None = None) -> Decision:
        """Gather, decide, act, record. See the module docstring for the contract."""
        # A decision is as old as its evidence: the verdicts are taken now, and a stall
        # anywhere before the action ages the decision (fence, invariant 12; stalls seed 9).
        started = self.clock.monotonic()
        peers = peers if peers is not None else self.watcher
        if peers is None:
            raise ValueError("step needs a peers view (or a watcher given at construction)")
        if not isinstance(peers, PeersView):
            peers = PeersView.from_watcher(peers, dead_after_s=self.policy.dead_after_s,
                                           grace_s=self.policy.grace_s)
        sick, sick_reason = self._sickness(observer_health, observer_sick)
        idle = self._idle(peers, sick, started)
        if idle is not None:
            decision, g = idle
            self.idle_steps += 1
            self._write_state(decision, g, "")
            return decision
        cut_off = sick  # my own heartbeats failing: my way to the store, maybe my zone, is cut
        if peers.read_failing and not sick:
            # Invariant 8: verdicts built on reads that fail are not evidence.
            sick, sick_reason = True, f"peer reads failing: {peers.read_failing}"
        g = self._gather(peers, sick or peers.observer_fresh, sick)
        if g.errors:
            sick, sick_reason = True, "store failing: " + "; ".join(g.errors)[:300]
        view, api_error = self._view(peers, g, sick)
        decision = decide(view, self.policy)
        if decision.actions and not g.errors:
            view, decision, sick_reason = self._zone_look(view, sick_reason)
        self._decided_mono = started
        dark = set(decision.disrupted_zones)
        if cut_off and peers.zones.get(self.me):
            # My own heartbeats failing: my zone may be dark, and my zone-mates' silence says
            # nothing until I (and they) have been back for a while (stall-zone seed 44).
            # Not for failing reads alone (a flaky store would starve my zone's healing).
            dark.add(peers.zones[self.me])
        for z in dark:
            self._zone_dark_at[z] = self.clock.monotonic()
        if not g.errors and not (decision.freeze is not None
                                 and decision.freeze.scope == "observer"):
            # Only a view this observer may act on is shared: a sick or fresh observer, or
            # one that sees every zone dark (an observer-scope freeze), would hold every
            # observer's healing with it, and no freeze would say so.
            for z in decision.disrupted_zones:
                self._share_dark(z, g.zones_dark.get(z))
        self._record_decision(decision, peers, sick_reason, api_error)
        if not g.errors and not sick:
            for f in decision.forget:
                self._forget(f.member_id, "heal-already-replaced", f.reasons)
            self._clean_departed(peers)
        if not decision.frozen and not g.errors:
            for action in decision.actions:
                if action.dry_run:
                    self._outcome(Outcome(action.member_id, "dry-run"))
                    continue
                try:
                    self._execute(action, view, g, decision.disrupted_zones, peers.endpoints)
                except (StoreError, MalformedRecord) as exc:
                    # Store trouble after the lease was created (the budget or in-flight
                    # record, a lease rewrite) is recorded, never raised: the lease keeps
                    # the last state the store accepted (held/refused/failed expire; acting
                    # clears after acting_ttl_s), and no further action this step.
                    self._lost(action.member_id, f"store-failing during the action: {exc}"[:500],
                               kind="heal-refuse")
                    break
        if not g.errors:  # the lease listing already says whether one is against me
            mine = g.leases.get(self.me)
            self.superseded = mine is not None and mine.supersedes
        self._gathered_mono = started
        self._idle_after = ((decision, g) if self._found_nothing(decision, g, peers, sick)
                            else None)
        self._write_state(decision, g, api_error)
        return decision

    def _idle(self, peers: PeersView, sick: bool,
              now: float) -> tuple[Decision, _Gathered] | None:
        """The last full step's decision and gather, if this step may skip the gather
        (three LISTs and a GET) and decide nothing; else None.

        Only when nothing could be acted on: every member this observer judges is alive
        (or in grace, or leaving), it is not sick, and its last full step, less than
        ``idle_gather_s`` ago, found nothing to do, held nothing and had nothing against
        it (``_found_nothing``), and no lease on it has appeared since. Any stale verdict
        makes the step full, so every action is still decided on a gather of its own
        step (invariant 12). Most steps of most members are idle: the heal step was ~40 %
        of a simulated member's CPU, and its 3 LISTs per member per interval the largest
        S3 bill of a group (issue #11).
        """
        last = self._idle_after
        if last is None or sick or now - self._gathered_mono >= self.idle_gather_s:
            return None
        if peers.read_failing or peers.observer_fresh or peers.departed:
            return None
        if not _all_alive(peers):
            return None
        # A lease on me (one HEAD, a GET's price): an observer is about to act on me, or
        # did. A full step clears it if nothing happened, or steps down (superseded).
        try:
            return last if self.store.head(lease_key(self.group, self.me)) is None else None
        except StoreError:
            return None

    def _found_nothing(self, d: Decision, g: _Gathered, peers: PeersView, sick: bool) -> bool:
        """A full step after which idle steps may follow: every member judged alive (so
        nothing to act on, and a freeze, say the API failing for others' suspects, stops
        nothing); no action, disrupted zone or zone recovering; no store error; not
        paused; none of my suspicions out; no lease on me, none of mine still open. A
        freeze it found stays reported until the next full step (``idle_gather_s``)."""
        if (sick or g.errors or g.paused or d.actions or d.disrupted_zones
                or d.forget or self._zone_dark_at or self._recovering(g)):
            return False
        if any(self.me in obs for obs in g.suspicions.values()):
            return False
        if any(m == self.me or (x.holder == self.me and x.state in OPEN_STATES)
               for m, x in g.leases.items() if x.state != "done"):
            return False
        return _all_alive(peers)

    @property
    def _recovery_s(self) -> float:
        """How long a zone's disrupted judgement is remembered (its recovery grace)."""
        return max(self.policy.dead_after_s, self.policy.silent_after_s)

    def _recovering(self, g: _Gathered) -> bool:
        """Has another observer judged a zone disrupted within the recovery grace?"""
        return any(age < self._recovery_s for age in g.zones_dark.values())

    def _zone_look(self, view: HealView, reason: str) -> tuple[HealView, Decision, str]:
        """Before any action, every record's age from one fresh LIST, and decide again.

        Zones are judged over the whole group, not only over the ``k`` members this
        observer watches (invariant 15, ``decide.zone_stale``). Only when an action is
        decided: one LIST per action, not per step. A LIST that fails: abstain (8).
        """
        try:
            listing = self.store.list(members_prefix(self.group))
        except StoreError as exc:
            view = replace(view, observer_sick=True)
            return view, decide(view, self.policy), f"store failing at the zone look: {exc}"
        ages = {mid: listing.store_now - e.last_modified for e in listing.entries
                if (mid := id_from_key(e.key))}
        view = replace(view, record_stale=stale_records(ages, self.policy.dead_after_s))
        return view, decide(view, self.policy), reason

    def _sickness(self, health: ObserverHealth | ReportsSickness | None,
                  sick: bool | None) -> tuple[bool, str]:
        if sick is not None:
            return bool(sick), "own heartbeat failing" if sick else ""
        if health is None:
            return False, ""
        if isinstance(health, ObserverHealth):
            return health.sick, health.reason
        return bool(health.observer_sick), health.last_error or ""

    # -- gather ---------------------------------------------------------------------------------
    def _gather(self, peers: PeersView, abstain: bool, sick: bool = False) -> _Gathered:
        g = _Gathered()
        try:
            listing = self.store.list(suspicions_prefix(self.group))
            g.store_now, g.store_mono = listing.store_now, self.clock.monotonic()
            self._suspect(peers, listing, abstain)
            g.suspicions = count_suspicions(listing.entries, self.group, listing.store_now,
                                            self.suspicion_ttl_s)
            if not abstain:
                self._read_confirmations(peers, listing, g)
            control = self.store.list(control_prefix(self.group))
            dark = zone_dark_prefix(self.group)
            for e in control.entries:
                if e.key == pause_key(self.group):
                    g.paused = True
                elif e.key == resumed_key(self.group):
                    g.resumed_at = e.last_modified
                elif e.key.startswith(dark):
                    g.zones_dark[e.key[len(dark):]] = max(control.store_now - e.last_modified,
                                                          0.0)
            obj = self.store.get_or_none(budget_key(self.group))
            if obj is not None:
                _, g.budget_used = budget_after(json.loads(obj.body), obj.store_now,
                                                self.policy.window_s)
            self._read_leases(g, peers, sick)
        except (StoreError, MalformedRecord, ValueError) as exc:
            g.errors.append(str(exc))
        return g

    def _suspect(self, peers: PeersView, listing: Listing, abstain: bool) -> None:
        """Keep my suspicion objects true: write the stale ones, delete the cleared ones."""
        mine: dict[str, Entry] = {}
        for e in listing.entries:
            mo = parse_suspicion(e.key, self.group)
            if mo is None:
                continue
            if mo[1] == self.me:
                mine[mo[0]] = e
            elif listing.store_now - e.last_modified > 3 * self.suspicion_ttl_s:
                self._delete_quietly(e.key, e.etag)  # left behind by a crashed observer
        stale = set() if abstain else {
            m for m, v in peers.verdicts.items()
            if _status(v) in STALE_VERDICTS and m != self.me}
        for m in sorted(stale):
            e = mine.get(m)
            if e is None or listing.store_now - e.last_modified > self.suspicion_ttl_s / 2:
                self._write_suspicion(m, peers.verdicts[m])
        for m, e in mine.items():
            if m not in stale:
                self._delete_quietly(e.key, e.etag)

    def _write_suspicion(self, m: str, v: Verdict | str) -> None:
        """My suspicion of ``m``: my verdict (only ``dead`` confirms) and my probe result."""
        body = json.dumps({"observer": self.me, "member": m,
                           "verdict": _status(v),
                           "reason": "" if isinstance(v, str) else v.reason,
                           "probe": self._my_probes.get(m)}).encode()
        self.store.put(suspicion_key(self.group, m, self.me), body,
                       content_type="application/json")

    def _read_confirmations(self, peers: PeersView, listing: Listing, g: _Gathered) -> None:
        """For members I call dead: which other observers say *dead*, and their probes.

        A ``suspect`` record counts towards a mass death, never as a confirmation; each
        confirming observer's own direct probe result comes with it (invariant 14).
        """
        dead = {m for m, v in peers.verdicts.items()
                if _status(v) == "dead" and m != self.me}
        conf: dict[str, set[str]] = {}
        for e in listing.entries:
            mo = parse_suspicion(e.key, self.group)
            if (mo is None or mo[0] not in dead or mo[1] == self.me
                    or listing.store_now - e.last_modified > self.suspicion_ttl_s):
                continue
            obj = self.store.get_or_none(e.key)
            if obj is None:
                continue
            try:
                doc = json.loads(obj.body)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            if doc.get("verdict") == "dead":
                conf.setdefault(mo[0], set()).add(mo[1])
            p = doc.get("probe")
            g.peer_probes.setdefault(mo[0], {})[mo[1]] = p if isinstance(p, bool) else None
        g.confirmations = {m: frozenset(o) for m, o in conf.items()}

    def _delete_quietly(self, key: str, etag: str) -> None:
        try:
            self.store.delete(key, if_match=etag)
        except (PreconditionFailed, NotFound):
            pass

    def _read_leases(self, g: _Gathered, peers: PeersView, sick: bool = False) -> None:
        prefix = leases_prefix(self.group)
        listing = self.store.list(prefix)
        now = listing.store_now
        if now >= g.store_now:
            g.store_now, g.store_mono = now, self.clock.monotonic()
        for e in listing.entries:
            member = e.key[len(prefix):]
            cached = self._lease_cache.get(member)
            if cached is not None and cached.etag == e.etag:
                lease = (cached if cached.last_modified == e.last_modified
                         else replace(cached, last_modified=e.last_modified))
            else:
                obj = self.store.get_or_none(e.key)
                if obj is None:
                    continue
                try:
                    lease = parse_lease(obj.body, obj.etag, obj.last_modified)
                except MalformedRecord as exc:
                    log.warning("ignoring %s: %s", e.key, exc)
                    continue
                self._lease_cache[member] = lease
            if lease.state == "done":
                # Inert, and most of a long run's leases (one per death, kept): never
                # cleared, resolved or maintained, its outcome is "done" (issue #11).
                g.leases[member] = lease
                g.outcomes[member] = "done"
                if member in peers.members and lease.acted and member != self.me:
                    self._forget(member, if_present=True)
                continue
            if self._clear_if_alive(lease, now, peers, sick):
                continue
            if (not sick and lease.state == "acting" and lease.acted_at is None
                    and member != self.me):  # a member never resolves its own lease
                lease = self._resolve_acting(lease, now, peers)
            lease, hb = self._maintain(lease, now, peers)
            g.leases[member] = lease
            g.outcomes[member] = lease_outcome(lease, now, self._deadline_for(lease), hb,
                                               self.lease_expiry_s, self.acting_ttl_s)
            if member in peers.members and lease.acted and member != self.me:
                # Replaced, but its record survived (the delete after the action failed).
                self._forget(member, if_present=True)
        if not sick:
            self._close_old_leases(g, peers, now)
        # Bounded memory: forget leases that are gone from the store, and refusals recorded
        # for members that are neither leased nor in this observer's view any more.
        for m in [m for m in self._lease_cache if m not in g.leases]:
            del self._lease_cache[m]
        for iid, m in list(self._claims.items()):
            if m not in g.leases or claim_released(g.leases[m], iid):
                del self._claims[iid]
        for m in [m for m in self._stuck if m not in g.leases]:
            del self._stuck[m]
        if len(self._recorded) > self._recorded_prune_at:
            # Amortised: a scan each time the map doubles, not each step. Every member that
            # was ever refused stays in view, so a scan a step grew to O(N) per observer:
            # O(N^2) a step group-wide, a 24 h run slowing as it went (issue #11).
            for m in [m for m in self._recorded
                      if m not in g.leases and m not in peers.verdicts
                      and m not in peers.members]:
                del self._recorded[m]
            self._recorded_prune_at = 2 * len(self._recorded) + 64

    def _close_old_leases(self, g: _Gathered, peers: PeersView, now: float) -> None:
        """Move closed leases out of ``leases/`` (``archivable``), so a step stays
        O(recent deaths). One observer does it: the lease's holder, or, when the holder
        is no longer a member, the member with the smallest id. Never while the member
        still has a record: the record must go first (``_forget``)."""
        if not peers.members:  # no view yet: it cannot tell whose record is still there
            return
        todo = [x for x in archivable(g.leases.values(), now, self.archive_after_s)
                if x.member not in peers.members]
        if not todo:
            return
        first: str | None = None
        for lease in todo:
            if lease.holder != self.me:
                if lease.holder in peers.members:
                    continue
                if first is None:
                    first = min(peers.members | {self.me})  # O(N): only when orphaned
                if first != self.me:
                    continue
            try:
                close_lease(self.store, self.group, lease)
            except StoreError as exc:
                log.warning("could not close the lease of %s: %s", lease.member, exc)
                return

    def _clear_if_alive(self, lease: Lease, now: float, peers: PeersView, sick: bool) -> bool:
        """A member that heartbeats again clears a lease through which nothing happened.

        The member itself does it (its own heartbeat works: it is not sick), and so does
        an observer whose own verdict on it is ``alive`` (invariant 13).
        """
        m = lease.member
        verdict = peers.verdicts.get(m)
        alive = (m == self.me and not sick) or _status(verdict) == "alive"
        if not alive or not lease.clearable(now, self.acting_ttl_s):
            return False
        try:
            self.store.delete(lease_key(self.group, m), if_match=lease.etag)
        except (PreconditionFailed, NotFound):
            return False
        self._lease_cache.pop(m, None)
        release_inflight(self.store, self.group, m)
        self._event("heal-lease-cleared", m,
                    [f"{m} heartbeats again; its {lease.state} lease (holder {lease.holder}) "
                     "did nothing"])
        return True

    def _resolve_acting(self, lease: Lease, now: float, peers: PeersView) -> Lease:
        """An ``acting`` lease whose holder vanished mid-call, resolved from what the
        cloud says (``agent.heal.resolve.resolve_acting``): record the action that
        happened, or hand the death back for a takeover with the same token."""
        m = lease.member
        r = resolve_acting(lease.action, lease.age(now), self.lease_expiry_s, None,
                           call_over_s=self.acting_ttl_s)
        if r.verdict == "observe":
            r = resolve_acting(lease.action, lease.age(now), self.lease_expiry_s,
                               self._cloud_says(lease, peers), call_over_s=self.acting_ttl_s)
        if r.verdict == "wait":
            return lease
        if r.verdict == "operator":
            if self._stuck.get(m) != lease.etag:  # once per lease version
                self._event("heal-lease-stuck", m, r.reasons, {"lease": lease.holder})
                self._stuck[m] = lease.etag
            return lease
        detail = f"resolved by {self.me}: {'; '.join(r.reasons)}"[:500]
        if r.verdict == "acted":
            # The action landed after the ``acting`` write that fenced it: the ASG's
            # replacement is no older than that (``_launched_after``).
            since = lease.adopt_since if lease.adopt_since is not None else (
                lease.last_modified if lease.asg else None)
            new = self._rewrite(lease, holder=self.me, state="acted", acted_at=now,
                                adopt_since=since,
                                replacement=r.replacement or lease.replacement,
                                pending_terminate=m if r.terminate else "", detail=detail)
        else:  # retry: nothing happened; taken over (same nonce, same token) like a refusal
            new = self._rewrite(lease, state="refused", detail=detail)
            if new is not None:
                release_inflight(self.store, self.group, m)
        if new is None:
            return lease  # another observer resolved it first
        self._event("heal-lease-resolved", m, r.reasons,
                    {"lease": lease.holder, "state": new.state, "token": lease.token,
                     "replacement": new.replacement})
        return new

    def _cloud_says(self, lease: Lease, peers: PeersView) -> CloudSays:
        m = lease.member
        verdict = peers.verdicts.get(m)
        alive = _status(verdict) == "alive"
        try:
            launched = (launched_for(lease.token, self.cloud.replacements([m]))
                        if lease.action == "launch" else None)
            info = self.cloud.instances([m]).get(m)
            a = self.cloud.asg_instances([m]).get(m) if lease.asg else None
        except CloudError as exc:
            return CloudSays(api_error=str(exc), member_alive=alive)
        return CloudSays(launched=launched, member_ec2=info.state if info else None,
                         in_asg=(a is not None) if lease.asg else None,
                         asg_health=a.health if a else None, member_alive=alive)

    def _launched_after(self, ids: set[str], lease: Lease, others: int, peers: PeersView,
                        now: float) -> str | None:
        """The ASG's replacement for this lease's action among ``ids`` (in the group now,
        not before the action, no other lease's), ``resolve.asg_replacement``: the
        earliest launched no earlier than the action landed, give or take
        ``ADOPT_SLACK_S``; with launches owed to ``others`` too (members gone from the
        group since), one that heartbeats once enough do (stall-zone seed 85); "" when
        there is none yet, None when EC2 cannot tell. Not merely "new since ``asg_before``": a
        terminate stalled in transit (95-106 s, chaos seed 17 at N = 30 and seed 113 at
        N = 12) let the ASG launch an instance for another member meanwhile; adopted, it
        closed this lease ``done`` and freed its in-flight slot early, and the group went
        over its in-flight cap."""
        if not ids or lease.acted_at is None:
            return ""
        try:
            infos = self.cloud.instances(ids)
        except CloudError:
            return None
        since = (lease.adopt_since if lease.adopt_since is not None  # a resolver's
                 else lease.acted_at - ADOPT_SLACK_S)  # the holder's
        launched = [(i.launch_time, i.instance_id) for i in infos.values()
                    if i.launch_time is not None]
        beating = ({iid for _, iid in launched if self._heartbeated(iid, peers)}
                   if others else set())
        settle = is_failed_replacement(lease.acted_at, now, self.replace_deadline_s, False)
        return asg_replacement(launched, since, others, beating, settle)

    def _heartbeated(self, rid: str, peers: PeersView) -> bool | None:
        if not rid:
            return False
        if rid in peers.members and rid != self.me:
            return True  # its record was listed or read: a heartbeat landed
        # My own roster always has me, heartbeat or not: a replacement whose first beat
        # has not landed (a slow PUT, a cut zone) is not yet "done" (everything seed 5,
        # N = 9: marked done on its first step while that PUT was in flight, so a second
        # replacement started while the first was in flight).
        try:
            return self.store.head(member_key(self.group, rid)) is not None
        except StoreError:
            return None

    def _deadline_for(self, lease: Lease) -> float:
        """The replacement's deadline as this observer applies it. Only the holder adopts
        an ASG action's replacement, and with launches owed to other members it may adopt
        only at the deadline (``resolve.asg_replacement``'s ``settle``); another observer
        stepping first at that instant failed the lease instead, with its replacement
        heartbeating. At N = 1,000 (``everything``, seed 1) most windows owe launches to
        others and this failed one ASG action in three: three "failed" replacements that
        had all heartbeated froze the group (unjustified-freeze at 1,389 s, session 14).
        Others fail such a lease ``lease_expiry_s`` after the deadline: the holder first."""
        if lease.asg and not lease.replacement and lease.holder != self.me:
            return self.replace_deadline_s + self.lease_expiry_s
        return self.replace_deadline_s

    def _holders_turn_over(self, lease: Lease, now: float) -> bool:
        """Past the holder's grace (``_deadline_for``) another observer adopts the ASG's
        replacement itself rather than failing the lease unseen: its holder may be gone
        (a spot interruption) or blind (an API outage) while the replacement heartbeats."""
        return lease.acted_at is not None and is_failed_replacement(
            lease.acted_at, now, self._deadline_for(lease), False)

    def _asg_replacement_of(self, lease: Lease, peers: PeersView, now: float) -> str | None:
        """``_launched_after`` among the ASG's instances new since the action's snapshot and
        no other lease's; None when the group or EC2 cannot be read. A failed read used to
        count as "nothing launched": an API outage from 7 s after three ASG actions to
        past their deadline (chaos seed 7009, N = 47, session 15's soak) failed all three
        leases while each replacement heartbeated, and the group froze on
        ``failed-replacements: 3`` (42 unjustified freezes)."""
        try:
            current = set(self.cloud.asg_member_ids(lease.asg))
        except CloudError:
            return None
        taken = {x.replacement for x in self._lease_cache.values() if x.replacement}
        claimed = {x.member for x in self._lease_cache.values() if x.replacement}
        for iid, owner in self._claims.items():
            if owner != lease.member:
                taken.add(iid)
                claimed.add(owner)
        others = set(lease.asg_before) - current - claimed - {lease.member}
        return self._launched_after(current - set(lease.asg_before) - taken - {lease.member},
                                    lease, len(others), peers, now)

    def _claim(self, lease: Lease, iid: str) -> bool | None:
        """Claim the launch ``iid`` for ``lease`` before the lease names it: True when the
        claim is this member's (made now, or earlier by any observer of this member's
        lease); False when it is another lease's, remembered so the next pick passes it
        by; None when the store cannot tell. The launches an observer counted as taken
        came from its own lease cache alone: a lease listed after the one it maintains is
        not read yet, and two observers stepping at once see neither adoption, so two
        leases adopted the same launch (a28 for 4b9 and 36f, session 19's 24 h run)."""
        try:
            if claim_launch(self.store, self.group, iid, lease):
                return True
            held = launch_claimant(self.store, self.group, iid)
            if held is None:
                return None  # deleted since it was refused: claimed afresh next step
            owner, etag = held
            if owner == lease.member:
                return True
            # Its lease as the store has it now: a cached copy may be an earlier life of
            # that lease (refused, no replacement), which let go of nothing (chaos seed
            # 2100, N = 96: taken over from a lease that had just named the launch).
            other = read_lease_anywhere(self.store, self.group, owner) if owner else None
            if other is None or claim_released(other, iid):
                return claim_launch(self.store, self.group, iid, lease, over=etag) or None
        except StoreError as exc:
            log.warning("cannot claim %s for %s: %s", iid, lease.member, exc)
            return None
        except MalformedRecord as exc:
            log.warning("cannot tell whose launch %s is: %s", iid, exc)
            return None
        self._claims[iid] = owner
        return False

    def _maintain(self, lease: Lease, now: float, peers: PeersView) -> tuple[Lease, bool | None]:
        """Move an open lease along: adopt the ASG's replacement, then done or failed.

        Returns the lease and whether its replacement heartbeats (None: cannot tell, or
        the store refused a write because the lease moved on since it was read).
        """
        if lease.state not in OPEN_STATES:
            return lease, False
        if lease.state == "acted" and lease.pending_terminate and lease.holder == self.me:
            lease = self._retry_terminate(lease, self._probe_at(
                lease.member, peers.verdicts, peers.zones, peers.endpoints))
        if (lease.state == "acted" and not lease.replacement and lease.asg
                and (lease.holder == self.me or self._holders_turn_over(lease, now))):
            new = self._asg_replacement_of(lease, peers, now)
            if new is None:
                return lease, None  # neither done nor failed: EC2 cannot tell which it is
            if new:
                if not self._claim(lease, new):
                    return lease, None  # another lease's launch, or the store cannot tell
                adopted = self._rewrite(lease, replacement=new)
                if adopted is None:
                    # not judged without the replacement another observer may have written
                    return lease, None
                lease = adopted
        hb = self._heartbeated(lease.replacement, peers)
        if hb is None:
            return lease, None
        out = lease_outcome(lease, now, self._deadline_for(lease), hb)
        if out in ("done", "failed"):
            updated = self._rewrite(lease, state=out)
            if updated is not None:
                release_inflight(self.store, self.group, lease.member)
                kind = "heal-replaced" if out == "done" else "heal-replacement-failed"
                why = (f"replacement {lease.replacement} heartbeats" if out == "done" else
                       f"no heartbeat from {lease.replacement or 'a replacement'} within "
                       f"{self.replace_deadline_s:g}s")
                self._event(kind, lease.member, [why], {"lease": lease.holder,
                                                        "replacement": lease.replacement})
                return updated, hb
            # The store refused the verdict: the lease moved on since it was read (another
            # observer closed it). Not counted either way until the next step reads it:
            # everything seed 1 at N = 1,000 (42,254.8 s), an observer 0.04 s behind two
            # others that adopted and closed four leases `done` counted its refused
            # `failed`s and froze a healthy group (failed-replacements: 3; 25
            # unjustified-freeze). Those verdicts came after an adoption that lost (seed
            # refused-api-outage-102): the lease was judged without its replacement.
            return lease, None
        return lease, hb

    def _rewrite_mine(self, lease: Lease, **changes: Any) -> Lease | None:
        """``_rewrite`` a lease through which nothing happened; if its ETag is stale because
        my own last write landed with its answer lost (flaky-store seed 147: the fence's
        ``acting`` write), once more on the store's copy, if that is still my lease life
        (same holder and nonce) and nothing acted. Else it would stay ``acting`` for ever,
        never taken over, and the member's real death never replaced."""
        done = self._rewrite(lease, **changes)
        if done is not None:
            return done
        try:
            cur = read_lease(self.store, self.group, lease.member)
        except (StoreError, MalformedRecord):
            return None
        if cur is None or cur.holder != self.me or cur.nonce != lease.nonce or cur.acted:
            return None
        return self._rewrite(cur, **changes)

    def _rewrite(self, lease: Lease, **changes: Any) -> Lease | None:
        new = replace(lease, **changes)
        try:
            etag = self.store.put(lease_key(self.group, lease.member), new.body(),
                                  if_match=lease.etag, content_type="application/json")
        except (PreconditionFailed, NotFound):
            self._lease_cache.pop(lease.member, None)
            return None
        new = replace(new, etag=etag)
        self._lease_cache[lease.member] = new
        return new

    # -- view -----------------------------------------------------------------------------------
    def _view(self, peers: PeersView, g: _Gathered, sick: bool) -> tuple[HealView, str]:
        verdicts = {m: _status(v) for m, v in peers.verdicts.items()}
        now = self.clock.monotonic()
        keep = self._recovery_s
        self._zone_dark_at = {z: t for z, t in self._zone_dark_at.items() if now - t < keep}
        dark_for = {z: now - t for z, t in self._zone_dark_at.items()}
        for z, age in g.zones_dark.items():  # others' judgements (``_share_dark``)
            since = age + max(now - g.store_mono, 0.0)
            if since < keep:
                dark_for[z] = min(dark_for.get(z, since), since)
        judged, silent_for = silence_since_lit(verdicts, peers.silent_for, peers.zones,
                                               dark_for, self.policy.dead_after_s)
        verdicts = dict(judged)
        for m, obs in g.suspicions.items():
            # Others' fresh suspicions of members I do not watch: I cannot call them dead,
            # but they count towards a mass death.
            if m not in verdicts and m != self.me and obs and m not in peers.departed:
                verdicts[m] = "suspect"
        dead = sorted(m for m, s in verdicts.items() if s == "dead" and m != self.me)
        # Leased: a lease nobody may take over yet (refused, expired held, and failed-
        # before-acting ones may be: the member is a candidate again, invariant 13).
        leased = frozenset(m for m, lease in g.leases.items()  # a done lease never is
                           if lease.state == "done"
                           or not lease.takeover_allowed(g.store_now, self.lease_expiry_s))
        ec2: dict[str, str | None] = {}
        asg: dict[str, str | None] = {}
        asg_of: dict[str, str] = {}
        probe: dict[str, bool | None] = {}
        replaced_by: dict[str, str] = {}
        api_error = ""
        candidates = [m for m in dead if m not in leased]
        # Every stale member is looked up (one call): one the ASG already replaced is
        # then neither a death nor part of a mass death, even when only suspected (15).
        asked = sorted({*candidates, *(m for m, s in verdicts.items()
                                       if s == "suspect" and m not in leased)})
        if asked and not sick and not g.paused:
            ec2, asg_of, api_error = self._ec2_view(asked)
            if not api_error:
                try:
                    asg = {m: a.health for m, a in self.cloud.asg_instances(asked).items()}
                except CloudError as exc:
                    api_error = str(exc)
            gone = sorted(m for m in asked if ec2.get(m) in ("terminated", "shutting-down")
                          and not (asg_of.get(m) and m not in asg))
            if gone and not api_error:
                # A standalone group's replacement names its member in a tag (15).
                try:
                    found = self.cloud.replacements(gone)
                except CloudError as exc:
                    api_error = str(exc)
                else:
                    replaced_by = {m: r for m in gone if (r := newer_member(m, found))}
            for m in candidates:
                # Whatever EC2 says: an answer from the member itself vetoes (14).
                probe[m] = self.probe(peers.endpoints.get(m, ""))
                self._my_probes[m] = probe[m]
                try:
                    self._write_suspicion(m, peers.verdicts[m])
                except StoreError as exc:
                    log.warning("cannot record my probe of %s: %s", m, exc)
        for m in list(self._my_probes):
            if m not in candidates:
                self._my_probes.pop(m, None)
        in_flight = countOf(g.outcomes.values(), "in-flight")
        zones = peers.zones  # HealView keeps its own frozen copy (none for a FrozenMap)
        # A member replaced through a lease, with its replacement in the roster too, is one
        # member until this watcher sees its record go: counted twice, it raised the group's
        # in-flight cap (chaos seed 4 at N = 30: 30 records for 29 members, cap 3 for 2).
        doubled = sum(1 for x, lease in g.leases.items() if lease.supersedes
                      and x in peers.members and lease.replacement in peers.members)
        view = HealView(
            observer_id=self.me, group_size=max(peers.group_size - doubled, 1),
            verdicts=verdicts,
            suspicions=g.suspicions, ec2_state=ec2, asg_health=asg, probe_ok=probe,
            silent_for=silent_for, leases=leased, in_flight=in_flight,
            budget=g.budget_used,
            consecutive_failures=streak(g.leases.values(), g.outcomes, g.resumed_at),
            observer_sick=sick, observer_fresh=peers.observer_fresh, paused=g.paused,
            api_healthy=not api_error, now=g.store_now,
            confirmations=g.confirmations, peer_probes=g.peer_probes, zones=zones,
            asg_of=asg_of, in_asg=frozenset(asg), replaced_by=replaced_by)
        return view, api_error

    def _ec2_view(self, ids: list[str]) -> tuple[dict[str, str | None], dict[str, str], str]:
        """EC2's state per id, with "not found" unknown until it persists (invariant 14)."""
        try:
            found = self.cloud.instances(ids)
        except CloudError as exc:
            return {i: None for i in ids}, {}, str(exc)
        now = self.clock.monotonic()
        states: dict[str, str | None] = {}
        for i in ids:
            info = found.get(i)
            if info is not None:
                self._missing.pop(i, None)
                states[i] = info.state
                continue
            first, reads = self._missing.get(i, (now, 0))
            self._missing[i] = (first, reads + 1)
            states[i] = not_found_belief(first, now, reads + 1, self.not_found_persist_s)
        for i in list(self._missing):
            if i not in ids:
                self._missing.pop(i)  # not asked this time: the persistence starts over
        asg_of = {i: f.asg for i, f in found.items() if f.asg}
        mine = self._own_asg()
        if mine:
            # EC2 keeps the aws:autoscaling:groupName tag on terminated instances; moto
            # drops it when the ASG terminates one. A member of a group whose observers
            # run in an ASG was that ASG's.
            for i in ids:
                if i in found and i not in asg_of:
                    asg_of[i] = mine
        return states, asg_of, ""

    def _own_asg(self) -> str:
        """The Auto Scaling group this observer runs in ("" for none; asked once)."""
        if self._my_asg is None:
            try:
                a = self.cloud.asg_instances([self.me]).get(self.me)
            except CloudError:
                return ""  # ask again next time
            self._my_asg = a.group if a is not None else ""
        return self._my_asg

    # -- execute --------------------------------------------------------------------------------
    def _execute(self, action: Action, view: HealView, g: _Gathered,
                 disrupted: tuple[str, ...] = (),
                 endpoints: Mapping[str, str] | None = None) -> None:
        m = action.member_id
        lease = self._take_lease(action, g)
        if lease is None:
            return
        open_members = {x for x, o in g.outcomes.items() if o == "in-flight"} | {m}
        try:
            ok, why = take_inflight(self.store, self.group, m,
                                    cap=self.policy.in_flight_cap(view.group_size),
                                    open_members=open_members, expiry_s=self.lease_expiry_s,
                                    store_now=g.store_now)
        except (StoreError, MalformedRecord) as exc:
            ok, why = False, f"store-failing at the in-flight count: {exc}"
        if not ok:
            return self._refuse_lease(lease, why)
        ok, why = take_budget(self.store, self.group, window_s=self.policy.window_s,
                              max_per_window=self.policy.max_per_window, store_now=g.store_now)
        if not ok:
            return self._refuse_lease(lease, why)
        g.budget_used += 1
        spent_at = g.store_now
        try:
            fresh_info = self.cloud.instances([m])
            err = ""
        except CloudError as exc:
            fresh_info, err = {}, str(exc)
        fresh: str | None = fresh_info[m].state if m in fresh_info else None
        if not err and fresh is None:
            fresh = view.ec2_state.get(m)  # still missing: the persisted belief stands
        health = None
        if not err:
            try:
                a = self.cloud.asg_instances([m]).get(m)
                health = a.health if a else None
            except CloudError as exc:
                err = str(exc)
        why = f"api-failing at the second look: {err}" if err else ec2_still_agrees(
            view.ec2_state.get(m), fresh, health)
        if not why and m in fresh_info and fresh_info[m].az in disrupted:
            why = f"zone-disrupted: {fresh_info[m].az} at the second look"
        if not why and endpoints is not None:
            why = self._zone_unlit(m, view, endpoints)
        if why:
            self._give_back(g, spent_at)
            return self._refuse_lease(lease, why)
        try:
            lease, detail = self._act(action.kind, lease, fresh, g, fresh_info.get(m),
                                      probe_at=self._probe_at(m, view.verdicts, view.zones,
                                                              endpoints or {}))
        except _Fenced as f:
            # Raised only before the action's first mutating call: nothing happened.
            self._give_back(g, spent_at)
            return self._refuse_lease(f.lease or lease, f.why, kind="heal-fenced")
        except _Unsure as exc:
            # It may have happened: the lease stays ``acting`` (the fence's write) and its
            # in-flight slot stays taken until a resolver sees what the cloud did
            # (``_resolve_acting``: acted once seen, retried once no call can still land).
            # Marked failed, the slot went to the next death while the lost call's
            # replacement booted: two in flight, cap 1 (control-plane-2007 seed 13).
            self._event("heal-action-failed", m, [*action.reasons, str(exc)],
                        {"action": action.kind, "outcome": "unknown"})
            self._outcome(Outcome(m, "failed", f"outcome unknown: {exc}"))
            return
        except AgentError as exc:
            # Nothing happened (acted_at stays None): not "you were replaced", and the
            # lease may be taken over once it expires (invariant 13).
            lease = self._lease_cache.get(m, lease)  # as the fence last wrote it
            self._rewrite_mine(lease, state="failed", detail=str(exc)[:500])
            release_inflight(self.store, self.group, m)
            self._event("heal-action-failed", m, [*action.reasons, str(exc)],
                        {"action": action.kind})
            self._outcome(Outcome(m, "failed", str(exc)))
            return
        self._event("heal-action", m, action.reasons,
                    {"action": action.kind, "detail": detail, "token": lease.token,
                     "replacement": lease.replacement})
        self._recorded[m] = dedupe_key("heal-action", action.reasons)
        self._outcome(Outcome(m, "acted", detail, lease.replacement))
        if lease.state == "acted":
            self._forget(m)

    def _zone_unlit(self, m: str, view: HealView, endpoints: Mapping[str, str]) -> str:
        """Is the target's zone lit right now? "" if so, or if nobody can tell; else why not.

        A zone that went dark seconds ago still looks lit in every record (they age
        ``dead_after_s`` before the zone rule can see it), and a member that stalled
        just before is acted on in the dark (session 7's 24 h run, stall-zone seed 10).
        So, only when about to act: probe up to two other members of the target's zone
        whose records are fresh; one answer is a lit zone. If none answers, an answer from
        one of two members elsewhere tells a dark zone from probes that reach nobody
        (a blocked port, invariant 14: no evidence either way, the records decide). A
        dark zone is judged disrupted: nothing in it is acted on, and its recovery grace
        (``silence_since_lit``) starts. An endpoint the roster lacks (it knows those of
        the members it watched) is read from the member's record (seeds 86, 342).
        """
        zone = view.zones.get(m, "")
        if not zone or view.zones.get(self.me) == zone:
            return ""  # my own zone reaches the store: I just read it
        lit = [x for x in sorted(view.zones) if x not in (m, self.me)
               and x not in view.record_stale and view.verdicts.get(x) not in STALE_VERDICTS]
        here = self._endpoints([x for x in lit if view.zones[x] == zone], endpoints)
        if not here:
            return ""  # nobody else there to ask: the zone rule has judged it already
        if any(self.probe(ep) for ep in here.values()):
            return ""
        elsewhere = self._endpoints([x for x in lit if view.zones[x] != zone], endpoints)
        answered = next((x for x, ep in elsewhere.items() if self.probe(ep)), None)
        if answered is None:
            return ""  # probes reach nobody: they tell nothing here
        self._zone_dark_at[zone] = self.clock.monotonic()
        self._share_dark(zone, None)
        return (f"zone-unlit: {zone}: none of {', '.join(here)} answered a probe, "
                f"{answered} elsewhere did")

    def _share_dark(self, zone: str, age: float | None) -> None:
        """Tell the group that ``zone`` is disrupted now (``control/zone-dark/<zone>``):
        its LastModified is the last such judgement by anyone, so every observer counts the
        zone's silence from it (``_view``), not only the observers that judged it.

        The recovery grace used to be each observer's own memory. An observer whose own zone
        was dark at the same time (or that started later) never judged the other zone;
        back, it saw a member silent through that outage, able for 0.3 s once the lights
        came back and stopped, its record ~490 s old and its zone-mates fresh, and
        terminated it 81 s after it was last up (stall-zone seed 332). Rewritten at most
        every ``dead_after_s / 3`` (``age``: the marker's store age at this step's LIST,
        None to write at once); a failed write is only logged: this observer's own memory
        holds the zone anyway.
        """
        if age is not None and age < self.policy.dead_after_s / 3:
            return
        body = json.dumps({"zone": zone, "by": self.me}).encode()
        try:
            self.store.put(zone_dark_key(self.group, zone), body,
                           content_type="application/json")
        except StoreError as exc:
            log.warning("could not share that zone %s is disrupted: %s", zone, exc)

    def _endpoints(self, members: list[str], known: Mapping[str, str],
                   want: int = 2, tries: int = 4) -> dict[str, str]:
        """Up to ``want`` of ``members`` with their endpoints: the roster's, else their
        records' (at most ``tries`` records read; a record that fails to read is skipped)."""
        out: dict[str, str] = {}
        for x in members:
            if len(out) == want:
                break
            ep = known.get(x, "")
            if not ep and tries > 0:
                tries -= 1
                try:
                    obj = self.store.get_or_none(member_key(self.group, x))
                    ep = MemberRecord.loads(obj.body).endpoint if obj is not None else ""
                except (StoreError, MalformedRecord):
                    ep = ""
            if ep:
                out[x] = ep
        return out

    def _take_lease(self, action: Action, g: _Gathered) -> Lease | None:
        m = action.member_id
        nonce = secrets.token_hex(8)
        # The token names the death, not this generation of the lease: a takeover keeps
        # it (below), so one death never gets two RunInstances tokens (invariant 1).
        lease = Lease(m, self.me, action.kind, "held", reasons=action.reasons, nonce=nonce,
                      token=death_token(self.group, m, nonce))
        key = lease_key(self.group, m)
        try:
            etag = self.store.create(key, lease.body(), content_type="application/json")
        except PreconditionFailed:
            try:
                cur = read_lease(self.store, self.group, m)
            except (StoreError, MalformedRecord) as exc:
                self._lost(m, f"lease exists and is unreadable: {exc}")
                return None
            if cur is None or not cur.takeover_allowed(g.store_now, self.lease_expiry_s):
                self._lost(m, f"lease held by {cur.holder if cur else '?'} "
                              f"({cur.state if cur else 'gone'})")
                return None
            if cur.nonce:  # the same death: its first generation's nonce and token
                lease = replace(lease, nonce=cur.nonce,
                                token=cur.token or death_token(self.group, m, cur.nonce))
            try:  # nothing happened through it: take it over, by compare-and-swap
                etag = self.store.put(key, lease.body(), if_match=cur.etag,
                                      content_type="application/json")
            except (PreconditionFailed, NotFound):
                self._lost(m, f"lost the takeover of a {cur.state} lease")
                return None
            self._event("heal-lease-takeover", m,
                        [f"{cur.state} lease of {cur.holder} did nothing: taken over"])
        except StoreError as exc:
            self._lost(m, f"cannot create the lease: {exc}", kind="heal-refuse")
            return None
        lease = replace(lease, etag=etag)
        try:  # taken after an old lease of it was closed: it was replaced then
            closed = read_closed_lease(self.store, self.group, m)
        except (StoreError, MalformedRecord) as exc:
            self._refuse_lease(lease, f"store-failing at the closed lease: {exc}")
            return None
        if closed is not None and closed.acted:
            self._delete_quietly(key, lease.etag)
            self._forget(m, if_present=True)
            self._event("heal-already-replaced", m,
                        [f"replaced through a closed lease ({closed.state}, holder "
                         f"{closed.holder})"])
            return None
        return lease

    def _fence(self, lease: Lease, what: str, *, probe_at: _ProbeAt = _ProbeAt(),
               check_age: bool = True) -> Lease:
        """Invariant 12, right before a mutating cloud call; raises ``_Fenced`` to abort.

        The decision is young enough; the lease moves forward with a conditional write
        (``acting`` before the first call), so an observer that stalled wakes up
        harmless: another observer or the member itself changed it; then, last, with no
        write between it and the call, the kill switch is absent, the member's record
        shows no fresh heartbeat (nor a leave), the member does not answer a probe
        (``_probe_at_fence``) and the decision is still young enough. The look used to
        come before the lease write: a write that stalled 2.5 s let a member resumed
        meanwhile be terminated (stalls seed 10).
        """
        m = lease.member
        if check_age:
            self._check_decision_age(what, lease)
        state = lease.state if lease.acted else "acting"
        try:
            moved = self._rewrite(lease, state=state, detail=f"fenced before {what}")
        except StoreError as exc:
            # Before the call, so nothing happened: refused (taken over at once), not
            # failed (which waits lease_expiry_s: flaky-store seed 147 left a death 120 s
            # longer unreplaced). A write that landed with its answer lost is the refusal's
            # to handle (``_rewrite_mine``).
            raise _Fenced(f"store-failing at the fence before {what}: {exc}", lease) from exc
        if moved is None:
            raise _Fenced(f"lost-race: the lease changed before {what}", None)
        if check_age:  # again: the lease write may have stalled
            self._check_decision_age(what, moved)
        try:
            if self.store.head(pause_key(self.group)) is not None:
                raise _Fenced(f"paused: kill switch present at the last look before {what}",
                              moved)
            rec = self.store.get_or_none(member_key(self.group, m))
        except StoreError as exc:
            raise _Fenced(f"store-failing at the last look before {what}: {exc}",
                          moved) from exc
        record: MemberRecord | None = None
        if rec is not None:
            rec_age = rec.store_now - rec.last_modified
            if rec_age < self.policy.dead_after_s:
                raise _Fenced(f"fresh-heartbeat: {m}'s record is {rec_age:.0f}s old at the "
                              f"last look before {what}", moved)
            try:
                record = MemberRecord.loads(rec.body)
            except MalformedRecord:
                record = None
            if record is not None and record.state in DEPARTING_STATES:
                raise _Fenced(f"{m}'s record says {record.state} at the last look before "
                              f"{what}", moved)
        # The record's endpoint, else the roster's (a member whose record is gone)
        endpoint = (record.endpoint if record is not None else "") or probe_at.member
        if endpoint:
            self._probe_at_fence(m, replace(probe_at, member=endpoint), what, moved, check_age)
        if check_age:  # and last: the look's own reads may have stalled (chaos seed 29)
            self._check_decision_age(what, moved)
        return moved

    def _probe_at_fence(self, m: str, at: _ProbeAt, what: str, lease: Lease,
                        check_age: bool) -> None:
        """The member's own endpoint, asked once more: an agent that resumed since the
        decision (a SIGSTOP, a long GC pause) answers at once, before its first heartbeat
        lands (session 12's 24 h run, N = 1,000, at 20,460.6 s: back 0.6 s, terminated).
        The probe waits at most 80 % of what is left of the decision's age, so a member
        that does not answer still leaves the decision young enough to act on (a full 2 s
        wait outlived a 3 s ``decision_max_age_s`` and fenced every attempt).

        Silence vetoes nothing only if this observer's probes reach anyone: when the
        member is silent, the controls (peers it judges alive) are asked too, and if none
        answers the probe was blind, as a prober cut off from its peers is (Lifeguard's
        lesson: the prober may be the one at fault). Part-zone seed 7008, N = 40: 23, cut
        off from its peers, probed 17 (stopped 115 s) in vain; 17 resumed 0.5 s into the
        probe and was terminated 1.5 s later. Without controls (no peer judged alive with
        a known endpoint) silence tells nothing either way, as before.

        The member is asked last: when a control was silent too (its whole timeout), the
        member is asked once more, as it may have come back meanwhile. Chaos seed 7066
        (N = 39): 1f, crashed, did not answer; the first control's probe took 2 s, 1f
        restarted in it and was terminated 2.9 s after it was up again."""
        timeout = self._fence_probe_timeout(check_age)
        if timeout <= 0:
            return
        if self.probe(at.member, timeout_s=timeout):
            raise _Fenced(f"probe-ok: {m} answers at the last look before {what}", lease)
        if not at.controls:
            return
        asked = self.clock.monotonic()
        for ep in at.controls:
            timeout = self._fence_probe_timeout(check_age)
            if timeout > 0 and self.probe(ep, timeout_s=timeout):
                break
        else:
            raise _Fenced(f"probe-blind: neither {m} nor any of {len(at.controls)} peer(s) "
                          f"judged alive answered a probe at the last look before {what}: "
                          "silence from an observer whose probes reach nobody tells nothing",
                          lease)
        if self.clock.monotonic() - asked < FENCE_REPROBE_AFTER_S:
            return  # a control answered at once: no time for the member to come back
        timeout = self._fence_probe_timeout(check_age)
        if timeout > 0 and self.probe(at.member, timeout_s=timeout):
            raise _Fenced(f"probe-ok: {m} answers at the last look before {what} (asked "
                          "again after a silent control)", lease)

    def _fence_probe_timeout(self, check_age: bool) -> float:
        """A fence probe's timeout: ``PROBE_TIMEOUT_S``, at most 80 % of what is left of the
        decision's age when the age is checked."""
        if not check_age:
            return PROBE_TIMEOUT_S
        left = self.decision_max_age_s - (self.clock.monotonic() - self._decided_mono)
        return min(PROBE_TIMEOUT_S, FENCE_PROBE_SHARE * left)

    def _probe_at(self, m: str, verdicts: Mapping[str, Verdict | str],
                  zones: Mapping[str, str], endpoints: Mapping[str, str]) -> _ProbeAt:
        """The fence's probes of ``m``: its roster endpoint, and up to two controls, peers
        this observer itself judges alive whose endpoints it knows, ``m``'s zone first
        (the path most like ``m``'s own)."""
        zone = zones.get(m, "")
        alive = sorted((zones.get(x, "") != zone, x) for x, v in verdicts.items()
                       if x not in (m, self.me) and _status(v) == "alive" and endpoints.get(x))
        return _ProbeAt(endpoints.get(m, ""), tuple(endpoints[x] for _, x in alive[:2]))

    def _check_decision_age(self, what: str, lease: Lease) -> None:
        age = self.clock.monotonic() - self._decided_mono
        if age > self.decision_max_age_s:
            raise _Fenced(f"stale-decision: {age:.1f}s old > {self.decision_max_age_s:g}s "
                          f"before {what}", lease)

    def _give_back(self, g: _Gathered, spent_at: float) -> None:
        """Return the budget unit of an attempt refused before it did anything (best effort:
        a unit not returned stays spent, which only delays a later replacement)."""
        try:
            if give_back_budget(self.store, self.group, window_s=self.policy.window_s,
                                taken_at=spent_at, store_now=g.store_now):
                g.budget_used -= 1
        except (StoreError, MalformedRecord) as exc:
            log.warning("could not give back the budget unit of a refused attempt: %s", exc)

    def _refuse_lease(self, lease: Lease, why: str, kind: str = "heal-refuse") -> None:
        if lease.etag:
            self._rewrite_mine(lease, state="refused", detail=why)
        release_inflight(self.store, self.group, lease.member)
        self._event(kind, lease.member, [why], {"lease": "refused (may be taken over)"})
        self._outcome(Outcome(lease.member, "refused", why))

    def _lost(self, m: str, why: str, kind: str = "heal-lease-lost") -> None:
        self._event(kind, m, [why])
        self._outcome(Outcome(m, "lost", why))

    def _store_clock(self, g: _Gathered) -> float:
        """The store's clock now, never earlier than it: the step's last reading (a
        ``Date``, whole seconds, so +1 s) and the monotonic time since."""
        return g.store_now + 1.0 + max(0.0, self.clock.monotonic() - g.store_mono)

    def _act(self, kind: str, lease: Lease, ec2_state: str | None, g: _Gathered,
             info: InstanceInfo | None = None, *,
             probe_at: _ProbeAt = _ProbeAt()) -> tuple[Lease, str]:
        """Do ``kind`` to the lease's member, fenced. ``acted_at`` is the store's clock
        after the call, not the step's reading before the probes and the call: the
        replacement's deadline and the in-flight slot count from the action (seed 695:
        a slot freed 2.6 s early let a second replacement start while one was in flight)."""
        m = lease.member
        now = g.store_now
        changes: dict[str, Any] = {"state": "acted"}
        a = None
        if kind in ("asg-mark", "asg-terminate", "launch"):
            a = self.cloud.asg_instances([m]).get(m)
        if kind == "launch" and a is not None:
            # Launching beside an ASG member double-replaces: its ASG launches its own
            # after the terminate. ASG members are replaced through the ASG.
            kind = "asg-terminate"
            changes["detail"] = "launch asked for an ASG member: asg-terminate instead"
        if kind in ("asg-mark", "asg-terminate"):
            if a is None:
                raise CloudError(f"{m} is not in an Auto Scaling group: {kind} cannot replace it")
            changes.update(asg=a.group, asg_before=tuple(self.cloud.asg_member_ids(a.group)))
            # Written with the fence's ``acting``, so whoever resolves a lease its
            # holder left acting knows the action and can find the ASG's replacement.
            lease = replace(lease, action=kind, asg=a.group, asg_before=changes["asg_before"])
            if kind == "asg-mark":
                left = self.cloud.asg_grace_left(a.group, info.launch_time if info else None,
                                                 now)
                if left > 0:
                    raise _Fenced(f"asg-grace: {a.group}'s health check grace period has "
                                  f"{left:.0f}s left; AWS would ignore the mark", lease)
                lease = self._fence(lease, "SetInstanceHealth", probe_at=probe_at)
                self._landing(self.cloud.set_unhealthy, m, respect_grace=True)
                detail = f"marked Unhealthy in {a.group}"
            elif ec2_state == "terminated" and info is not None:
                # EC2 itself answered "terminated": its ASG replaces it, nothing to do. A
                # belief from a persisted "not found" (invariant 14) is no such answer (the
                # ASG still lists it): writing ``acted`` with nothing done would exile a
                # member EC2 merely lost track of (item 2), so it is terminated, fenced.
                detail = f"already terminated: {a.group} replaces it"
            else:
                lease = self._fence(lease, "TerminateInstanceInAutoScalingGroup",
                                    probe_at=probe_at)
                activity = self._landing(self.cloud.asg_terminate, m)
                detail = f"terminated in {a.group} without decrement (activity {activity})"
            if changes.get("detail"):
                detail = f"{changes['detail']}; {detail}"
        elif kind == "launch":
            # A launch beside a member EC2 says is terminated harms no one: its silence
            # needs no control (a blocked port does not stop replacing the gone).
            at = probe_at if ec2_state != "terminated" else replace(probe_at, controls=())
            # An earlier generation of this lease may have launched already (its
            # response lost, its holder gone): the same token finds that instance.
            found = launched_for(lease.token, self.cloud.replacements([m]))
            if found:
                lease = self._fence(lease, f"adopting {found}", probe_at=at)
                new = found
                detail = f"adopted {new}: launched earlier for this death (same token)"
            else:
                spec = self.cloud.launch_spec(m)
                lease = self._fence(lease, "RunInstances", probe_at=at)
                new = self._landing(self.cloud.launch, spec, lease.token, replaces=m)
                detail = f"launched {new} ({spec.source}, subnet {spec.subnet_id})"
            changes["replacement"] = new
            changes["acted_at"] = self._store_clock(g)
            if ec2_state != "terminated":
                changes["pending_terminate"] = m
            # Persist the launch before terminating, so a crash here still shows it.
            lease = self._write_acted(lease, **changes)
            if lease.pending_terminate:
                lease, more = self._terminate_after_launch(lease, probe_at=probe_at)
                detail += more
            return self._write_acted(lease, detail=detail), detail
        elif kind == "hook":
            if not self.hook_command:
                raise AgentError("heal.action is hook but heal.hook is not set")
            lease = self._fence(lease, "the hook", probe_at=probe_at)
            detail = f"hook ran: {self.hook(self.hook_command, m, self.group)}"
        else:
            raise AgentError(f"unknown action {kind!r}")
        changes["detail"] = detail
        changes["acted_at"] = self._store_clock(g)  # adopt_since: acted_at less the slack
        return self._write_acted(lease, **changes), detail

    @staticmethod
    def _landing(call: Callable[..., _T], *args: Any, **kw: Any) -> _T:
        """The action's mutating call; its CloudError as ``_Unsure`` (it may have landed)."""
        try:
            return call(*args, **kw)
        except CloudError as exc:
            raise _Unsure(str(exc)) from exc

    def _write_acted(self, lease: Lease, **changes: Any) -> Lease:
        """Write down what a mutating call already did. A store failure here must not read
        as "nothing happened" (the caller would mark the lease failed and free its in-flight
        slot, hiding a real action): the store keeps ``acting`` (never cleared before
        ``acting_ttl_s``) and the slot stays taken; the next rewrite carries on from here."""
        try:
            return self._rewrite(lease, **changes) or replace(lease, **changes)
        except StoreError as exc:
            log.warning("could not record the action on %s's lease: %s", lease.member, exc)
            new = replace(lease, **changes)
            self._lease_cache[lease.member] = new
            return new

    def _terminate_after_launch(self, lease: Lease, *, retry: bool = False,
                                probe_at: _ProbeAt = _ProbeAt()) -> tuple[Lease, str]:
        """TerminateInstances after a launch, fenced; on failure it stays pending (9)."""
        m = lease.member
        try:
            lease = self._fence(lease, "TerminateInstances", probe_at=probe_at,
                                check_age=not retry)
        except _Fenced as f:
            if f.lease is None:
                return lease, f"; terminate of {m} not done: {f.why}"
            return f.lease, f"; terminate of {m} deferred: {f.why}"
        try:
            state = self.cloud.terminate(m)
        except CloudError as exc:
            return lease, f"; terminating {m} failed (retried later): {exc}"
        done = self._write_acted(lease, pending_terminate="")
        return done, f"; terminated {m}: {state}"

    def _retry_terminate(self, lease: Lease, probe_at: _ProbeAt) -> Lease:
        lease, detail = self._terminate_after_launch(lease, retry=True,
                                                     probe_at=probe_at)
        if not lease.pending_terminate:
            self._event("heal-terminate-retried", lease.member, [detail.lstrip("; ")])
            self._forget(lease.member)
        return lease

    def _forget(self, m: str, kind: str = "", reasons: Iterable[str] = (), *,
                if_present: bool = False) -> None:
        """Delete a member's record and tell peers: it is gone, not dying.

        ``kind`` (an event) or ``if_present``: only if the record is still there. A
        deleted record's ``gone`` is bumped once, not by every observer whose view still
        lists the member: S3's delete of a missing key succeeds, and a thousand bumps
        after one replacement overflow the marker's log, so every watcher falls behind
        and LISTs the whole group (issue #11)."""
        from agent.group.peers import bump_marker
        try:
            if (kind or if_present) and self.store.head(member_key(self.group, m)) is None:
                return  # another observer was first
            self.store.delete(member_key(self.group, m))
            bump_marker(self.store, self.group, {"id": m, "state": "gone", "by": self.me})
        except NotFound:
            return
        except StoreError as exc:
            log.warning("could not remove %s's record: %s", m, exc)
            return
        if kind:
            self._event(kind, m, reasons, {"record": "deleted"})

    def _clean_departed(self, peers: PeersView) -> None:
        """Leftover leaving/superseded records (a leave whose delete failed) go (6)."""
        for m, age in sorted(peers.departed.items()):
            if age >= 2 * self.policy.dead_after_s:
                self._forget(m, "heal-clean-record",
                             [f"record says leaving/superseded, {age:.0f}s old: a leftover"])

    # -- record ---------------------------------------------------------------------------------
    def _event(self, kind: str, member: str = "", reasons: Iterable[str] = (),
               details: Mapping[str, Any] | None = None) -> None:
        write_event(self.store, self.group, self.me, kind, member, reasons, details, self.clock)

    def _outcome(self, o: Outcome) -> None:
        self.outcomes.append(o)
        del self.outcomes[:-100]

    def _record_decision(self, d: Decision, peers: PeersView, sick_reason: str,
                         api_error: str) -> None:
        reasons = d.freeze.reasons if d.freeze else ()
        if tuple(reasons) != self._freeze_recorded:
            considered = [r.member_id for r in d.refusals]
            if d.freeze is not None and (d.freeze.scope == "group" or considered):
                details: dict[str, Any] = {"scope": d.freeze.scope, "members": considered}
                if sick_reason:
                    details["observer"] = sick_reason
                if api_error:
                    details["api_error"] = api_error[:300]
                self._event("heal-freeze", "", reasons, details)
            elif d.freeze is None and self._freeze_recorded:
                self._event("heal-unfreeze", "", ["the picture cleared"])
            self._freeze_recorded = tuple(reasons)
        if d.disrupted_zones != self._zones_recorded:
            if d.disrupted_zones:
                members = sorted(m for m, z in peers.zones.items() if z in d.disrupted_zones)
                self._event("heal-zone-disrupted", "",
                            [f"zone-disrupted: {z}: most of its members fell silent at once; "
                             "nothing there is acted on" for z in d.disrupted_zones],
                            {"zones": list(d.disrupted_zones), "members": members})
            else:
                self._event("heal-zone-recovered", "", ["no zone is disrupted any more"],
                            {"zones": list(self._zones_recorded)})
            self._zones_recorded = d.disrupted_zones
        if d.frozen:
            return
        for a in d.actions:
            if a.dry_run:
                key = dedupe_key("heal-dry-run", a.reasons)
                if self._recorded.get(a.member_id) != key:
                    self._event("heal-dry-run", a.member_id, a.reasons,
                                {"action": a.kind, "mode": "dry-run"})
                    self._recorded[a.member_id] = key
        for r in d.refusals:
            if all(x.startswith(_QUIET_REFUSALS) for x in r.reasons):
                continue
            key = dedupe_key("heal-refuse", r.reasons)
            if self._recorded.get(r.member_id) != key:
                self._event("heal-refuse", r.member_id, r.reasons)
                self._recorded[r.member_id] = key

    def _write_state(self, d: Decision, g: _Gathered, api_error: str) -> None:
        if self.state_path is None:
            return
        from agent.host import state as statefile

        doc = {
            "mode": self.policy.mode, "action": self.policy.action,
            "frozen": d.frozen, "reason": d.freeze.reason if d.freeze else "",
            "reasons": list(d.freeze.reasons) if d.freeze else [],
            "scope": d.freeze.scope if d.freeze else "",
            "budget_left": max(0, self.policy.max_per_window - g.budget_used),
            "in_flight": countOf(g.outcomes.values(), "in-flight"),
            "paused": g.paused, "superseded": self.superseded,
            "disrupted_zones": list(d.disrupted_zones),
            "api_error": api_error[:300], "store_errors": g.errors[:3],
            "last_step": self.clock.time(),
            "last_outcomes": [o.__dict__ for o in self.outcomes[-5:]],
        }
        try:
            statefile.update(self.state_path, lambda s: s.__setitem__("heal", doc))
        except AgentError as exc:
            log.warning("cannot record heal state: %s", exc)
