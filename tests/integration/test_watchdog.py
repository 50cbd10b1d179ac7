"""The daemon's systemd watchdog: slow is not wedged, and a wedged heartbeat stops the pings.

A real daemon (``Daemon.run``, in this process so the test can hold its tasks) on the
emulated cloud, pinging a notify socket the test reads. Slowness and wedging are
injected, not waited for: a gate the test closes holds the heartbeat (and the main
loop's backup task) inside their task for as long as the test says. Issue #16.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from agent.daemon.loop import Daemon
from agent.daemon.watchdog import heartbeat_bound
from agent.paths import Paths
from agent.sim.cloud import EmbeddedCloud
from agent.sim.fleet import fast_config
from agent.sim.netutil import wait_for

PERIOD_S = 2.0  # WATCHDOG_USEC: the daemon pings every 1 s
INTERVAL_S = 0.5


class _Gated(Daemon):
    """The daemon with gates the test can close on the heartbeat and on the backup task."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.open = {"beat": threading.Event(), "backups": threading.Event()}
        self.held = {"beat": threading.Event(), "backups": threading.Event()}
        self.beats = 0
        self.main_steps = 0
        for e in self.open.values():
            e.set()

    def _use_lean_aws_data(self) -> None:
        """Not here: this process's boto3 session is shared with other tests."""

    def _gate(self, name: str) -> None:
        if not self.open[name].is_set():
            self.held[name].set()
            self.open[name].wait()
            self.held[name].clear()

    def beat(self) -> None:
        self._gate("beat")
        super().beat()
        self.beats += 1

    def backups(self) -> None:
        self._gate("backups")
        super().backups()
        self.main_steps += 1


class _Pings:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.times: list[float] = []
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._recv, daemon=True)
        self._t.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                lines = self.sock.recv(4096).decode().splitlines()
            except TimeoutError:
                continue
            if "READY=1" in lines:
                self.ready.set()
            if "WATCHDOG=1" in lines:
                self.times.append(time.monotonic())

    def since(self, t: float) -> int:
        return sum(1 for x in self.times if x >= t)

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=5)
        self.sock.close()


def test_slow_loops_keep_pinging_and_a_wedged_heartbeat_stops(
        cloud: EmbeddedCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = fast_config(cloud, "web", interval_s=INTERVAL_S, heal={"mode": "off"})
    iid = cloud.run_standalone("web", 1, cfg)[0]
    assert cloud.boot_all([iid]) == {iid: 0}
    inst = cloud.instances[iid]
    for k, v in inst.env(cloud).items():
        if k.startswith(("AWS_", "EC2_AGENT_")):
            monkeypatch.setenv(k, v)
    pings = _Pings(str(tmp_path / "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", pings.sock.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", str(int(PERIOD_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    d = _Gated(Paths(inst.root))
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(d.run()), daemon=True)
    runner.start()
    # What the daemon allows one beat (no health checks; store timeouts of a 0.5 s interval).
    bound = heartbeat_bound(PERIOD_S, INTERVAL_S, [], 0.5 + 1.0)
    try:
        assert pings.ready.wait(120), "no READY=1"
        wait_for(lambda: len(pings.times) >= 2 and d.beats >= 2, 60, 0.1, "pings and beats")

        # 1. Slow, not wedged: both loops held inside a task for longer than the watchdog
        # period (but less than the heartbeat's bound). The old rule - "any loop started a
        # task within the period" - stopped pinging here and systemd would have killed a
        # daemon that was merely slow (a throttled instance: a long beat and a long backup).
        slow_s = min(4 * PERIOD_S, bound - 2 * PERIOD_S)
        assert slow_s >= 3 * PERIOD_S, (slow_s, bound)
        d.open["beat"].clear()
        d.open["backups"].clear()
        wait_for(lambda: d.held["beat"].is_set() and d.held["backups"].is_set(), 60, 0.05,
                 "both loops held in a task")
        t_held = time.monotonic()
        time.sleep(slow_s)  # the injected slowness itself; nothing is asserted about speed
        during = pings.since(t_held + PERIOD_S)  # after one full period with no task started
        d.open["backups"].set()
        d.open["beat"].set()
        assert during >= 3, f"{during} pings while both loops were slow for {slow_s:g}s"

        # 2. Wedged: the heartbeat loop stuck for good while the main loop runs on. The old
        # rule kept pinging (the main loop's tasks counted for both) while the member's
        # record went stale; now the pings stop once the beat is past its bound.
        beats = d.beats
        wait_for(lambda: d.beats > beats, 60, 0.1, "a beat after the slow spell")
        d.open["beat"].clear()
        wait_for(lambda: d.held["beat"].is_set(), 60, 0.05, "the heartbeat held")
        steps = d.main_steps

        def silent() -> bool:
            return bool(pings.times) and time.monotonic() - pings.times[-1] > 3 * PERIOD_S

        wait_for(silent, bound + 120, 0.2, lambda: f"the pings to stop (bound {bound:.1f}s)")
        assert d.main_steps > steps, "the main loop must have run on meanwhile"
        assert runner.is_alive()

        # 3. Unwedged: the pings come back.
        t_free = time.monotonic()
        d.open["beat"].set()
        wait_for(lambda: pings.since(t_free) >= 1, 60, 0.1, "pings after the heartbeat resumed")
    finally:
        for e in d.open.values():
            e.set()
        d.request_stop("test over")
        runner.join(timeout=120)
        pings.close()
    assert not runner.is_alive() and result == [0]
