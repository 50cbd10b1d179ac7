"""status.translate: facts in, report out; exit codes follow cloud-init."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.status import EXIT, format_text, translate


def test_no_state_is_not_started() -> None:
    r = translate(None)
    assert r.status == "not-started" and r.exit_code == 0


def test_exit_codes() -> None:
    assert translate({"status": "done"}).exit_code == 0
    assert translate({"status": "error", "errors": ["x"]}).exit_code == 1
    assert translate({"status": "degraded"}).exit_code == 2
    assert translate({"status": "running"}).exit_code == 0


def test_superseded_and_sick_heartbeat_degrade_a_done_boot() -> None:
    r = translate({"status": "done", "membership": {"state": "superseded"}})
    assert r.status == "degraded" and r.exit_code == 2
    assert "superseded" in format_text(r)
    r = translate({"status": "done", "heartbeat": {"observer_sick": True, "last_error": "503"}})
    assert r.status == "degraded" and "503" in r.degraded[0]


def test_error_is_never_masked_by_degradation() -> None:
    r = translate({"status": "error", "errors": ["config: bad"],
                   "membership": {"state": "superseded"}})
    assert r.status == "error" and r.exit_code == 1


def test_text_shows_phases_heal_and_errors() -> None:
    r = translate({
        "status": "degraded", "instance_id": "i-1", "group": "web", "boot_kind": "first",
        "phases": [{"name": "identity", "status": "ok", "duration_s": 0.012, "detail": "i-1"},
                   {"name": "pull", "status": "degraded", "duration_s": 1.5,
                    "detail": "using last-known-good",
                    "progress": {"bytes": 2_000_000, "total": 4_000_000, "rate": 1_000_000}}],
        "degraded": ["bundle: using last-known-good version 3"],
        "heal": {"mode": "armed", "frozen": True, "reason": "mass-death 3/5", "budget_left": 0},
    })
    text = format_text(r, now=0)
    assert "identity" in text and "0.012s" in text
    assert "2.0 MB / 4.0 MB at 1.0 MB/s" in text
    assert "FROZEN (mass-death 3/5)" in text and "budget left 0" in text
    assert "degraded: bundle: using last-known-good version 3" in text


@given(st.sampled_from(sorted(EXIT)), st.lists(st.text(max_size=20), max_size=3),
       st.sampled_from([None, "ready", "superseded", "leaving"]))
def test_report_is_total_and_json_has_the_contract_keys(status: str, errors: list[str],
                                                        member: str | None) -> None:
    state = {"status": status, "errors": errors}
    if member:
        state["membership"] = {"state": member}
    r = translate(state)
    d = r.to_json()
    for key in ("status", "instance_id", "group", "boot_kind", "phases", "errors", "heartbeat",
                "peers", "heal"):
        assert key in d
    assert d["exit_code"] == EXIT[r.status]
    if status == "error":
        assert r.exit_code == 1
    format_text(r)


def test_text_names_a_disrupted_zone() -> None:
    from agent.status import format_text, translate

    r = translate({"status": "done", "heal": {"mode": "armed", "frozen": False,
                                              "disrupted_zones": ["us-east-1c"]}})
    assert "zone disrupted: us-east-1c" in format_text(r)
