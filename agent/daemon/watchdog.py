"""When the daemon may tell systemd it is alive (``WATCHDOG=1``): a pure decision.

The daemon runs two loops, the heartbeat thread and the main loop (watch, heal,
refresh, backup...), and pings systemd from a third thread that does nothing else, so
a slow task never delays a ping: on a CPU-starved instance (a t3.nano out of burst
credits) every loop is slow, and slow is not wedged. What a ping asserts is that
*neither* loop is wedged. Each loop shows signs of life: a task starting or finishing,
and for the main loop a store request finishing (a backup of many gigabytes is one
long task that keeps making progress). A loop is wedged when it has shown none for
longer than its bound:

* the heartbeat loop's bound covers one whole beat: the slowest health check, the
  write's retry budget and its calls' timeouts, plus the interval it waits between
  beats. Every part of a beat is bounded, so a beat past that bound is stuck, not slow.
* the main loop's bound covers its longest single step without a store request: a
  hook or a check/reload command (two minutes at most), with room to spare.

Before issue #16 a ping needed a sign of life from *either* loop, so a wedged
heartbeat loop was hidden by a healthy main loop: the member's record went stale and
its peers replaced the instance, where systemd restarting the daemon was the cure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# The main loop's longest step without a store request: a heal hook (120 s) or a
# template's check + reload commands (60 s each), with a margin for a slow instance.
MAIN_LOOP_BOUND_S = 300.0
# Added to a heartbeat's worst case: the local work of a beat (state files) on a slow disk.
HEARTBEAT_SLACK_S = 10.0


@dataclass(frozen=True)
class LoopView:
    """What one loop last showed, on the monotonic clock."""

    name: str
    bound_s: float
    last_sign: float  # a task started or finished
    progress: float = 0.0  # a store request finished (where the loop counts that)
    task: str = ""  # the task running now, "" between tasks


def heartbeat_bound(period_s: float, interval_s: float, check_timeouts: Iterable[float],
                    call_timeout_s: float) -> float:
    """How long the heartbeat loop may go without a sign of life before it is wedged.

    One wait between beats (the interval), the health checks (they run in parallel: the
    slowest), the write's retry budget (80 % of the interval) and then one more call
    that may take its whole timeout, plus the marker bump when the state changes.
    Never less than the watchdog period.
    """
    beat = max(check_timeouts, default=0.0) + 0.8 * interval_s + 2 * call_timeout_s
    return max(period_s, interval_s + beat + HEARTBEAT_SLACK_S)


def main_loop_bound(period_s: float) -> float:
    return max(period_s, MAIN_LOOP_BOUND_S)


def wedged(loops: Iterable[LoopView], now: float) -> list[str]:
    """The loops that have shown no sign of life within their bound, each with why."""
    out = []
    for lp in loops:
        quiet = now - max(lp.last_sign, lp.progress)
        if quiet > lp.bound_s:
            doing = f"in task {lp.task}" if lp.task else "between tasks"
            out.append(f"{lp.name} loop {doing}: no sign of life for {quiet:.0f}s "
                       f"(bound {lp.bound_s:g}s)")
    return out


@dataclass
class LoopState:
    """One loop's marks, written by the loop's own thread, read by the watchdog thread."""

    name: str
    last_sign: float = 0.0
    task: str = ""

    def begin(self, task: str, now: float) -> None:
        self.task, self.last_sign = task, now

    def end(self, now: float) -> None:
        self.task, self.last_sign = "", now

    def view(self, bound_s: float, progress: float = 0.0) -> LoopView:
        return LoopView(self.name, bound_s, self.last_sign, progress, self.task)
