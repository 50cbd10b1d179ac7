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

Ground truth is kept beside the agents, never read by them: which processes are
up, stopped or dead, who can reach the store, which zone is dark. Invariants are
checked when each mutating cloud call lands and at the end of the run:

* ``false-action``: no terminate/mark/replace of an instance whose agent was up
  and able to heartbeat within ``dead_after_s`` of the call being sent (after the
  actor's fence; a target that comes back while the request is in transit, which no
  client can fence, is noted ``landed-late`` in the timeline);
* ``zone``: nothing done to a member of a zone that is dark (network) at the time;
* ``double-replacement``: at most one replacement per death;
* ``rate-limit``: at most ``2 × max_per_window`` actions in any ``window_s``
  (the budget is fixed windows: two can touch), group-wide;
* ``in-flight``: actions whose replacement has not heartbeated yet stay within
  ``in_flight_cap(group)`` group-wide;
* ``paused`` / ``frozen``: nothing done in a step that started while the kill
  switch was present, nor in a step whose decision was frozen;
* ``exiled``: a member whose instance still runs and that nobody acted on never
  steps down as superseded;
* ``unjustified-freeze``: a ``failed-replacements`` freeze needs that many
  replacements that really never heartbeated;
* ``liveness``: a death in a quiet stretch (no other fault, budget left) is
  replaced within ``bound_s``, or some observer recorded a freeze, or judged the
  member's zone disrupted (the zone rule, docs/safety.md 15);
* ``freeze-stuck``: a freeze whose every reason is transient (API failing, own
  writes failing, paused, fresh) has lifted 600 s after the last fault cleared.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from greenlet import greenlet

from agent.clock import Clock
from agent.group.heartbeat import Heartbeater, next_interval
from agent.group.membership import MemberRecord
from agent.sim.faults import PROFILES, Profile
from agent.sim.twins import ClientProxy, CloudTwin, S3Twin, TwinInstance

log = logging.getLogger(__name__)

T0 = 1_800_000_000.0
BUCKET = "sim"
GROUP = "sim"
ZONES = {"subnet-a": "us-east-1a", "subnet-b": "us-east-1b", "subnet-c": "us-east-1c"}
MUTATING = frozenset({"terminate_instances", "terminate_instance_in_auto_scaling_group",
                      "set_instance_health", "run_instances"})
S3_WRITES = frozenset({"put_object", "delete_object"})


class Killed(BaseException):
    """Thrown into the greenlets of a process that crashed: it never runs again."""


class SimClock(Clock):
    """A host's clocks: the wall clock may be skewed and jump; monotonic never does."""

    def __init__(self, sim: Simulation, host: Host) -> None:
        self.sim = sim
        self.host = host

    def time(self) -> float:
        return self.sim.t + self.host.skew

    def monotonic(self) -> float:
        return self.sim.t - self.host.boot_t + 100.0

    def sleep(self, seconds: float) -> None:
        self.sim.park(max(0.0, seconds))


class Let(greenlet):
    """One agent thread: knows its host and process generation."""

    host: Host
    gen: int
    role: str


@dataclass
class Host:
    iid: str
    subnet: str
    zone: str
    ip: str
    boot_t: float = 0.0
    gen: int = 0
    proc: str = "down"  # down | up | stopped | dead (never again)
    skew: float = 0.0
    store_cut_until: float = 0.0
    peer_cut_until: float = 0.0
    unable_since: float | None = 0.0  # ground truth: None while up and able to heartbeat
    tasks: Any = None
    lets: list[Let] = field(default_factory=list)
    deferred: list[Let] = field(default_factory=list)
    left: bool = False
    replaces: str = ""
    launched: float = 0.0
    first_beat: float | None = None
    acted_on: bool = False
    death_t: float | None = None
    death_kind: str = ""
    freeze_reasons: tuple[str, ...] = ()


@dataclass
class Violation:
    t: float
    kind: str
    detail: str
    member: str = ""
    actor: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"t": round(self.t - T0, 3), "kind": self.kind, "member": self.member,
                "actor": self.actor, "detail": self.detail}


