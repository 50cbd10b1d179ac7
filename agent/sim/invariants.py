"""The ground-truth checker: invariants at every mutating call, after every step, at the end.

Ground truth is kept beside the agents, never read by them: which processes are
up, stopped or dead, who can reach the store, which zone is dark. Invariants are
checked when each mutating cloud call lands and at the end of the run:

* ``false-action``: no terminate/mark/replace of an instance whose agent was up
  and able to heartbeat within ``dead_after_s`` of the call being sent (after the
  actor's fence; a target that comes back while the request is in transit, which no
  client can fence, is noted ``landed-late`` in the timeline);
* ``zone``: nothing done to a member of a zone that is dark (network) when the call
  lands and had been for ``dead_after_s`` when it was sent: a call sent while the zone
  was lit, or dark for less than any observer can see, that lands after it went dark (in
  transit, past any fence) is noted ``landed-dark`` (a target whose agent was up when the
  lights went out is false-action's);
* ``single-answer``: nothing done to an instance EC2 truly described as running whose
  agent was silent well under ``silent_after_s``, unless EC2 had been answering wrongly
  about it (a control-plane loss) for ``dead_after`` already (invariant 14), when the
  call was sent or at the actor's last look at it (within ``dead_after`` of sending);
* ``double-replacement``: at most one replacement per death;
* ``double-adoption``: no launch is named the replacement in two members' leases (each
  launch replaces one death; a lease closed ``done`` on another member's launch hides its
  own replacement's fate and frees its in-flight slot early);
* ``rate-limit``: at most ``2 × max_per_window`` actions in any ``window_s``
  (the budget is fixed windows: two can touch), group-wide;
* ``in-flight``: actions whose replacement has not heartbeated yet stay within
  ``in_flight_cap(group)`` group-wide, the group being the ASG's desired capacity;
* ``paused`` / ``frozen``: nothing done in a step that started while the kill
  switch was present, nor in a step whose decision was frozen;
* ``exiled``: a member whose instance still runs and that nobody acted on never
  steps down as superseded;
* ``unjustified-freeze``: a ``failed-replacements`` freeze needs that many
  replacements that really never heartbeated;
* ``liveness``: a death in a quiet stretch (no other fault, budget left) is
  replaced within ``bound_s`` (counted while enough of the agents watching it to
  confirm it are able and not stalled in a call: ``_due``), or some observer recorded
  a freeze, or judged the member's zone disrupted (the zone rule, docs/safety.md 15),
  or no other member's agent was up and able through the whole stretch (nobody left
  to heal it);
* ``freeze-stuck``: a freeze whose every reason is transient (API failing, own
  writes failing, paused, fresh) has lifted 600 s after the last fault cleared.
"""

from __future__ import annotations

import json
from bisect import bisect_right
from typing import Any

from agent.group.membership import ring_position
from agent.group.peers import DEFAULT_K
from agent.sim.vtime import Scheduler
from agent.sim.world import T0, Host, Violation


