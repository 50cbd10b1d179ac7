"""Health decisions (pure): consecutive failures, worst-of summary, config parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.health import CheckResult, CheckSpec, HealthChecker, Probe, next_result, summarize, worst

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


def test_a_hung_check_cannot_stretch_the_heartbeat() -> None:
    """#10 item 9: a run takes at most ``budget_s``; a check still running then fails."""
    import threading
    import time

    release = threading.Event()

    def slow(spec: CheckSpec) -> Probe:
        release.wait(10)
        return Probe("ok", "")

    hc = HealthChecker((CheckSpec("command", command="sleep 10", timeout_s=10),),
                       prober=slow, budget_s=0.2)
    t0 = time.monotonic()
    doc = hc.run()
    took = time.monotonic() - t0
    release.set()
    assert took < 5.0  # bounded by the budget, not by the check's own 10 s timeout
    (check,) = doc["checks"].values()
    assert "health budget" in str(check)