@dataclass
class Result:
    seed: int
    members: int
    hours: float
    profile: str
    deaths: int = 0
    replacements: int = 0
    false_replacements: int = 0
    violations: list[Violation] = field(default_factory=list)
    freezes: int = 0
    faults: Counter = field(default_factory=Counter)
    checks: int = 0
    actions: int = 0
    calls: int = 0
    steps: int = 0
    timeline: list[tuple[float, str, str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "members": self.members, "hours": self.hours,
                "profile": self.profile, "deaths": self.deaths,
                "replacements": self.replacements,
                "false_replacements": self.false_replacements,
                "violations": [v.to_json() for v in self.violations],
                "freezes": self.freezes, "faults": dict(sorted(self.faults.items())),
                "checks": self.checks, "actions": self.actions, "calls": self.calls,
                "steps": self.steps}


def sim_config(members: int, interval_s: float = 10.0, dead_after_s: float = 30.0) -> Any:
    """The agent config every simulated member runs with (the product's defaults, heal armed)."""
    from agent.config.model import load_layers

    cap = max(1, math.floor(0.1 * members + 1e-9))
    return load_layers(None, {
        "group": GROUP, "store": {"bucket": BUCKET, "prefix": ""},
        "heartbeat": {"interval_s": interval_s, "dead_after_s": dead_after_s},
        "heal": {"mode": "armed", "action": "asg-terminate", "grace_s": 120,
                 "max_per_window": 2 * cap + 1, "window_s": 300, "confirm_observers": 2,
                 "silent_after_s": 120},
    })


class _Determinism:
    """Deterministic stand-ins for ``secrets.token_hex`` in the modules that use it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def token_hex(self, n: int = 16) -> str:
        return self.rng.getrandbits(8 * n).to_bytes(n, "big").hex()


class Simulation:
    def __init__(self, seed: int, members: int, hours: float, profile: str | Profile = "calm",
                 *, interval_s: float = 10.0, dead_after_s: float = 30.0,
                 timeline: bool = True, stop_at_violation: bool = False) -> None:
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
        self.zone_dark_until: dict[str, float] = {}
        self.zone_dark_since: dict[str, float] = {}
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
        self.lost: set[str] = set()  # instances EC2 describes as NotFound (control-plane fault)
        self.lost_until = 0.0
        self.errors: Counter = Counter()

    # -- the event queue ------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._q, (t, self._seq, fn))

    def park(self, seconds: float) -> None:
        """Suspend the calling agent greenlet for ``seconds`` of virtual time."""
        g = greenlet.getcurrent()
        if g is self.hub:
            raise RuntimeError("park() outside an agent greenlet")
        self.at(self.t + seconds, lambda: self._resume(g))  # type: ignore[arg-type]
        self.hub.switch()

    def _resume(self, g: Let) -> None:
        h = g.host
        if g.dead or g.gen != h.gen or h.proc in ("down", "dead"):
            return
        if h.proc == "stopped":
            h.deferred.append(g)
            return
        g.switch()

    def note(self, kind: str, member: str = "", detail: str = "") -> None:
        if self.keep_timeline:
            self.res.timeline.append((self.t, kind, member, detail))

    # -- hosts and processes --------------------------------------------------------------------
    def _on_launch(self, inst: TwinInstance, replaces: str) -> None:
        self._ips += 1
        ip = f"10.{(self._ips >> 16) & 255}.{(self._ips >> 8) & 255}.{self._ips & 255}"
        h = Host(inst.instance_id, inst.subnet_id, inst.az, ip, replaces=replaces,
                 launched=self.t)
        self.hosts[h.iid] = h
        self.by_ip[ip] = h
        if replaces:
            self.replaced_count[replaces] += 1
            self.res.replacements += 1
            self.note("replacement", h.iid, f"replaces {replaces}")
            if self.replaced_count[replaces] > 1:
                self.violate("double-replacement", replaces,
                             f"{self.replaced_count[replaces]} replacements launched for it")
        if self.t > T0:  # launched during the run: boots, then its agent starts
            self.at(self.t + self.cloud.boot_s + 10.0, lambda: self.start(h))

    def _on_state(self, inst: TwinInstance, state: str) -> None:
        h = self.hosts.get(inst.instance_id)
        if h is None:
            return
        if state in ("shutting-down", "terminated", "stopped") and h.proc != "dead":
            self.note("instance-" + state, h.iid)
            self.kill(h, for_good=True, why=f"instance {state}")

    def start(self, h: Host) -> None:
        """Start (or restart) the agent process: a fresh memory, the real parts."""
        from agent.daemon.tasks import MemberTasks
        from agent.heal.controller import HealController

        inst = self.cloud.instances.get(h.iid)
        if h.proc == "dead" or inst is None or inst.state not in ("running", "pending"):
            return
        h.gen += 1
        h.proc = "up"
        if h.boot_t == 0.0:
            h.boot_t = self.t
        clock = SimClock(self, h)
        store = self.store_for(h)
        cloud = self.cloud_for(h)
        prev_seq = 0
        obj = self.s3.buckets[BUCKET].get(f"groups/{GROUP}/members/{h.iid}.json")
        if obj is not None:
            prev_seq = MemberRecord.loads(obj.body).seq
        rec = MemberRecord(instance_id=h.iid, group=GROUP, seq=prev_seq, state="ready",
                           az=h.zone, private_ip=h.ip, endpoint=f"http://{h.ip}:8080",
                           image_id="ami-twin", agent_version="sim")
        hb = Heartbeater(store, rec, clock=clock, interval_s=self.interval,
                         rng=random.Random(self.arng.getrandbits(64)))
        from agent.group.peers import PeerWatcher

        watcher = PeerWatcher(store, GROUP, h.iid, clock=clock)
        ctl = HealController(store, cloud, self.config, h.iid, clock, policy=self.policy,
                             watcher=watcher, probe=self.probe)
        self.replace_deadline = ctl.replace_deadline_s
        h.tasks = MemberTasks(hb, watcher, ctl)
        h.lets = []
        for role, fn in (("beat", self._beat_loop), ("main", self._main_loop)):
            g = Let(self._guard(fn), self.hub)
            g.host, g.gen, g.role = h, h.gen, role
            h.lets.append(g)
            self.at(self.t + (0.0 if role == "beat" else 0.2), lambda g=g: self._resume(g))
        self._able(h)
        self.note("start", h.iid, f"process generation {h.gen}")

    def kill(self, h: Host, *, for_good: bool, why: str) -> None:
        if h.proc == "dead":
            return
        h.proc = "dead" if for_good else "down"
        h.gen += 1
        h.deferred.clear()
        # Kept, never resumed: a collected greenlet would unwind the agent's code at GC time.
        self.graveyard.extend(g for g in h.lets if not g.dead)
        h.lets = []
        self._able(h)
        self.note("kill" if for_good else "crash", h.iid, why)

    def stop(self, h: Host) -> None:
        if h.proc == "up":
            h.proc = "stopped"
            self._able(h)
            self.note("sigstop", h.iid)

    def cont(self, h: Host) -> None:
        if h.proc == "stopped":
            h.proc = "up"
            self._able(h)
            self.note("sigcont", h.iid)
            waiting, h.deferred = h.deferred, []
            for g in waiting:
                self.at(self.t, lambda g=g: self._resume(g))

    def store_reachable(self, h: Host) -> bool:
        return self.t >= h.store_cut_until and self.t >= self.zone_dark_until.get(h.zone, 0.0)

    def _able(self, h: Host) -> None:
        """Ground truth: is this member's agent up and able to heartbeat right now?"""
        able = h.proc == "up" and not h.left and self.store_reachable(h)
        if able and h.unable_since is not None:
            h.unable_since = None
        elif not able and h.unable_since is None:
            h.unable_since = self.t

    def _recheck_later(self, h: Host, t: float) -> None:
        self.at(t, lambda: self._able(h))

    # -- the agents' threads --------------------------------------------------------------------
    def _guard(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """An exception escaping the agent's code is a finding: recorded, the thread ends."""
        def run() -> None:
            try:
                fn()
            except Exception as exc:  # the daemon logs and retries; here it is a finding
                g: Let = greenlet.getcurrent()  # type: ignore[assignment]
                what = f"{type(exc).__name__}: {exc}"[:300]
                self.errors[type(exc).__name__] += 1
                self.violate("agent-error", g.host.iid, f"{g.role} thread: {what}")
        return run

    def _beat_loop(self) -> None:
        g: Let = greenlet.getcurrent()  # type: ignore[assignment]
        h = g.host
        tasks = h.tasks
        rng = tasks.hb.rng
        while True:
            try:
                res = tasks.heartbeat()
            except Exception as exc:  # the daemon logs it and retries at the next period
                self._task_error(h, "heartbeat", exc)
                self.park(self.interval)
                continue
            if res is None:
                return
            if res.ok and h.first_beat is None:
                h.first_beat = self.t
                self.note("first-beat", h.iid)
            self.res.steps += 1
            self.park(next_interval(self.interval, rng.random()))

    def _main_loop(self) -> None:
        g: Let = greenlet.getcurrent()  # type: ignore[assignment]
        h = g.host
        tasks = h.tasks
        while tasks.active:
            self.step_start[h.iid] = self.t
            self.stepping[h.iid] = []
            try:
                tasks.watch()
                decision = tasks.heal()
            except Exception as exc:  # the daemon logs it and retries at the next period
                self._task_error(h, "watch/heal", exc)
                decision = None
            acted = self.stepping.pop(h.iid, [])
            self.res.steps += 1
            if decision is not None:
                self._after_step(h, decision, acted)
            if tasks.superseded:
                self._exiled(h)
                return
            self.park(self.interval)

    def _task_error(self, h: Host, task: str, exc: Exception) -> None:
        """The controller's contract: store and cloud trouble is recorded, never raised."""
        self.errors[type(exc).__name__] += 1
        self.note("task-error", h.iid, f"{task}: {type(exc).__name__}: {exc}"[:300])
        self.violate("agent-error", h.iid, f"{task} step raised {type(exc).__name__}: {exc}"[:300])

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

    # -- the fault layer: every call an agent makes ---------------------------------------------
    def _caller(self) -> Let:
        g = greenlet.getcurrent()
        if g is self.hub:
            raise RuntimeError("agent call outside an agent greenlet")
        return g  # type: ignore[return-value]

    def store_for(self, h: Host) -> Any:
        from agent.aws.store import Store

        def call(op: str, kw: dict[str, Any]) -> dict[str, Any]:
            return self._s3_call(op, kw)

        return Store(BUCKET, "", client=ClientProxy(call, S3Twin.OPS))

    def _fault(self, kind: str) -> None:
        self.res.faults[kind] += 1

    def _s3_call(self, op: str, kw: dict[str, Any]) -> dict[str, Any]:
        g = self._caller()
        h = g.host
        p = self.profile
        r = self.rng
        self.res.calls += 1
        if not self.store_reachable(h):
            self.park(2.0)
            raise EndpointConnectionError(endpoint_url="https://s3.sim")
        if p.store_error and r.random() < p.store_error:
            self._fault("store-error")
            self.park(0.05)
            code = "SlowDown" if r.random() < 0.5 else "InternalError"
            raise ClientError({"Error": {"Code": code, "Message": "injected"},
                               "ResponseMetadata": {"HTTPStatusCode": 503 if code == "SlowDown"
                                                    else 500}}, op)
        if p.store_latency and r.random() < p.store_latency:
            self._fault("store-latency")
            self.park(r.uniform(0.1, 3.0))
        if p.call_stall and g.role == "main" and r.random() < p.call_stall:
            self._fault("call-stall")
            self.park(r.uniform(20.0, 120.0))
        if g.gen != h.gen:
            raise Killed()
        resp = self.s3.call(op, kw)
        if op == "put_object" and self.keep_timeline:
            self._note_write(h, kw)
        if p.lost_response and op in S3_WRITES and r.random() < p.lost_response:
            self._fault("lost-response")
            self.park(1.0)
            raise ReadTimeoutError(endpoint_url="https://s3.sim")
        return resp

    def _note_write(self, h: Host, kw: dict[str, Any]) -> None:
        key: str = kw["Key"]
        if "/suspicions/" in key:
            member, observer = key.rsplit("/", 2)[-2:]
            self.note("suspicion", member, f"by {observer}")
        elif "/leases/" in key:
            try:
                state = json.loads(kw["Body"]).get("state", "?")
            except (ValueError, AttributeError):
                state = "?"
            self.note("lease", key.rsplit("/", 1)[-1], f"{state} by {h.iid}")

    def cloud_for(self, h: Host) -> Any:
        from agent.aws.cloud import Cloud

        def ec2(op: str, kw: dict[str, Any]) -> dict[str, Any]:
            return self._cloud_call(op, kw)

        return Cloud("us-east-1", ec2=ClientProxy(ec2, CloudTwin.EC2_OPS),
                     autoscaling=ClientProxy(ec2, CloudTwin.ASG_OPS))

    def _cloud_call(self, op: str, kw: dict[str, Any]) -> dict[str, Any]:
        g = self._caller()
        h = g.host
        p = self.profile
        r = self.rng
        self.res.calls += 1
        if self.t < self.api_down_until or self.t < self.zone_dark_until.get(h.zone, 0.0):
            self.park(2.0)
            raise EndpointConnectionError(endpoint_url="https://ec2.sim")
        if p.cloud_error and r.random() < p.cloud_error:
            self._fault("cloud-error")
            self.park(0.1)
            code = r.choice(("Throttling", "RequestLimitExceeded", "InternalError"))
            raise ClientError({"Error": {"Code": code, "Message": "injected"},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, op)
        # Ground truth as it was when the call was sent, i.e. right after the actor's fence
        # (docs/safety.md 12): an action-stall below holds the request in transit, past the
        # last point where any client can check anything. EC2 has no conditional terminate
        # (no fencing token), so a member that comes back while the request is in flight is
        # beyond the controller's reach; false-action judges the state the actor sent into.
        sent_t = self.t
        sent = ({k: x.unable_since for k, x in self.hosts.items()} if op in MUTATING
                else {})
        if op in MUTATING and p.action_stall and r.random() < p.action_stall:
            self._fault("action-stall")
            self.park(r.uniform(20.0, 120.0))
        if g.gen != h.gen:
            raise Killed()
        ids = kw.get("InstanceIds") or []
        if op == "describe_instances" and (
                (self.t < self.lost_until and self.lost.intersection(ids))
                or (p.wrong_describe and r.random() < p.wrong_describe)):
            self._fault("wrong-describe")
            raise ClientError({"Error": {"Code": "InvalidInstanceID.NotFound",
                                         "Message": f"The instance ID '{','.join(ids)}' "
                                                    "does not exist"},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, op)
        if op not in MUTATING:
            return self.cloud.call(op, kw)
        # ...and before its own effects (a terminate kills the target's agent inside the
        # call). A target that came back while the call was in transit is noted, not judged.
        landed = {k: x.unable_since for k, x in self.hosts.items()}
        for k, u in sent.items():
            if u is not None and landed.get(k) is None:
                self.note("landed-late", k, f"{op} by {h.iid}: sent while it was unable, "
                          "landed after it came back")
        resp = self.cloud.call(op, kw)
        self._on_action(h, op, kw, sent, sent_t)
        return resp

    def probe(self, endpoint: str) -> bool | None:
        """The real controller's probe seam: does the member's agent answer over the network?"""
        g = self._caller()
        src = g.host
        ip = endpoint.split("//", 1)[-1].split(":", 1)[0] if endpoint else ""
        dst = self.by_ip.get(ip)
        if dst is None:
            return None
        ok = (dst.proc == "up" and self.t >= dst.peer_cut_until and self.t >= src.peer_cut_until
              and self.t >= self.zone_dark_until.get(dst.zone, 0.0)
              and self.t >= self.zone_dark_until.get(src.zone, 0.0))
        inst = self.cloud.instances.get(dst.iid)
        ok = ok and inst is not None and inst.state == "running"
        self.park(0.01 if ok else 2.0)
        return ok

    # -- invariants at every mutating call ------------------------------------------------------
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

    def _on_action(self, actor: Host, op: str, kw: dict[str, Any],
                   before: dict[str, float | None], sent_t: float) -> None:
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
            self._check_action(actor, op, m, before.get(m), sent_t)

    def _check_action(self, actor: Host, op: str, m: str, unable_since: float | None,
                      sent_t: float) -> None:
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
        if unable_since is None or sent_t - unable_since < self.dead_after:
            since = ("when the call was sent" if unable_since is None
                     else f"until {sent_t - unable_since:.1f}s before the call was sent")
            self.violate("false-action", m, f"{op}: its agent was alive and able to heartbeat "
                         f"{since} (dead_after {self.dead_after:g}s)", actor.iid)
        dark = max(self.zone_dark_until.get(h.zone, 0.0), 0.0)
        since_dark = self.zone_dark_since.get(h.zone)
        # While dark, nothing; for dead_after after the lights come back, nothing whose agent
        # is up (its heartbeat may not have landed yet). A target whose agent is dead is an
        # ordinary death once the zone is lit and its other members answer again: the zone
        # rule heals it (docs/safety.md 15), the controller cannot and need not wait longer.
        lit_grace = t >= dark and h.proc == "dead"
        if since_dark is not None and since_dark <= t < dark + self.dead_after and not lit_grace:
            self.violate("zone", m, f"{op} against a member of {h.zone}, which is dark "
                         f"(network outage since {since_dark - T0:.0f}s)", actor.iid)
        start = self.step_start.get(actor.iid, t)
        if self.pause_set_at is not None and self.pause_set_at < start - 1.0:
            self.violate("paused", m, f"{op} in a step that began after the kill switch was "
                         f"set ({self.pause_set_at - T0:.0f}s)", actor.iid)
        window = [a for a in self.actions if a[0] > t - self.policy.window_s]
        if len(window) > 2 * self.policy.max_per_window:
            self.violate("rate-limit", m, f"{len(window)} actions within {self.policy.window_s:g}s"
                         f" (max_per_window {self.policy.max_per_window})", actor.iid)
        group = sum(1 for x in self.hosts.values() if x.proc != "dead" and not x.left)
        cap = self.policy.in_flight_cap(max(group, 1))
        in_flight = self._in_flight(t) - 1
        if in_flight + 1 > max(cap, 1):
            self.violate("in-flight", m, f"{in_flight + 1} replacements in flight, cap {cap} for "
                         f"{group} members", actor.iid)

    def _in_flight(self, t: float) -> int:
        """Actions whose target's replacement has not heartbeated yet (and is not overdue)."""
        n = 0
        seen: set[str] = set()
        for at, _, _, m in reversed(self.actions):
            if t - at > self.replace_deadline:
                break
            if m in seen:
                continue
            seen.add(m)
            arrived = any(x.replaces == m and x.first_beat is not None
                          for x in self.hosts.values())
            if not arrived:
                n += 1
        return n

    # -- faults from the seed -------------------------------------------------------------------
    def _poisson(self, rate_per_hour: float, what: str, fn: Callable[[], None]) -> None:
        """Schedule ``fn`` as a Poisson process; each kind has its own stream, so a shorter
        run with the same seed is a prefix of the longer one."""
        if rate_per_hour <= 0:
            return
        rng = random.Random(f"{self.seed}:{what}")
        t = T0 + 60.0
        while True:
            t += rng.expovariate(rate_per_hour / 3600.0)
            if t >= self.end:
                return
            self.at(t, fn)

    def _pick(self) -> Host | None:
        live = [h for h in self.hosts.values()
                if h.proc in ("up", "stopped") and not h.left and h.first_beat is not None]
        if not live:
            return None
        live.sort(key=lambda h: h.iid)
        return self.rng.choice(live)

    def _schedule_faults(self) -> None:
        p = self.profile
        n = self.n
        per_member = [
            ("death", p.death, self._f_death), ("hang", p.hang, self._f_hang),
            ("crash", p.crash, self._f_crash), ("pause", p.pause, self._f_pause),
            ("terminated", p.terminated, self._f_terminated),
            ("asg-replace", p.asg_replace, self._f_asg_replace), ("spot", p.spot, self._f_spot),
            ("scale-in", p.scale_in, self._f_scale_in), ("store-cut", p.store_cut,
                                                          self._f_store_cut),
            ("peer-cut", p.peer_cut, self._f_peer_cut), ("clock-jump", p.clock_jump,
                                                          self._f_clock_jump),
        ]
        for name, rate, fn in per_member:
            self._poisson(rate * n, name, self._wrap(name, fn))
        for name, rate, fn in (("zone-outage", p.zone_outage_ph, self._f_zone),
                               ("mass-kill", p.mass_kill_ph, self._f_mass_kill),
                               ("api-outage", p.api_outage_ph, self._f_api),
                               ("operator-pause", p.operator_pause_ph, self._f_pause_op),
                               ("pair-death", p.pair_death_ph, self._f_pair_death),
                               ("control-plane", p.control_plane_ph, self._f_control_plane)):
            self._poisson(rate, name, self._wrap(name, fn, member=False))

    def _wrap(self, name: str, fn: Callable[[Host], float] | Callable[[], float], *,
              member: bool = True) -> Callable[[], None]:
        def run() -> None:
            if member:
                h = self._pick()
                if h is None:
                    return
                span = fn(h)  # type: ignore[call-arg]
                who = h.iid
            else:
                span = fn()  # type: ignore[call-arg]
                who = ""
            self._fault(name)
            self.fault_spans.append((self.t, self.t + span, name))
            self.note("fault", who, name)
        return run

    def _death(self, h: Host, kind: str) -> None:
        if h.death_t is None:
            h.death_t = self.t
            h.death_kind = kind
            self.res.deaths += 1

    def _f_death(self, h: Host) -> float:
        self._death(h, "agent-dead")
        self.kill(h, for_good=True, why="agent died (instance keeps running)")
        return 0.0

    def _f_hang(self, h: Host) -> float:
        self._death(h, "hang")
        self.stop(h)
        return 0.0

    def _f_crash(self, h: Host) -> float:
        self.kill(h, for_good=False, why="crash")
        self.at(self.t + 5.0, lambda: self.start(h) if h.proc == "down" else None)
        return 5.0

    def _f_pause(self, h: Host) -> float:
        d = self.rng.uniform(10.0, 240.0)
        self.stop(h)
        self.at(self.t + d, lambda: self.cont(h))
        return d

    def _f_terminated(self, h: Host) -> float:
        self._death(h, "terminated")
        self.cloud.call("terminate_instances", {"InstanceIds": [h.iid]})
        return 0.0

    def _f_asg_replace(self, h: Host) -> float:
        """A member hangs; the ASG's own (ELB) health check replaces it a minute later."""
        self._death(h, "hang+asg")
        self.stop(h)

        def mark() -> None:
            g = self.cloud.groups.get(self.cloud.member_of.get(h.iid, ""))
            if g is not None:
                g.health[h.iid] = "Unhealthy"
                self.note("asg-marks", h.iid, "the ASG's own health check")
        self.at(self.t + self.rng.uniform(40.0, 90.0), mark)
        return 90.0

    def _f_spot(self, h: Host) -> float:
        self._leave(h, "spot interruption notice")
        self.at(self.t + 120.0, lambda: self.cloud.call("terminate_instances",
                                                        {"InstanceIds": [h.iid]}))
        return 120.0

    def _f_scale_in(self, h: Host) -> float:
        name = self.cloud.member_of.get(h.iid)
        if name is None:
            return 0.0
        self._leave(h, "auto scaling target lifecycle state: Terminated")

        def go() -> None:
            self.cloud.call("terminate_instance_in_auto_scaling_group",
                            {"InstanceId": h.iid, "ShouldDecrementDesiredCapacity": True})
        self.at(self.t + 30.0, go)
        return 30.0

    def _leave(self, h: Host, reason: str) -> None:
        if h.proc != "up" or h.tasks is None or not h.tasks.active:
            return
        tasks = h.tasks
        g = Let(self._guard(lambda: tasks.leave(reason)), self.hub)
        g.host, g.gen, g.role = h, h.gen, "leave"
        h.lets.append(g)
        g.switch()
        h.left = True
        self._able(h)
        self.note("leave", h.iid, reason)

    def _f_store_cut(self, h: Host) -> float:
        d = self.rng.uniform(20.0, 200.0)
        h.store_cut_until = max(h.store_cut_until, self.t + d)
        self._able(h)
        self._recheck_later(h, h.store_cut_until)
        return d

    def _f_peer_cut(self, h: Host) -> float:
        d = self.rng.uniform(20.0, 300.0)
        h.peer_cut_until = max(h.peer_cut_until, self.t + d)
        return d

    def _f_clock_jump(self, h: Host) -> float:
        h.skew += self.rng.uniform(-600.0, 600.0)
        return 0.0

    def _f_zone(self) -> float:
        zone = self.rng.choice(sorted(set(ZONES.values())))
        d = self.rng.uniform(120.0, 900.0)
        if self.zone_dark_until.get(zone, 0.0) < self.t:
            self.zone_dark_since[zone] = self.t
        self.zone_dark_until[zone] = max(self.zone_dark_until.get(zone, 0.0), self.t + d)
        for h in self.hosts.values():
            if h.zone == zone:
                self._able(h)
                self._recheck_later(h, self.zone_dark_until[zone])
        self.note("zone-dark", "", zone)
        return d

    def _f_mass_kill(self) -> float:
        live = sorted((h for h in self.hosts.values() if h.proc == "up" and not h.left),
                      key=lambda h: h.iid)
        for h in self.rng.sample(live, int(len(live) * 0.4)):
            self._death(h, "mass-kill")
            self.kill(h, for_good=True, why="mass kill")
        return 0.0

    def _f_pair_death(self) -> float:
        live = sorted((h for h in self.hosts.values()
                       if h.proc == "up" and not h.left and h.first_beat is not None),
                      key=lambda h: h.iid)
        for h in self.rng.sample(live, min(2, len(live))):
            self._death(h, "pair-death")
            self.kill(h, for_good=True, why="died with another member")
        return 0.0

    def _f_control_plane(self) -> float:
        """The 2007 incident: EC2 loses track of running instances for a while."""
        d = self.rng.uniform(300.0, 900.0)
        ids = sorted(i for i, x in self.cloud.instances.items() if x.state == "running")
        self.lost = set(self.rng.sample(ids, len(ids) * 3 // 10))
        self.lost_until = self.t + d
        return d

    def _f_api(self) -> float:
        d = self.rng.uniform(60.0, 600.0)
        self.api_down_until = max(self.api_down_until, self.t + d)
        return d

    def _f_pause_op(self) -> float:
        from agent.clock import FakeClock
        from agent.heal import leases

        d = self.rng.uniform(60.0, 600.0)
        clock = FakeClock(now=self.t)
        leases.pause(self._admin(), GROUP, "operator", "simulated operator pause", clock=clock)
        self.pause_set_at = self.t

        def lift() -> None:
            clock.now = self.t
            leases.resume(self._admin(), GROUP, "operator", "simulated operator resume",
                          clock=clock)
            self.pause_set_at = None
        self.at(self.t + d, lift)
        return d

    def _admin(self) -> Any:
        from agent.aws.store import Store

        if self._admin_store is None:
            self._admin_store = Store(BUCKET, "", client=self.s3.client())
        return self._admin_store

    # -- the run --------------------------------------------------------------------------------
    def _reconcile(self) -> None:
        """The Auto Scaling service's own loop, every 10 s."""
        self.cloud.reconcile()
        self.at(self.t + 10.0, self._reconcile)

    def _track_failures(self) -> None:
        """Ground truth for the failure streak: replacements that never heartbeated in time."""
        if self.replace_deadline:
            d = self.replace_deadline
            self.failed_replacements = sum(
                1 for h in self.hosts.values() if h.replaces and (
                    (h.first_beat is None and self.t - h.launched >= d)
                    or (h.first_beat is not None and h.first_beat - h.launched >= d)))
        self.at(self.t + 30.0, self._track_failures)

    def run(self) -> Result:
        import agent.group.events as events_mod
        import agent.heal.controller as replace_mod

        det = _Determinism(random.Random(f"{self.seed}:tokens"))
        saved = (replace_mod.secrets, events_mod.secrets)
        replace_mod.secrets = det  # type: ignore[assignment]
        events_mod.secrets = det  # type: ignore[assignment]
        try:
            self._run()
        finally:
            replace_mod.secrets, events_mod.secrets = saved
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
        while q:
            t, _, fn = heapq.heappop(q)
            if t > self.end:
                break
            self.t = t
            fn()
            if self.stop_at_violation and self.res.violations:
                return
        self.t = self.end
        self._final_checks()

    def _check_freezes_lift(self) -> None:
        """A freeze whose causes are transient (API, store, pause) lifts once they clear."""
        transient = ("api-failing", "observer-sick", "paused", "observer-fresh")
        p = self.profile
        if any((p.store_error, p.store_latency, p.lost_response, p.call_stall, p.cloud_error,
                p.action_stall, p.wrong_describe)):
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
            t0, t1 = h.death_t - self.dead_after, h.death_t + bound
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
            self.violate("liveness", h.iid, f"died at {h.death_t - T0:.0f}s ({h.death_kind}), "
                         f"not replaced within {bound:.0f}s in a quiet stretch and no freeze "
                         f"recorded")


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
