"""The virtual-time scheduler: one event queue, agent threads parked on it, per-host clocks.

Every agent thread is a greenlet (``Let``); whatever would block it in production (a sleep,
latency, a stall, a timeout) *parks* it on the queue instead, so other members run meanwhile
and a stalled thread wakes up to a changed world. Events at the same time run in the order
they were scheduled (a sequence number breaks ties), which makes a run a function of its seed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from greenlet import greenlet

from agent.clock import Clock
from agent.sim.world import Host, Let, SimBase


class SimClock(Clock):
    """A host's clocks: the wall clock may be skewed and jump; monotonic never does."""

    def __init__(self, sim: Scheduler, host: Host) -> None:
        self.sim = sim
        self.host = host

    def time(self) -> float:
        return self.sim.t + self.host.skew

    def monotonic(self) -> float:
        return self.sim.t - self.host.boot_t + 100.0

    def sleep(self, seconds: float) -> None:
        self.sim.park(max(0.0, seconds))


class Scheduler(SimBase):
    """The event queue (a heap of (time, sequence, callback)) and parking."""

    _q: list[tuple[float, int, Callable[[], None]]]
    _seq: int

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
