"""The heal controller: gathers one observer's view, calls ``agent.heal.decide``, acts.

The decision is pure (``agent.heal``); this module is the imperative shell around
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
refuses and gives nothing back), check the pause object again, ask EC2 again, act,
and record the outcome in the lease. Every decision, taken or refused, becomes an
event (``agent.events``), de-duplicated per member so a standing refusal is
written once, not every interval. The freeze state goes into ``state.json`` under
``heal`` (mode, frozen, reason, budget_left, in_flight, ...).

Daemon call contract (``ec2-agent run``, once per heartbeat interval, after the
peer watcher's ``tick()``)::

    ctl = HealController.for_daemon(ctx, watcher, clock=clock)   # once
    decision = ctl.step(watcher, heartbeater)   # or ctl.step(observer_sick=hb.observer_sick)
    if ctl.superseded or agent.leases.superseded(store, group, my_id):
        ...  # stop claiming membership: heartbeater.leave("superseded"), status says so

``step(peers, observer_health)``: ``peers`` is a ``PeersView`` or anything with
the ``agent.peers.PeerWatcher`` shape (``verdicts()``, ``view``, ``liveness``,
``self_id``; default: the watcher given to ``for_daemon``); ``observer_health`` is
an ``ObserverHealth`` or anything with an ``observer_sick`` attribute (the
``Heartbeater``). ``step`` never raises for store or cloud trouble: it records it
(observer-sick / api-failing) and returns the ``Decision``. ``ctl.superseded`` is
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.clock import SYSTEM_CLOCK, Clock
from agent.errors import AgentError, CloudError, NotFound, PreconditionFailed, StoreError
from agent.heal import (
    GOING_AWAY,
    NOT_SERVING,
    Action,
    Decision,
    HealPolicy,
    HealView,
    budget_after,
    decide,
    lease_token,
)
from agent.interfaces import CloudAPI, StoreAPI
from agent.leases import (
    OPEN_STATES,
    Lease,
    budget_key,
    control_prefix,
    count_suspicions,
    lease_key,
    lease_outcome,
    leases_prefix,
    parse_suspicion,
    pause_key,
    read_lease,
    resumed_key,
    streak,
    suspicion_key,
    suspicions_prefix,
    take_budget,
    write_event,
)
from agent.membership import MalformedRecord

if TYPE_CHECKING:
    from agent.bootctx import BootContext

log = logging.getLogger(__name__)

STALE_VERDICTS = frozenset({"dead", "suspect"})
# Refusals that only restate a verdict nobody acts on: not worth an event each.
_QUIET_REFUSALS = ("alive", "grace", "leaving", "unknown")


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


def policy_from_config(config: Any) -> HealPolicy:
    """The pure policy from the agent config (``heal`` plus ``heartbeat.dead_after_s``)."""
    h = config.heal
    return HealPolicy(
        mode=h.mode, action=h.action, grace_s=float(h.grace_s),
        max_per_window=int(h.max_per_window), window_s=float(h.window_s),
        freeze_fraction=float(h.freeze_fraction), confirm_observers=int(h.confirm_observers),
        dead_after_s=float(config.heartbeat.dead_after_s),
        silent_after_s=float(h.silent_after_s), replace_silent=bool(h.replace_silent),
        failed_before_freeze=int(getattr(h, "failed_before_freeze", 3)),
    )


# -- inputs from the daemon --------------------------------------------------------------------

@dataclass(frozen=True)
class PeersView:
    """This observer's picture of its group, as the peer watcher built it."""

    verdicts: Mapping[str, Any]
    group_size: int
    endpoints: Mapping[str, str] = field(default_factory=dict)
    silent_for: Mapping[str, float | None] = field(default_factory=dict)
    observer_fresh: bool = False
    members: frozenset[str] = frozenset()

    @classmethod
    def from_watcher(cls, watcher: Any, *, dead_after_s: float, grace_s: float) -> PeersView:
        verdicts = watcher.verdicts(dead_after_s=dead_after_s, grace_s=grace_s)
        view = dict(watcher.view)
        members = frozenset(view) | {watcher.self_id}
        return cls(
            verdicts=verdicts,
            group_size=len(members),
            endpoints={m: p.endpoint for m, p in view.items() if getattr(p, "endpoint", "")},
            silent_for={m: getattr(v, "store_age_s", None) for m, v in verdicts.items()},
            observer_fresh=watcher.liveness.observer_fresh(dead_after_s),
            members=members,
        )


