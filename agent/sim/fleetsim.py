"""Deterministic fleet simulation: the agent's real code, many members, virtual time, faults.

What runs is what ships: every member has a real ``Heartbeater``, ``PeerWatcher``
and ``HealController`` (``agent.daemon.tasks.MemberTasks``), talking to the real
``Store``/``Cloud`` adapters, whose boto3 clients are the in-memory twins of
``agent.sim.twins`` seen through a per-host fault layer. Nothing of the
controller, the leases or liveness is re-implemented here.

Each member process is two greenlets, as the daemon has two threads: the
heartbeat loop and the main loop (watch, then heal, every interval). Every call
an agent makes may *park* its greenlet on the virtual-time event queue (latency,
a stall, a timeout), so other members run meanwhile and a stalled observer wakes
up to a changed world, exactly the interleavings that matter for fencing. One
seed fixes everything: the same seed gives the same run, event for event.

The parts, one module each: ``agent.sim.world`` (hosts, ground truth, the result),
``agent.sim.vtime`` (the virtual-time scheduler and clocks), ``agent.sim.members`` (the
agent processes and their threads), ``agent.sim.calls`` (the fault layer on every call),
``agent.sim.faultplan`` (the seeded fault schedule), ``agent.sim.invariants`` (the
ground-truth checker and its invariants). This module puts them together and runs them.
"""

from __future__ import annotations

import gc
import heapq
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from greenlet import greenlet

from agent.sim.calls import CallFaults
from agent.sim.faultplan import FaultPlan
from agent.sim.faults import PROFILES, Profile
from agent.sim.invariants import Checker
from agent.sim.twins import CloudTwin, S3Twin
from agent.sim.world import (
    BUCKET,
    GROUP,
    MUTATING,
    S3_WRITES,
    T0,
    ZONES,
    Host,
    Killed,
    Let,
    Result,
    Violation,
    sim_config,
)

__all__ = ["BUCKET", "GROUP", "MUTATING", "S3_WRITES", "T0", "ZONES", "Host", "Killed", "Let",
           "Result", "Simulation", "Violation", "run", "sim_config", "summary",
           "timeline_around", "to_json"]

log = logging.getLogger(__name__)

# The collector's youngest threshold during a run (default 700): see ``Simulation.run``.
GC_YOUNG = 70_000
PROGRESS_EVERY_S = 3600.0  # how often a run with ``progress`` reports (simulated seconds)


