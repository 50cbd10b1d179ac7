"""The seeded fault schedule: which faults strike which members, and when.

Each fault kind is its own Poisson process with its own random stream, so a shorter run
with the same seed is a prefix of the longer one. The rates per profile: ``agent.sim.faults``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from agent.sim.members import Members
from agent.sim.world import BUCKET, GROUP, T0, ZONES, Host


class FaultPlan(Members):
    """Faults from the seed (a mixin of ``Simulation``)."""

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
            # Gone from the group meanwhile (an agent's action, the ASG's own replacement):
            # the scale-in has nothing left to end (chaos seed 7069, N = 39, crashed here)
            if self.cloud.member_of.get(h.iid) == name:
                self.cloud.call("terminate_instance_in_auto_scaling_group",
                                {"InstanceId": h.iid, "ShouldDecrementDesiredCapacity": True})
        self.at(self.t + 30.0, go)
        return 30.0

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
        spans = self.zone_dark_spans.setdefault(zone, [])
        if self.zone_dark_until.get(zone, 0.0) < self.t:
            spans.append((self.t, self.t))
        self.zone_dark_until[zone] = max(self.zone_dark_until.get(zone, 0.0), self.t + d)
        spans[-1] = (spans[-1][0], self.zone_dark_until[zone])
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
        self.lost_since = self.t
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
