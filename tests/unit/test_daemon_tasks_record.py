"""The tasks block of state.json: written when a task's health changes, else once a minute.

Rewriting it on every loop pass (about once a second) was most of an idle daemon's CPU
(#12, py-spy). What a reader of state.json needs stays there at once: a task's first run,
a failure, another error, a recovery; the run counts are at most TASKS_RECORD_S old, and
exact at shutdown.
"""

from __future__ import annotations

from pathlib import Path

from agent.clock import FakeClock
from agent.daemon.loop import TASKS_RECORD_S, Daemon, Task
from agent.host import state as statefile
from agent.paths import Paths


class Flaky:
    def __init__(self) -> None:
        self.error: str | None = None

    def __call__(self) -> None:
        if self.error:
            raise RuntimeError(self.error)


def _daemon(tmp_path: Path) -> tuple[Daemon, Flaky]:
    d = Daemon(Paths(tmp_path), clock=FakeClock())
    Paths(tmp_path).state_file.parent.mkdir(parents=True, exist_ok=True)
    flaky = Flaky()
    d.heartbeat_task = Task("heartbeat", lambda: 10.0, lambda: None)
    d.tasks = [Task("depart", lambda: 1.0, flaky), Task("backup", lambda: 1.0, lambda: None)]
    return d, flaky


def _passes(d: Daemon, n: int) -> None:
    for _ in range(n):
        d.run_once()
        d.clock.advance(1.0)


def _recorded(d: Daemon) -> dict:
    return (statefile.read(d.paths.state_file) or {})["daemon"]["tasks"]


def test_quiet_passes_do_not_rewrite_the_tasks_block(tmp_path: Path) -> None:
    d, _ = _daemon(tmp_path)
    _passes(d, 1)
    assert _recorded(d)["depart"] == {"runs": 1, "failures": 0, "last_error": ""}
    _passes(d, 10)
    assert d.tasks[0].runs == 11
    assert _recorded(d)["depart"]["runs"] == 1  # the old loop wrote 11 here
    _passes(d, int(TASKS_RECORD_S))
    assert _recorded(d)["depart"]["runs"] >= 60  # at most a minute old


def test_a_failure_another_error_and_a_recovery_are_recorded_at_once(tmp_path: Path) -> None:
    d, flaky = _daemon(tmp_path)
    _passes(d, 3)
    flaky.error = "IMDS down"
    _passes(d, 1)
    assert _recorded(d)["depart"] == {"runs": 3, "failures": 1,
                                      "last_error": "RuntimeError: IMDS down"}
    _passes(d, 1)
    assert _recorded(d)["depart"]["failures"] == 2
    flaky.error = "IMDS slow"
    _passes(d, 1)
    assert _recorded(d)["depart"]["last_error"] == "RuntimeError: IMDS slow"
    flaky.error = None
    _passes(d, 1)
    assert _recorded(d)["depart"] == {"runs": 4, "failures": 0, "last_error": ""}


def test_a_task_first_run_is_recorded_at_once(tmp_path: Path) -> None:
    d, _ = _daemon(tmp_path)
    _passes(d, 2)
    assert _recorded(d)["heartbeat"]["runs"] == 0  # its own thread: not run here
    d._run_task(d.heartbeat_task, "heartbeat")
    _passes(d, 1)
    assert _recorded(d)["heartbeat"]["runs"] == 1


def test_forced_record_has_the_exact_counts(tmp_path: Path) -> None:
    d, _ = _daemon(tmp_path)
    _passes(d, 5)
    d.record_tasks(force=True)  # what shutdown does
    assert _recorded(d)["backup"]["runs"] == 5
