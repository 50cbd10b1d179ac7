"""Health decisions (pure): consecutive failures, worst-of summary, config parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.host.health import (
    CheckResult,
    CheckSpec,
    HealthChecker,
    Probe,
    next_result,
    summarize,
    worst,
)

OK, WARN, FAIL = Probe("ok"), Probe("warn", "exit 1"), Probe("fail", "refused")


@pytest.mark.parametrize("prev,probe,fbc,expect", [
    (0, OK, 3, ("passing", 0)),
    (5, OK, 3, ("passing", 0)),
    (0, FAIL, 3, ("warning", 1)),
    (1, FAIL, 3, ("warning", 2)),
    (2, FAIL, 3, ("critical", 3)),
    (0, FAIL, 1, ("critical", 1)),
    (2, WARN, 3, ("warning", 2)),
    (9, FAIL, 3, ("critical", 10)),
])
def test_next_result(prev: int, probe: Probe, fbc: int, expect: tuple[str, int]) -> None:
    r = next_result(prev, probe, fbc)
    assert (r.status, r.failures) == expect


@given(st.lists(st.sampled_from(["ok", "warn", "fail"]), max_size=30), st.integers(1, 5))
def test_critical_iff_fbc_consecutive_failures(outcomes: list[str], fbc: int) -> None:
    failures, run = 0, 0
    for o in outcomes:
        r = next_result(failures, Probe(o), fbc)
        run = 0 if o == "ok" else run + (o == "fail")
        failures = r.failures
        assert failures == run
        assert (r.status == "critical") == (o == "fail" and run >= fbc)


@given(st.lists(st.sampled_from(["passing", "warning", "critical"])))
def test_summary_is_worst(statuses: list[str]) -> None:
    results = {f"c{i}": CheckResult(s, 0) for i, s in enumerate(statuses)}
    s = summarize(results)
    expect = ("critical" if "critical" in statuses else
              "warning" if "warning" in statuses else "passing")
    assert s["status"] == expect == worst(statuses)
    assert set(s["checks"]) == set(results)


def test_no_checks_is_passing() -> None:
    assert HealthChecker().run() == {"status": "passing", "checks": {}}


def test_from_config_names_bad_keys() -> None:
    spec = CheckSpec.from_config({"type": "tcp", "port": 22, "timeout_s": 1})
    assert spec.id == "tcp:127.0.0.1:22" and spec.failures_before_critical == 3
    with pytest.raises(ConfigError, match=r"health\[2\]\.url"):
        CheckSpec.from_config({"type": "http"}, 2)
    with pytest.raises(ConfigError, match=r"health\[0\]\.type"):
        CheckSpec.from_config({"type": "dns"})


def test_checker_with_injected_prober() -> None:
    outcomes = iter([FAIL, FAIL, FAIL, OK])
    hc = HealthChecker((CheckSpec("process", name="x", failures_before_critical=2),),
                       prober=lambda spec: next(outcomes))
    assert [hc.run()["status"] for _ in range(4)] == ["warning", "critical", "critical", "passing"]


def test_a_slow_check_does_not_hold_the_heartbeat_past_its_budget() -> None:
    """Issue #16: a check that hangs (here: until the test releases it) must not delay
    the beat. The budgeted run returns with the check "still running", does not start
    it again while it runs, and folds its result in once it has finished."""
    import threading

    release = threading.Event()
    calls: list[str] = []

    def prober(spec: CheckSpec) -> Probe:
        calls.append(spec.id)
        if spec.name == "slow":
            release.wait(120)  # the injected slowness; a ceiling, not a timing
            return FAIL
        return OK

    hc = HealthChecker((CheckSpec("process", name="slow"), CheckSpec("process", name="fast")),
                       prober=prober)
    box: list[dict] = []
    t = threading.Thread(target=lambda: box.append(hc.run(budget_s=0.2)), daemon=True)
    t.start()
    t.join(60)
    try:
        assert not t.is_alive(), "the budgeted run waited for the slow check"
        first = box[0]
        # The fast check is in unless the machine is so busy it missed the budget too.
        assert first["checks"]["process:slow"]["status"] == "warning"
        assert "still running" in first["checks"]["process:slow"]["output"]
        again = hc.run(budget_s=0.0)
        assert calls.count("process:slow") == 1  # not started again while it runs
        assert again["checks"]["process:slow"]["status"] == "warning"
    finally:
        release.set()
    done = hc.run(budget_s=60)  # returns as soon as the released check has finished
    assert done["checks"]["process:slow"] == {"status": "warning", "failures": 1,
                                               "output": "refused", "duration_s": 0.0}
    assert done["checks"]["process:fast"]["status"] == "passing"
    hc.close()


def test_without_a_budget_every_check_is_waited_for() -> None:
    hc = HealthChecker((CheckSpec("process", name="a"),), prober=lambda s: FAIL)
    assert hc.run()["checks"]["process:a"]["failures"] == 1
