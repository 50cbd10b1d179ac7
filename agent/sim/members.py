"""The members: each host's agent process (start, crash, SIGSTOP/SIGCONT, leave) and its threads.

A process is two greenlets, as the daemon has two threads: the heartbeat loop and the main
loop (watch, then heal, every interval), running the real ``agent.daemon.tasks.MemberTasks``.
``_able`` keeps the ground truth of whether a member's agent is up and able to heartbeat.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from greenlet import greenlet

from agent.group.heartbeat import Heartbeater, next_interval
from agent.group.membership import MemberRecord
from agent.sim.twins import TwinInstance
from agent.sim.vtime import Scheduler, SimClock
from agent.sim.world import BUCKET, GROUP, T0, Host, Killed, Let


class Members(Scheduler):
    """Hosts and processes, and the agents' threads (a mixin of ``Simulation``)."""

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

        watcher = PeerWatcher(store, GROUP, h.iid, clock=clock,
                              dead_after_s=self.policy.dead_after_s)
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
        lets = [g for g in h.lets if not g.dead]
        h.lets = []
        if lets:
            self.at(self.t, lambda: self._unwind(lets))
        self._able(h)
        self.note("kill" if for_good else "crash", h.iid, why)

    def _unwind(self, lets: list[Let]) -> None:
        """Free a gone process's threads now, from the hub: ``Killed`` thrown into each.

        A thread parked for ever still holds its frames, and with them the process's whole
        state (its peer view has an entry per member); kept alive, every process that ever
        died in a run stayed in memory and in the collector's work (~60 KB each at
        N = 1,000: 3.5 MB less after 0.3 simulated hours, same output). A collected
        greenlet would unwind the agent's code at GC time instead, at no defined point of
        the run. Unwinding runs no agent call (``_caller`` raises ``Killed`` for a gone
        generation) and reads no random number: the run is the same event for event. A
        thread that parks on its way out is kept, never resumed."""
        for g in lets:
            if g.dead:
                continue
            try:
                g.throw(Killed())
            except Killed:
                pass
            if not g.dead:
                self.graveyard.append(g)

    def stop(self, h: Host) -> None:
        if h.proc == "up":
            h.proc = "stopped"
            self._able(h)
            self.note("sigstop", h.iid)

    def cont(self, h: Host) -> None:
        if h.proc == "stopped":
            h.proc = "up"
            h.resumed_at = self.t
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
            h.able_since = self.t
        elif not able and h.unable_since is None:
            h.unable_since = self.t
            h.able_spans.append((h.able_since, self.t))

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