@dataclass(frozen=True)
class ObserverHealth:
    """Is this observer itself sick (its own heartbeat writes or API calls failing)?"""

    sick: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Outcome:
    """What execution did with one action: acted | lost | refused | failed | dry-run."""

    member: str
    result: str
    detail: str = ""
    replacement: str = ""


# -- default probe and hook --------------------------------------------------------------------

def probe_health(endpoint: str, timeout_s: float = 2.0) -> bool | None:
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

@dataclass
class _Gathered:
    store_now: float = 0.0
    suspicions: dict[str, frozenset[str]] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    paused: bool = False
    resumed_at: float | None = None
    budget_used: int = 0
    errors: list[str] = field(default_factory=list)


class HealController:
    """One observer's replacement controller. Not thread-safe: one per observer."""

    def __init__(self, store: StoreAPI, cloud: CloudAPI, config: Any, identity: Any,
                 clock: Clock = SYSTEM_CLOCK, *, policy: HealPolicy | None = None,
                 state_path: Path | None = None, watcher: Any = None,
                 probe: Any = probe_health, hook: Any = run_hook,
                 replace_deadline_s: float | None = None,
                 suspicion_ttl_s: float | None = None) -> None:
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
        boot_s = float(getattr(getattr(config, "boot", None), "deadline_s", 120) or 120)
        self.replace_deadline_s = (replace_deadline_s if replace_deadline_s is not None
                                   else 2 * boot_s + 2 * self.policy.dead_after_s)
        self.suspicion_ttl_s = suspicion_ttl_s or 2 * self.policy.dead_after_s
        self.hook_command: str | None = getattr(config.heal, "hook", None)
        self.superseded = False
        self.outcomes: list[Outcome] = []  # what execution did, newest last (bounded)
        self._recorded: dict[str, tuple[str, ...]] = {}
        self._freeze_recorded: tuple[str, ...] = ()
        self._lease_cache: dict[str, Lease] = {}

    @classmethod
    def for_daemon(cls, ctx: BootContext, watcher: Any, *,
                   clock: Clock = SYSTEM_CLOCK) -> HealController:
        from agent.cloud import Cloud

        region = ctx.cfg.store.region or ctx.ident.region
        return cls(ctx.get_store(), Cloud(region), ctx.cfg, ctx.ident, clock,
                   state_path=ctx.paths.state_file, watcher=watcher)

    # -- the step -------------------------------------------------------------------------------
    def step(self, peers: Any = None, observer_health: Any = None, *,
             observer_sick: bool | None = None) -> Decision:
        """Gather, decide, act, record. See the module docstring for the contract."""
        peers = peers if peers is not None else self.watcher
        if peers is None:
            raise ValueError("step needs a peers view (or a watcher given at construction)")
        if not isinstance(peers, PeersView):
            peers = PeersView.from_watcher(peers, dead_after_s=self.policy.dead_after_s,
                                           grace_s=self.policy.grace_s)
        sick, sick_reason = self._sickness(observer_health, observer_sick)
        g = self._gather(peers, sick or peers.observer_fresh)
        if g.errors:
            sick, sick_reason = True, "store failing: " + "; ".join(g.errors)[:300]
        view, api_error = self._view(peers, g, sick)
        decision = decide(view, self.policy)
        self._record_decision(decision, peers, sick_reason, api_error)
        if not decision.frozen and not g.errors:
            for action in decision.actions:
                if action.dry_run:
                    self._outcome(Outcome(action.member_id, "dry-run"))
                else:
                    self._execute(action, view, g)
        if not g.errors:  # the lease listing already says whether one is against me
            mine = g.leases.get(self.me)
            self.superseded = mine is not None and mine.state != "refused"
        self._write_state(decision, g, api_error)
        return decision

    def _sickness(self, health: Any, sick: bool | None) -> tuple[bool, str]:
        if sick is not None:
            return bool(sick), "own heartbeat failing" if sick else ""
        if health is None:
            return False, ""
        if isinstance(health, ObserverHealth):
            return health.sick, health.reason
        if hasattr(health, "observer_sick"):
            return bool(health.observer_sick), str(getattr(health, "last_error", "") or "")
        raise TypeError(f"observer_health must be ObserverHealth or have .observer_sick, "
                        f"got {type(health).__name__}")

    # -- gather ---------------------------------------------------------------------------------
    def _gather(self, peers: PeersView, abstain: bool) -> _Gathered:
        g = _Gathered()
        try:
            listing = self.store.list(suspicions_prefix(self.group))
            g.store_now = listing.store_now
            self._suspect(peers, listing, abstain)
            g.suspicions = count_suspicions(listing.entries, self.group, listing.store_now,
                                            self.suspicion_ttl_s)
            control = self.store.list(control_prefix(self.group))
            for e in control.entries:
                if e.key == pause_key(self.group):
                    g.paused = True
                elif e.key == resumed_key(self.group):
                    g.resumed_at = e.last_modified
            obj = self.store.get_or_none(budget_key(self.group))
            if obj is not None:
                _, g.budget_used = budget_after(json.loads(obj.body), obj.store_now,
                                                self.policy.window_s)
            self._read_leases(g, peers)
        except (StoreError, MalformedRecord, ValueError) as exc:
            g.errors.append(str(exc))
        return g

    def _suspect(self, peers: PeersView, listing: Any, abstain: bool) -> None:
        """Keep my suspicion objects true: write the stale ones, delete the cleared ones."""
        mine: dict[str, Any] = {}
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
            if getattr(v, "status", v) in STALE_VERDICTS and m != self.me}
        for m in sorted(stale):
            e = mine.get(m)
            if e is None or listing.store_now - e.last_modified > self.suspicion_ttl_s / 2:
                v = peers.verdicts[m]
                body = json.dumps({"observer": self.me, "member": m,
                                   "verdict": getattr(v, "status", v),
                                   "reason": getattr(v, "reason", "")}).encode()
                self.store.put(suspicion_key(self.group, m, self.me), body,
                               content_type="application/json")
        for m, e in mine.items():
            if m not in stale:
                self._delete_quietly(e.key, e.etag)

    def _delete_quietly(self, key: str, etag: str) -> None:
        try:
            self.store.delete(key, if_match=etag)
        except (PreconditionFailed, NotFound):
            pass

    def _read_leases(self, g: _Gathered, peers: PeersView) -> None:
        listing = self.store.list(leases_prefix(self.group))
        now = listing.store_now
        g.store_now = max(g.store_now, now)
        for e in listing.entries:
            member = e.key[len(leases_prefix(self.group)):]
            cached = self._lease_cache.get(member)
            if cached is not None and cached.etag == e.etag:
                lease = cached
            else:
                obj = self.store.get_or_none(e.key)
                if obj is None:
                    continue
                try:
                    lease = Lease.parse(obj.body, etag=obj.etag, last_modified=obj.last_modified)
                except MalformedRecord as exc:
                    log.warning("ignoring %s: %s", e.key, exc)
                    continue
                self._lease_cache[member] = lease
            lease, hb = self._maintain(lease, now, peers)
            g.leases[member] = lease
            g.outcomes[member] = lease_outcome(lease, now, self.replace_deadline_s, bool(hb))
        # Bounded memory: forget leases that are gone from the store, and refusals recorded
        # for members that are neither leased nor in this observer's view any more.
        for m in set(self._lease_cache) - set(g.leases):
            del self._lease_cache[m]
        for m in set(self._recorded) - set(g.leases) - set(peers.verdicts) - set(peers.members):
            del self._recorded[m]

    def _heartbeated(self, rid: str, peers: PeersView) -> bool | None:
        if not rid:
            return False
        if rid in peers.members:
            return True
        from agent.layout import member_key

        try:
            return self.store.head(member_key(self.group, rid)) is not None
        except StoreError:
            return None

    def _maintain(self, lease: Lease, now: float, peers: PeersView) -> tuple[Lease, bool | None]:
        """Move an open lease along: adopt the ASG's replacement, then done or failed.

        Returns the lease and whether its replacement heartbeats (None: cannot tell).
        """
        if lease.state not in OPEN_STATES:
            return lease, False
        if (lease.state == "acted" and not lease.replacement and lease.asg
                and lease.holder == self.me):
            try:
                current = set(self.cloud.asg_member_ids(lease.asg))
            except CloudError:
                current = set()
            taken = {x.replacement for x in self._lease_cache.values() if x.replacement}
            new = sorted(current - set(lease.asg_before) - taken - {lease.member})
            if new:
                lease = self._rewrite(lease, replacement=new[0]) or lease
        hb = self._heartbeated(lease.replacement, peers)
        if hb is None:
            return lease, None
        out = lease_outcome(lease, now, self.replace_deadline_s, hb)
        if out in ("done", "failed"):
            updated = self._rewrite(lease, state=out)
            if updated is not None:
                kind = "heal-replaced" if out == "done" else "heal-replacement-failed"
                why = (f"replacement {lease.replacement} heartbeats" if out == "done" else
                       f"no heartbeat from {lease.replacement or 'a replacement'} within "
                       f"{self.replace_deadline_s:g}s")
                self._event(kind, lease.member, [why], {"lease": lease.holder,
                                                        "replacement": lease.replacement})
                return updated, hb
        return lease, hb

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
        verdicts = {m: getattr(v, "status", v) for m, v in peers.verdicts.items()}
        for m, obs in g.suspicions.items():
            # Others' fresh suspicions of members I do not watch: I cannot call them dead,
            # but they count towards a mass death.
            if m not in verdicts and m != self.me and obs:
                verdicts[m] = "suspect"
        dead = sorted(m for m, s in verdicts.items() if s == "dead" and m != self.me)
        leased = frozenset(m for m, lease in g.leases.items() if lease.state != "refused")
        ec2: dict[str, str | None] = {}
        asg: dict[str, str | None] = {}
        probe: dict[str, bool | None] = {}
        api_error = ""
        candidates = [m for m in dead if m not in leased]
        if candidates and not sick and not g.paused:
            ec2, api_error = self.cloud.states_or_none(candidates)
            if not api_error:
                try:
                    asg = {m: a.health for m, a in self.cloud.asg_instances(candidates).items()}
                except CloudError as exc:
                    api_error = str(exc)
            for m in candidates:
                if ec2.get(m) == "running":
                    probe[m] = self.probe(peers.endpoints.get(m, ""))
        in_flight = sum(1 for o in g.outcomes.values() if o == "in-flight")
        view = HealView(
            observer_id=self.me, group_size=max(peers.group_size, 1), verdicts=verdicts,
            suspicions=g.suspicions, ec2_state=ec2, asg_health=asg, probe_ok=probe,
            silent_for=dict(peers.silent_for), leases=leased, in_flight=in_flight,
            budget=g.budget_used,
            consecutive_failures=streak(g.leases.values(), g.outcomes, g.resumed_at),
            observer_sick=sick, observer_fresh=peers.observer_fresh, paused=g.paused,
            api_healthy=not api_error, now=g.store_now)
        return view, api_error

    # -- execute --------------------------------------------------------------------------------
    def _execute(self, action: Action, view: HealView, g: _Gathered) -> None:
        m = action.member_id
        lease = self._take_lease(action)
        if lease is None:
            return
        ok, why = take_budget(self.store, self.group, window_s=self.policy.window_s,
                              max_per_window=self.policy.max_per_window, store_now=g.store_now)
        if not ok:
            return self._refuse_lease(lease, why)
        g.budget_used += 1
        try:
            if self.store.head(pause_key(self.group)) is not None:
                return self._refuse_lease(lease, "paused: kill switch present at the last look")
        except StoreError as exc:
            return self._refuse_lease(lease, f"store-failing at the last look: {exc}")
        fresh, err = self.cloud.states_or_none([m])
        health = None
        if not err:
            try:
                a = self.cloud.asg_instances([m]).get(m)
                health = a.health if a else None
            except CloudError as exc:
                err = str(exc)
        why = f"api-failing at the second look: {err}" if err else ec2_still_agrees(
            view.ec2_state.get(m), fresh.get(m), health)
        if why:
            return self._refuse_lease(lease, why)
        try:
            lease, detail = self._act(action.kind, lease, fresh.get(m), g.store_now)
        except AgentError as exc:
            self._rewrite(lease, state="failed", acted_at=g.store_now, detail=str(exc)[:500])
            self._event("heal-action-failed", m, [*action.reasons, str(exc)],
                        {"action": action.kind})
            self._outcome(Outcome(m, "failed", str(exc)))
            return
        self._event("heal-action", m, action.reasons,
                    {"action": action.kind, "detail": detail, "token": lease.token,
                     "replacement": lease.replacement})
        self._recorded[m] = dedupe_key("heal-action", action.reasons)
        self._outcome(Outcome(m, "acted", detail, lease.replacement))
        self._forget(m)

    def _take_lease(self, action: Action) -> Lease | None:
        m = action.member_id
        nonce = secrets.token_hex(8)
        lease = Lease(m, self.me, action.kind, "held", reasons=action.reasons, nonce=nonce)
        key = lease_key(self.group, m)
        try:
            etag = self.store.create(key, lease.body(), content_type="application/json")
        except PreconditionFailed:
            try:
                cur = read_lease(self.store, self.group, m)
            except (StoreError, MalformedRecord) as exc:
                self._lost(m, f"lease exists and is unreadable: {exc}")
                return None
            if cur is None or cur.state != "refused":
                self._lost(m, f"lease held by {cur.holder if cur else '?'} "
                              f"({cur.state if cur else 'gone'})")
                return None
            try:  # a refused lease did nothing: take it over, by compare-and-swap
                etag = self.store.put(key, lease.body(), if_match=cur.etag,
                                      content_type="application/json")
            except (PreconditionFailed, NotFound):
                self._lost(m, "lost the takeover of a refused lease")
                return None
        except StoreError as exc:
            self._lost(m, f"cannot create the lease: {exc}", kind="heal-refuse")
            return None
        lease = replace(lease, etag=etag)
        token = lease_token(self.group, m, etag)
        return self._rewrite(lease, token=token) or replace(lease, token=token)

    def _lost(self, m: str, why: str, kind: str = "heal-lease-lost") -> None:
        self._event(kind, m, [why])
        self._outcome(Outcome(m, "lost", why))

    def _refuse_lease(self, lease: Lease, why: str) -> None:
        self._rewrite(lease, state="refused", detail=why)
        self._event("heal-refuse", lease.member, [why], {"lease": "refused (may be taken over)"})
        self._outcome(Outcome(lease.member, "refused", why))

    def _act(self, kind: str, lease: Lease, ec2_state: str | None,
             now: float) -> tuple[Lease, str]:
        m = lease.member
        changes: dict[str, Any] = {"state": "acted", "acted_at": now}
        if kind in ("asg-mark", "asg-terminate"):
            a = self.cloud.asg_instances([m]).get(m)
            if a is None:
                raise CloudError(f"{m} is not in an Auto Scaling group: {kind} cannot replace it")
            changes.update(asg=a.group, asg_before=tuple(self.cloud.asg_member_ids(a.group)))
            if kind == "asg-mark":
                self.cloud.set_unhealthy(m, respect_grace=True)
                detail = f"marked Unhealthy in {a.group}"
            elif ec2_state == "terminated":
                detail = f"already terminated: {a.group} replaces it"
            else:
                activity = self.cloud.asg_terminate(m)
                detail = f"terminated in {a.group} without decrement (activity {activity})"
        elif kind == "launch":
            spec = self.cloud.launch_spec(m)
            new = self.cloud.launch(spec, lease.token, replaces=m)
            changes["replacement"] = new
            # Persist the launch before terminating, so a crash here still shows it.
            lease = self._rewrite(lease, **changes) or replace(lease, **changes)
            detail = f"launched {new} ({spec.source}, subnet {spec.subnet_id})"
            if ec2_state != "terminated":
                try:
                    detail += f"; terminated {m}: {self.cloud.terminate(m)}"
                except CloudError as exc:
                    detail += f"; terminating {m} failed: {exc}"
            return self._rewrite(lease, detail=detail) or lease, detail
        elif kind == "hook":
            if not self.hook_command:
                raise AgentError("heal.action is hook but heal.hook is not set")
            detail = f"hook ran: {self.hook(self.hook_command, m, self.group)}"
        else:
            raise AgentError(f"unknown action {kind!r}")
        changes["detail"] = detail
        return self._rewrite(lease, **changes) or replace(lease, **changes), detail

    def _forget(self, m: str) -> None:
        """Delete the dead member's record and tell peers: it is gone, not dying."""
        from agent.layout import member_key
        from agent.peers import bump_marker

        try:
            self.store.delete(member_key(self.group, m))
            bump_marker(self.store, self.group, {"id": m, "state": "gone", "by": self.me})
        except StoreError as exc:
            log.warning("could not remove %s's record after replacing it: %s", m, exc)

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
        from agent import state as statefile

        doc = {
            "mode": self.policy.mode, "action": self.policy.action,
            "frozen": d.frozen, "reason": d.freeze.reason if d.freeze else "",
            "reasons": list(d.freeze.reasons) if d.freeze else [],
            "scope": d.freeze.scope if d.freeze else "",
            "budget_left": max(0, self.policy.max_per_window - g.budget_used),
            "in_flight": sum(1 for o in g.outcomes.values() if o == "in-flight"),
            "paused": g.paused, "superseded": self.superseded,
            "api_error": api_error[:300], "store_errors": g.errors[:3],
            "last_step": self.clock.time(),
            "last_outcomes": [o.__dict__ for o in self.outcomes[-5:]],
        }
        try:
            statefile.update(self.state_path, lambda s: s.__setitem__("heal", doc))
        except AgentError as exc:
            log.warning("cannot record heal state: %s", exc)
