"""The boot deadline on a slow instance: late work that finished is not failed after the fact.

Slowness is injected, not waited for: each phase advances a fake clock by what it
"took", so the verdicts do not depend on how busy the machine running the test is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.boot.run import DEFAULT_DEADLINE_S, run_boot
from agent.bootctx import BootContext, Done, Phase
from agent.clock import FakeClock
from agent.paths import Paths

CLOCK = FakeClock()
WROTE: list[str] = []


def _work(ctx: BootContext, seconds: float, name: str) -> Done:
    CLOCK.advance(seconds)
    WROTE.append(name)
    return Done(ctx, f"{name} done")


def phase_slow(ctx: BootContext) -> Done:
    return _work(ctx, DEFAULT_DEADLINE_S - 10, "slow")  # in time, barely


def phase_register_late(ctx: BootContext) -> Done:
    return _work(ctx, 30, "register")  # starts in time, finishes 20 s after the deadline


def phase_never(ctx: BootContext) -> Done:
    return _work(ctx, 1, "never")


@pytest.fixture(autouse=True)
def _fresh() -> None:
    WROTE.clear()


def _phases(*names: str) -> list[Phase]:
    return [Phase(n, globals()[f"phase_{n}"]) for n in names]


def test_a_phase_that_finishes_after_the_deadline_is_done_not_failed(tmp_path: Path) -> None:
    st = run_boot(Paths(tmp_path), clock=CLOCK, phases=_phases("slow", "register_late"))
    # Before issue #16 the last phase was failed after it had written the member record:
    # status "error", and `ec2-agent run` refused to start on an instance that was fine.
    assert st["status"] == "done", st
    last = st["phases"][-1]
    assert last["status"] == "ok"
    assert "20.0s after the boot deadline" in last["detail"], last
    assert st["errors"] == [] and WROTE == ["slow", "register"]


def test_no_phase_starts_after_the_deadline(tmp_path: Path) -> None:
    st = run_boot(Paths(tmp_path), clock=CLOCK,
                  phases=_phases("slow", "register_late", "never"))
    assert st["status"] == "error"
    assert [p["status"] for p in st["phases"]] == ["ok", "ok", "error"]
    assert "deadline exceeded while starting phase never" in st["errors"][0]
    assert WROTE == ["slow", "register"]