class _Determinism:
    """Deterministic stand-ins for ``secrets.token_hex`` in the modules that use it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def token_hex(self, n: int = 16) -> str:
        return self.rng.getrandbits(8 * n).to_bytes(n, "big").hex()


class Simulation(FaultPlan, CallFaults, Checker):
    def __init__(self, seed: int, members: int, hours: float, profile: str | Profile = "calm",
                 *, interval_s: float = 10.0, dead_after_s: float = 30.0,
                 timeline: bool = True, stop_at_violation: bool = False,
                 progress: Callable[[float, Result], None] | None = None) -> None:
        from agent.heal.controller import policy_from_config
        from agent.heal.decide import HealPolicy

        self.seed = seed
        self.n = members
        self.hours = hours
        self.profile = PROFILES[profile] if isinstance(profile, str) else profile
        self.t = T0
        self.end = T0 + hours * 3600.0
        self.rng = random.Random(f"{seed}:world")  # faults and the world
        self.arng = random.Random(f"{seed}:agents")  # agents' own randomness
        self._q: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.hub = greenlet.getcurrent()
        self.config = sim_config(members, interval_s, dead_after_s)
        self.policy: HealPolicy = policy_from_config(self.config)
        self.interval = float(interval_s)
        self.dead_after = float(dead_after_s)
        self.s3 = S3Twin(lambda: self.t)
        self.s3.client().create_bucket(Bucket=BUCKET)
        self.cloud = CloudTwin(lambda: self.t, zones=ZONES, on_launch=self._on_launch,
                               on_state=self._on_state)
        self.hosts: dict[str, Host] = {}
        self.by_ip: dict[str, Host] = {}
        self.res = Result(seed, members, hours, self.profile.name)
        self.keep_timeline = timeline
        self.stop_at_violation = stop_at_violation
        # called with (simulated seconds, results so far) at each whole simulated hour: a long
        # run says how far it is and what it found so far (it reads the run, changes nothing)
        self.progress = progress
        self.zone_dark_until: dict[str, float] = {}
        # every outage of each zone, (dark from, lit again at), the last one ongoing or the
        # latest: the checker judges a call by the darkness when it was sent and landed
        self.zone_dark_spans: dict[str, list[tuple[float, float]]] = {}
        self.api_down_until = 0.0
        self.pause_set_at: float | None = None
        self.actions: list[tuple[float, str, str, str]] = []  # (t, actor, op, target)
        self.replaced_count: Counter = Counter()
        self.step_start: dict[str, float] = {}
        self.stepping: dict[str, list[str]] = {}
        self.replace_deadline = 0.0
        self.failed_replacements = 0
        self.freeze_seen: set[tuple[str, str]] = set()
        self.freeze_times: list[float] = []  # every group-scope freeze decision (liveness)
        # every decision that judged zones disrupted: (t, zones) (liveness, the zone rule)
        self.zone_holds: list[tuple[float, tuple[str, ...]]] = []
        self.zone_seen: set[tuple[str, tuple[str, ...]]] = set()
        self.fault_spans: list[tuple[float, float, str]] = []
        self._ips = 0
        self._admin_store: Any = None
        self.graveyard: list[Let] = []
        self._violated: set[tuple[str, str, str]] = set()
        self.adopted: dict[str, str] = {}  # launch -> the first member a lease named it for
        self.lost: set[str] = set()  # instances EC2 describes as NotFound (control-plane fault)
        self.lost_until = 0.0
        self.lost_since = 0.0
        # (actor, instance) -> (when EC2 last answered that actor NotFound for it through a
        # control-plane loss, when that loss began): what the actor's last look saw
        self.lost_looks: dict[tuple[str, str], tuple[float, float]] = {}
        self.errors: Counter = Counter()

    # -- the run --------------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """The Auto Scaling service's own loop, every 10 s."""
        self.cloud.reconcile()
        self.at(self.t + 10.0, self._reconcile)

    def run(self) -> Result:
        import agent.group.events as events_mod
        import agent.heal.controller as replace_mod

        det = _Determinism(random.Random(f"{self.seed}:tokens"))
        saved = (replace_mod.secrets, events_mod.secrets)
        replace_mod.secrets = det  # type: ignore[assignment]
        events_mod.secrets = det  # type: ignore[assignment]
        # The cyclic collector found next to nothing to free in a run (the agents' garbage
        # is freed by reference counting) yet cost ~20 % of the CPU walking a heap that grows
        # with N (issue #11): it runs ~100x less often during a run. Decisions never depend on
        # it (no finalizers; dead greenlets are kept in ``graveyard``): same runs byte for byte.
        thresholds = gc.get_threshold()
        gc.set_threshold(max(thresholds[0], GC_YOUNG), *thresholds[1:])
        try:
            self._run()
        finally:
            replace_mod.secrets, events_mod.secrets = saved
            gc.set_threshold(*thresholds)
        return self.res

    def _run(self) -> None:
        ids = self.cloud.create_group(GROUP, self.n, sorted(ZONES), grace_s=120.0,
                                      state="running")
        for i, iid in enumerate(ids):
            h = self.hosts[iid]
            self.at(T0 + (i % 97) * self.interval / 97.0, lambda h=h: self.start(h))
        self._schedule_faults()
        self.at(T0 + 10.0, self._reconcile)
        self.at(T0 + 30.0, self._track_failures)
        q = self._q
        report_at = T0 + PROGRESS_EVERY_S if self.progress is not None else math.inf
        while q:
            t, _, fn = heapq.heappop(q)
            if t > self.end:
                break
            while t >= report_at:  # every whole hour, even one without an event
                assert self.progress is not None
                self.progress(report_at - T0, self.res)
                report_at += PROGRESS_EVERY_S
            self.t = t
            fn()
            if self.stop_at_violation and self.res.violations:
                return
        self.t = self.end
        self._final_checks()


def run(seed: int, members: int, hours: float, profile: str = "calm", **kw: Any) -> Result:
    return Simulation(seed, members, hours, profile, **kw).run()


def summary(res: Result) -> str:
    kinds = Counter(v.kind for v in res.violations)
    lines = [
        f"seed {res.seed}  members {res.members}  hours {res.hours:g}  faults {res.profile}",
        f"deaths {res.deaths}  replacements {res.replacements}  "
        f"false replacements {res.false_replacements}  freezes {res.freezes}",
        f"faults injected {sum(res.faults.values())} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(res.faults.items())) or 'none'})",
        f"invariant checks {res.checks}  actions {res.actions}  agent steps {res.steps}  "
        f"calls {res.calls}",
        f"violations {len(res.violations)}"
        + (f" ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})" if kinds else ""),
    ]
    return "\n".join(lines)


def timeline_around(res: Result, t: float, before: float = 300.0, after: float = 30.0,
                    member: str = "") -> str:
    out = []
    for ts, kind, m, detail in res.timeline:
        if t - before <= ts <= t + after and (not member or m in ("", member)
                                              or member in detail):
            out.append(f"  {ts - T0:10.2f}s  {kind:<18} {m:<22} {detail}")
    return "\n".join(out[-60:])


def to_json(res: Result) -> str:
    return json.dumps(res.to_json(), sort_keys=True)