class Checker(Scheduler):
    """Invariants against ground truth (a mixin of ``Simulation``)."""

    def violate(self, kind: str, member: str, detail: str, actor: str = "") -> None:
        key = (kind, member, actor)
        if key in self._violated:  # once per kind, member and actor: the first is the finding
            return
        self._violated.add(key)
        v = Violation(self.t, kind, detail, member, actor)
        self.res.violations.append(v)
        if kind == "false-action":
            self.res.false_replacements += 1
        self.note("VIOLATION", member, f"{kind}: {detail}")

    def _on_lease_write(self, h: Host, key: str, body: bytes) -> None:
        """``double-adoption``, at every lease write the store took."""
        try:
            doc = json.loads(body)
        except ValueError:
            return
        r = doc.get("replacement") if isinstance(doc, dict) else None
        if not r:
            return
        m = key.rsplit("/", 1)[-1]
        first = self.adopted.setdefault(r, m)
        if first != m:
            self.violate("double-adoption", m, f"{r} is named the replacement of both {first} "
                         f"and {m}", h.iid)

    def _after_step(self, h: Host, decision: Any, acted: list[str]) -> None:
        self.res.checks += 1
        h.freeze_reasons = tuple(decision.freeze.reasons) if decision.frozen else ()
        if decision.frozen and acted:
            self.violate("frozen", acted[0], f"acted in a step whose decision was frozen: "
                         f"{decision.freeze.reason}", h.iid)
        zones = tuple(decision.disrupted_zones)
        if zones:
            self.zone_holds.append((self.t, zones))
            if (h.iid, zones) not in self.zone_seen:
                self.zone_seen.add((h.iid, zones))
                self.note("zone-disrupted", h.iid, ", ".join(zones))
        if decision.freeze is not None and decision.freeze.scope == "group":
            key = (h.iid, decision.freeze.reason.split(":")[0])
            self.freeze_times.append(self.t)
            if key not in self.freeze_seen:
                self.freeze_seen.add(key)
                self.res.freezes += 1
                self.note("freeze", h.iid, decision.freeze.reason)
            for r in decision.freeze.reasons:
                if r.startswith("failed-replacements"):
                    self.res.checks += 1
                    if self.failed_replacements < self.policy.failed_before_freeze:
                        self.violate(
                            "unjustified-freeze", "", f"{r} but only {self.failed_replacements} "
                            f"replacement(s) really failed to heartbeat", h.iid)

    def _exiled(self, h: Host) -> None:
        self.res.checks += 1
        inst = self.cloud.instances.get(h.iid)
        self.note("superseded", h.iid)
        if not h.acted_on and inst is not None and inst.state == "running":
            self.violate("exiled", h.iid, "stepped down as superseded, but nobody acted on it "
                         "and its instance still runs")
        h.left = True
        self._able(h)

    def _on_action(self, actor: Host, op: str, kw: dict[str, Any],
                   before: dict[str, float | None], sent_t: float,
                   ec2_before: dict[str, str]) -> None:
        if op == "run_instances":
            tags = {t["Key"]: t["Value"] for s in kw.get("TagSpecifications") or []
                    for t in s.get("Tags", [])}
            targets = [tags.get("ec2-agent:replaces", "")]
        elif op == "terminate_instances":
            targets = list(kw.get("InstanceIds") or [])
        elif op == "set_instance_health":
            if kw.get("HealthStatus") != "Unhealthy":
                return
            targets = [kw["InstanceId"]]
        else:
            targets = [kw["InstanceId"]]
        for m in targets:
            self._check_action(actor, op, m, before.get(m), sent_t, ec2_before.get(m, ""))

    def _check_action(self, actor: Host, op: str, m: str, unable_since: float | None,
                      sent_t: float, ec2_state: str = "") -> None:
        t = self.t
        self.res.actions += 1
        self.res.checks += 6
        self.actions.append((t, actor.iid, op, m))
        self.note("action", m, f"{op} by {actor.iid}")
        if actor.iid in self.stepping:
            self.stepping[actor.iid].append(m)
        h = self.hosts.get(m)
        if h is None:
            return
        h.acted_on = True
        self._check_answer(actor, op, m, unable_since, sent_t, ec2_state)
        if unable_since is None or sent_t - unable_since < self.dead_after:
            since = ("when the call was sent" if unable_since is None
                     else f"until {sent_t - unable_since:.1f}s before the call was sent")
            self.violate("false-action", m, f"{op}: its agent was alive and able to heartbeat "
                         f"{since} (dead_after {self.dead_after:g}s)", actor.iid)
        # While dark, nothing; for dead_after after the lights come back, nothing whose agent
        # is up (its heartbeat may not have landed yet). A target whose agent is dead is an
        # ordinary death once the zone is lit and its other members answer again: the zone
        # rule heals it (docs/safety.md 15), the controller cannot and need not wait longer.
        # Any outage of the zone counts, not only its latest: a call landing in one outage's
        # tail after the next one was scheduled is judged by the outage it landed in.
        span = self._dark_span(h.zone, t)
        if span is not None and not (t >= span[1] and h.proc == "dead"):
            # ...and as when it was sent: a call in transit when the zone went dark (an
            # action-stall) is past every check a client can make, as landed-late is; so is
            # a call sent less than dead_after into the outage: no observer can tell a zone
            # that young from silence, and a target whose agent was up when the lights went
            # out is false-action's (chaos seed 7002, N = 39: 26, hung 141 s, terminated by a
            # call sent 0.8 s after its zone went dark, landed 119 s later)
            sent_span = self._dark_span(h.zone, sent_t)
            if sent_span is not None and sent_t - sent_span[0] >= self.dead_after:
                self.violate("zone", m, f"{op} against a member of {h.zone}, which is dark "
                             f"(network outage since {span[0] - T0:.0f}s)", actor.iid)
            else:
                lit = ("lit then" if sent_span is None else
                       f"{sent_t - sent_span[0]:.1f}s into the outage")
                self.note("landed-dark", m, f"{op} by {actor.iid}: sent at "
                          f"{sent_t - T0:.1f}s, {lit}; {h.zone} dark since "
                          f"{span[0] - T0:.0f}s")
        start = self.step_start.get(actor.iid, t)
        if self.pause_set_at is not None and self.pause_set_at < start - 1.0:
            self.violate("paused", m, f"{op} in a step that began after the kill switch was "
                         f"set ({self.pause_set_at - T0:.0f}s)", actor.iid)
        window = [a for a in self.actions if a[0] > t - self.policy.window_s]
        if len(window) > 2 * self.policy.max_per_window:
            self.violate("rate-limit", m, f"{len(window)} actions within {self.policy.window_s:g}s"
                         f" (max_per_window {self.policy.max_per_window})", actor.iid)
        # The group is what it is meant to be (the ASG's desired capacity), dead members
        # included, as in the freeze fraction and DESIGN invariant 5: not its live agents,
        # or a pair death would shrink the cap it is healed under (zone-outage seed 101).
        group = (sum(g.desired for g in self.cloud.groups.values()) if self.cloud.groups else
                 sum(1 for x in self.hosts.values() if x.proc != "dead" and not x.left))
        cap = self.policy.in_flight_cap(max(group, 1))
        in_flight = self._in_flight(t) - 1
        if in_flight + 1 > max(cap, 1):
            self.violate("in-flight", m, f"{in_flight + 1} replacements in flight, cap {cap} for "
                         f"{group} members", actor.iid)

    def _dark_span(self, zone: str, t: float) -> tuple[float, float] | None:
        """The outage ``(start, end)`` of ``zone`` that ``t`` falls in, or whose lights came
        back less than ``dead_after`` before ``t``; the latest if several; else None."""
        for s, u in reversed(self.zone_dark_spans.get(zone, ())):
            if s <= t < u + self.dead_after:
                return s, u
        return None

    def _check_answer(self, actor: Host, op: str, m: str, unable_since: float | None,
                      sent_t: float, ec2_state: str) -> None:
        """Invariant 14 against ground truth: EC2 truly said ``running`` and the agent had
        been silent far less than ``silent_after_s`` (less three intervals: a record may be
        older than the agent's last ability), so only a wrong EC2 answer can have justified
        the action; a wrong answer justifies nothing until it has persisted
        ``not_found_persist_s`` (= ``dead_after``: a control-plane loss that old)."""
        silent_after = self.policy.silent_after_s
        if (ec2_state != "running" or unable_since is None
                or sent_t - unable_since >= silent_after - 3 * self.interval):
            return
        if m in self.lost and sent_t < self.lost_until and sent_t - self.lost_since >= \
                self.dead_after:
            return
        # ...or at the actor's own last look, within a decision's age of sending: the loss
        # may end between that look and the call (control-plane-2007 seed 5031, N = 10:
        # the second look at 5366.6 s still NotFound, the loss over at 5367.8 s, the
        # terminate sent at 5368.6 s after the fence's probe)
        look = self.lost_looks.get((actor.iid, m))
        if (look is not None and look[0] - look[1] >= self.dead_after
                and sent_t - look[0] <= self.dead_after):
            self.note("landed-found", m, f"{op} by {actor.iid}: sent {sent_t - look[0]:.1f}s "
                      f"after its last look, NotFound then; EC2 found it again since")
            return
        self.violate("single-answer", m, f"{op}: EC2 truly said running and its agent was "
                     f"silent only {sent_t - unable_since:.0f}s < silent_after_s "
                     f"{silent_after:g}s; no wrong answer had persisted {self.dead_after:g}s",
                     actor.iid)

    def _in_flight(self, t: float) -> int:
        """Actions whose target's replacement has not heartbeated yet (and is not overdue).

        Heartbeated: its first record landed in the store, which is when peers can see it
        and a lease may be closed ``done`` (chaos seed 20, N = 30: a replacement's record
        landed, an observer closed its lease, and its agent was still inside the beat,
        announcing itself on the marker, when another observer acted)."""
        n = 0
        seen: set[str] = set()
        for at, _, _, m in reversed(self.actions):
            if t - at > self.replace_deadline:
                break
            if m in seen:
                continue
            seen.add(m)
            arrived = any(x.replaces == m and x.beat_landed is not None
                          for x in self.hosts.values())
            if not arrived:
                n += 1
        return n

    def _track_failures(self) -> None:
        """Ground truth for the failure streak: replacements that never heartbeated in time."""
        if self.replace_deadline:
            d = self.replace_deadline
            self.failed_replacements = sum(
                1 for h in self.hosts.values() if h.replaces and (
                    (h.first_beat is None and self.t - h.launched >= d)
                    or (h.first_beat is not None and h.first_beat - h.launched >= d)))
        self.at(self.t + 30.0, self._track_failures)

    def _check_freezes_lift(self) -> None:
        """A freeze whose causes are transient (API, store, pause) lifts once they clear."""
        transient = ("api-failing", "observer-sick", "paused", "observer-fresh")
        p = self.profile
        if any((p.store_error, p.store_latency, p.lost_response, p.call_stall, p.cloud_error,
                p.action_stall, p.action_lost, p.wrong_describe)):
            return  # per-call faults never stop: there is no quiet stretch to judge
        quiet_since = max((e for _, e, _ in self.fault_spans), default=T0)
        deaths = [h.death_t for h in self.hosts.values() if h.death_t is not None]
        last_death = max(deaths, default=T0)
        if (self.end - max(quiet_since, last_death) < 600.0 or self.pause_set_at is not None
                or self.t < self.api_down_until):
            return
        for h in sorted(self.hosts.values(), key=lambda h: h.iid):
            if h.proc != "up" or h.left or not h.freeze_reasons:
                continue
            self.res.checks += 1
            if all(r.startswith(transient) for r in h.freeze_reasons):
                self.violate("freeze-stuck", "", f"still frozen ({'; '.join(h.freeze_reasons)})"
                             f" {self.end - quiet_since:.0f}s after the last fault cleared",
                             h.iid)

    def bound_s(self) -> float:
        """How long a death may wait for its replacement in a quiet stretch."""
        p = self.policy
        return (p.silent_after_s + p.dead_after_s + 6 * self.interval + self.cloud.boot_s
                + 10.0 + 60.0)

    def _final_checks(self) -> None:
        self._check_freezes_lift()
        bound = self.bound_s()
        for h in sorted(self.hosts.values(), key=lambda h: h.iid):
            if h.death_t is None or h.death_t + bound > self.end:
                continue
            self.res.checks += 1
            if self.replaced_count[h.iid]:
                continue
            t0, t1 = h.death_t - self.dead_after, self._due(h, bound)
            if t1 > self.end:
                continue  # its watchers were stalled too long to judge it within the run
            noisy = any(s < t1 and e >= t0 and not (abs(s - h.death_t) < 1e-9)
                        for s, e, _ in self.fault_spans)
            deaths_near = sum(1 for x in self.hosts.values()
                              if x.death_t is not None and t0 - self.policy.window_s
                              <= x.death_t <= t1)
            if noisy or deaths_near > self.policy.max_per_window:
                continue
            if any(t0 <= t <= t1 for t in self.freeze_times):
                continue
            # The zone rule (docs/safety.md 15, issue #10): most of a zone, and at least two,
            # silent at once is a disrupted zone and nothing in it is acted on, by design;
            # the decision names it (event heal-zone-disrupted), as a freeze names its
            # reason. Two of the three members of one zone dying together (pair-death) is,
            # from the outside, a zone going dark. This check predates the rule.
            if any(t0 <= t <= t1 and h.zone in z for t, z in self.zone_holds):
                continue
            # Healing is done by peers: with no other agent up and able through the whole
            # stretch (the last of the group died, the rest long dead), nobody can heal it.
            if not any(x is not h and _able_through(x, h.death_t, t1)
                       for x in self.hosts.values()):
                continue
            late = (f" ({t1 - h.death_t:.0f}s: its watchers stalled)"
                    if t1 > h.death_t + bound + 1.0 else "")
            self.violate("liveness", h.iid, f"died at {h.death_t - T0:.0f}s ({h.death_kind}), "
                         f"not replaced within {bound:.0f}s{late} in a quiet stretch and no "
                         f"freeze recorded")

    def _watchers(self, dead: Host) -> list[Host]:
        """Ground truth: who watches ``dead`` when it dies. Each agent watches the ``k``
        members after it on the hash ring of the live ones (``agent.group``'s ring, which
        walks past the dead): ``dead`` is watched by the ``k`` able agents before it."""
        t = dead.death_t
        assert t is not None
        able = [x for x in self.hosts.values() if x is not dead and _able_through(x, t, t)]
        ring = sorted([*able, dead], key=lambda x: (ring_position(x.iid), x.iid))
        i = ring.index(dead)
        k = min(DEFAULT_K, len(able))
        return [ring[(i - j) % len(ring)] for j in range(1, k + 1)]

    def _due(self, dead: Host, bound: float) -> float:
        """When ``dead`` is owed its replacement: ``bound`` seconds after its death, counted
        only while enough of its watchers to confirm it (``confirm_observers``) are able
        and not stalled in a call. Stalls seed 306 (N = 42): in the 310 s after a death its
        three watchers' main loops stalled 13 times, 22-113 s each. Two of them confirmed
        it once, and that decision was 44 s old at the fence (a stall) and refused, as it
        must be. Those stalls are faults: the stretch was not quiet while they lasted."""
        assert dead.death_t is not None
        watchers = self._watchers(dead)
        need = min(self.policy.confirm_observers, len(watchers))
        t, counted, step = dead.death_t, 0.0, 1.0
        while counted < bound and t < self.end:
            if sum(1 for w in watchers
                   if _able_through(w, t, t) and not _stalled_at(w, t)) >= need:
                counted += step
            t += step
        return t if counted >= bound else t + step  # past the end: not owed within the run


def _stalled_at(h: Host, t: float) -> bool:
    """Was ``h``'s main loop stalled in a call at ``t``? (Its stalls come one at a time.)"""
    i = bisect_right(h.stalls, (t, float("inf")))
    return i > 0 and h.stalls[i - 1][1] > t


def _able_through(h: Host, t0: float, t1: float) -> bool:
    """Ground truth: was ``h``'s agent up and able to heartbeat from ``t0`` to ``t1``?"""
    if h.unable_since is None and h.able_since <= t0:
        return True
    return any(a <= t0 and t1 <= b for a, b in h.able_spans)
