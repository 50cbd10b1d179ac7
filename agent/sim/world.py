"""The simulated world: hosts, their agent processes and threads, the run's result.

Ground truth lives here, beside the agents and never read by them: which processes are up,
stopped or dead, who can reach the store, which zone is dark (``Host``). ``SimBase`` names
the state every part of the simulation shares (``agent.sim.fleetsim.Simulation`` sets it up)
and the two things every part does: write the timeline and count a fault.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from greenlet import greenlet

from agent.sim.faults import Profile

T0 = 1_800_000_000.0
BUCKET = "sim"
GROUP = "sim"
ZONES = {"subnet-a": "us-east-1a", "subnet-b": "us-east-1b", "subnet-c": "us-east-1c"}
MUTATING = frozenset({"terminate_instances", "terminate_instance_in_auto_scaling_group",
                      "set_instance_health", "run_instances"})
S3_WRITES = frozenset({"put_object", "delete_object"})


class Killed(BaseException):
    """Thrown into the greenlets of a process that crashed: it never runs again."""


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
    able_since: float = 0.0  # ground truth: since when, while able
    able_spans: list[tuple[float, float]] = field(default_factory=list)  # (from, to), ended
    resumed_at: float = -1.0  # when its agent was last SIGCONTed (a held probe answers then)
    stalls: list[tuple[float, float]] = field(default_factory=list)  # main-loop call stalls
    tasks: Any = None
    lets: list[Let] = field(default_factory=list)
    deferred: list[Let] = field(default_factory=list)
    left: bool = False
    replaces: str = ""
    launched: float = 0.0
    first_beat: float | None = None
    # ground truth: when its first heartbeat landed in the store (the agent may learn later,
    # or never: a slow marker announce after it, a lost answer); peers can see it from then
    beat_landed: float | None = None
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


class SimBase:
    """The state the parts of one simulation share (set up by ``Simulation.__init__``)."""

    seed: int
    n: int
    hours: float
    profile: Profile
    t: float
    end: float
    interval: float
    dead_after: float
    hosts: dict[str, Host]
    by_ip: dict[str, Host]
    res: Result
    keep_timeline: bool
    zone_dark_until: dict[str, float]
    zone_dark_spans: dict[str, list[tuple[float, float]]]
    api_down_until: float
    pause_set_at: float | None
    hub: greenlet

    def note(self, kind: str, member: str = "", detail: str = "") -> None:
        if self.keep_timeline:
            self.res.timeline.append((self.t, kind, member, detail))

    def _fault(self, kind: str) -> None:
        self.res.faults[kind] += 1
