"""The daemon's per-member work as tasks: each call does one step against injected parts.

``MemberTasks`` holds the three things that make a member a member: its heartbeat
writer (``agent.group.heartbeat.Heartbeater``), its peer watcher (``agent.group.peers.PeerWatcher``)
and, when healing is on, its replacement controller (``agent.heal.controller.HealController``).
Each method is one step of one task:

    heartbeat(state, health)   one beat (the writer retries within its interval)
    watch()                    one peer-watch tick
    heal()                     one controller step; a lease against us -> leave
    leave(reason)              planned departure (spot notice, scale-in, stop)

Nothing here schedules, sleeps or reads a clock: ``ec2-agent run`` (``agent.daemon.loop``)
calls these on its threads and timers, and the deterministic simulator
(``agent.sim.fleetsim``) calls the very same methods for thousands of members on
virtual time. Time, the store and the cloud come in through the parts' own
constructors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.group.heartbeat import BeatResult, Heartbeater
from agent.group.peers import PeerWatcher, TickReport

SUPERSEDED_REASON = "superseded: a replacement lease exists against this instance"


@dataclass
class MemberTasks:
    hb: Heartbeater
    watcher: PeerWatcher
    heal_ctl: Any = None  # agent.heal.controller.HealController, or None when heal.mode is off
    superseded: bool = False
    departing: str | None = None

    @property
    def active(self) -> bool:
        """Still claiming membership: not replaced, not leaving."""
        return not self.superseded and not self.departing

    def heartbeat(self, state: str = "ready",
                  health: Mapping[str, Any] | None = None) -> BeatResult | None:
        if not self.active:
            return None
        return self.hb.beat(state=state, health=health)

    def watch(self) -> TickReport:
        return self.watcher.tick()

    def heal(self) -> Any:
        """One controller step (the ``Decision``), or None when healing is off or we left."""
        if self.heal_ctl is None or not self.active:
            return None
        decision = self.heal_ctl.step(observer_sick=self.hb.observer_sick)
        if self.heal_ctl.superseded:
            self.become_superseded()
        return decision

    def become_superseded(self) -> bool:
        """A peer replaced us: stop claiming membership. True the first time."""
        if self.superseded:
            return False
        self.superseded = True
        self.hb.leave(SUPERSEDED_REASON)
        return True

    def leave(self, reason: str) -> bool:
        """Leaving is not dying: delete our record first so nobody replaces us."""
        self.departing = reason
        return self.hb.leave(reason)
