"""The heartbeat loop's schedule on a slow instance: start to start, on an injected clock.

A beat that takes long (health checks near their timeout, a slow store, a starved
CPU) must not push the next one later: the gap between two record writes would grow
by the beat's duration every time, towards dead_after (issue #16). The slowness is a
fake clock advanced by the beat itself, so nothing here depends on the machine's speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.clock import FakeClock
from agent.daemon.loop import Daemon, Task
from agent.paths import Paths

INTERVAL = 10.0


def _one_beat(tmp_path: Path, took: float) -> tuple[float, Task]:
    d = Daemon(Paths(tmp_path), clock=FakeClock())

    def slow_beat() -> None:
        d.clock.advance(took)
        d.stop_event.set()  # one iteration

    d.heartbeat_task = Task("heartbeat", lambda: INTERVAL, slow_beat)
    started = d.clock.monotonic()
    d._heartbeat_loop()
    return started, d.heartbeat_task


@pytest.mark.parametrize("took", [0.0, 3.0, 6.0])
def test_a_slow_beat_does_not_delay_the_next(tmp_path: Path, took: float) -> None:
    started, t = _one_beat(tmp_path, took)
    assert t.next_at == started + INTERVAL  # was started + took + INTERVAL
    assert t.runs == 1


def test_a_beat_longer_than_the_interval_is_followed_after_a_pause(tmp_path: Path) -> None:
    started, t = _one_beat(tmp_path, 25.0)
    assert t.next_at == started + 25.0 + 0.2 * INTERVAL
