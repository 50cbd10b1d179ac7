"""agent.departure: IMDS signals -> stay / join / leave / suspend / hold. Tables, no I/O."""

from __future__ import annotations

import calendar
import dataclasses
from dataclasses import replace
from typing import Any

import pytest

from agent import departure as D
from agent.config.model import defaults
from agent.daemon.notices import initial_membership
from agent.status import notice_lines, translate

NOW = float(calendar.timegm((2026, 12, 1, 12, 0, 0, 0, 0, 0)))  # 1 Dec 2026 12:00:00 GMT
POLICY = D.Policy.from_raw(defaults("departure"))  # the schema's defaults


def obs(**kw: Any) -> D.Observations:
    return D.observations_from_imds(**kw)


# -- the lifecycle table: every target-lifecycle-state value AWS documents --------------------

# state -> (joins at boot, a member's action, a held instance's action, a suspended one's)
LIFECYCLE_TABLE = {
    None: (True, "stay", "join", "join"),
    "InService": (True, "stay", "join", "join"),
    "Terminated": (False, "leave", "leave", "leave"),
    "Warmed:Terminated": (False, "leave", "leave", "leave"),
    "Warmed:Stopped": (False, "suspend", "hold", "stay"),
    "Warmed:Hibernated": (False, "suspend", "hold", "stay"),
    "Warmed:Running": (False, "suspend", "hold", "stay"),
    "Standby": (False, "suspend", "hold", "stay"),
    "Detached": (False, "suspend", "hold", "stay"),
    # a value this agent does not know: joins at boot (as before), never acts, never rejoins
    "Warmed:Pending:Wait": (True, "stay", "stay", "stay"),
}


@pytest.mark.parametrize("state", list(LIFECYCLE_TABLE))
def test_lifecycle_state_table(state: str | None) -> None:
    joins, member, held, suspended = LIFECYCLE_TABLE[state]
    assert D.boot_joins(state)[0] is joins
    o = obs(lifecycle_state=state)
    got = tuple(D.decide(o, POLICY, m, NOW).action for m in ("member", "held", "suspended"))
    assert got == (member, held, suspended)
    assert D.decide(o, POLICY, "left", NOW).action == "stay"  # left is final


def test_every_documented_state_is_in_the_table() -> None:
    assert set(D.LIFECYCLE) == {s for s in LIFECYCLE_TABLE if s} - {"Warmed:Pending:Wait"}


def test_boot_joins_says_why() -> None:
    joins, why = D.boot_joins("Warmed:Running")
    assert not joins and "Warmed:Running" in why and "warm pool" in why
    assert D.boot_joins(" InService\n") == (True, "in service")


# -- spot -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("action", "expect"), [
    ("terminate", "leave"), ("stop", "suspend"), ("hibernate", "suspend"),
    ("something-new", "leave"),  # an unknown action: the safe side is to leave
])
def test_spot_actions(action: str, expect: str) -> None:
    d = D.decide(obs(spot={"action": action, "time": "2026-12-01T12:02:00Z"}), POLICY,
                 "member", NOW)
    assert d.action == expect
    assert "2026-12-01T12:02:00Z" in d.reason
    assert d.final_backup is True
    assert d.notices["spot"] == {"action": action, "time": "2026-12-01T12:02:00Z"}


def test_termination_time_alone_is_a_terminate_notice() -> None:
    d = D.decide(obs(termination_time="2026-12-01T12:02:00Z\n"), POLICY, "member", NOW)
    assert (d.action, d.notices["spot"]) == (
        "leave", {"action": "terminate", "time": "2026-12-01T12:02:00Z"})


def test_hibernated_member_rejoins_only_when_the_notice_is_gone_and_imds_answers() -> None:
    hib = obs(spot={"action": "hibernate", "time": "t"})
    assert D.decide(hib, POLICY, "suspended", NOW).action == "stay"
    # IMDS down after the resume: unknown is not "clear"
    down = obs(failed=["spot", "lifecycle"])
    d = D.decide(down, POLICY, "suspended", NOW)
    assert d.action == "stay" and "did not answer" in d.reason
    assert D.decide(obs(), POLICY, "suspended", NOW).action == "join"
    # the same failures never make a member leave
    assert D.decide(down, POLICY, "member", NOW).action == "stay"


def test_a_final_notice_beats_a_resumable_one() -> None:
    o = obs(spot={"action": "stop", "time": "t"}, lifecycle_state="Terminated")
    assert D.decide(o, POLICY, "member", NOW).action == "leave"
    assert D.decide(o, POLICY, "suspended", NOW).action == "leave"


def test_held_instance_leaves_without_final_backup() -> None:
    d = D.decide(obs(lifecycle_state="Warmed:Terminated"), POLICY, "held", NOW)
    assert (d.action, d.final_backup, d.next_membership) == ("leave", False, "left")


# -- rebalance --------------------------------------------------------------------------------

def test_rebalance_is_reported_by_default_and_leaves_when_configured() -> None:
    o = obs(rebalance={"noticeTime": "2026-12-01T11:58:00Z"})
    d = D.decide(o, POLICY, "member", NOW)
    assert d.action == "stay"
    assert d.notices == {"rebalance": {"notice_time": "2026-12-01T11:58:00Z"}}
    leave = D.decide(o, replace(POLICY, on_rebalance="leave"), "member", NOW)
    assert leave.action == "leave" and leave.final_backup
    assert "rebalance recommendation at 2026-12-01T11:58:00Z" in leave.reason
    no_backup = D.decide(o, replace(POLICY, on_rebalance="leave", final_backup=False),
                         "member", NOW)
    assert no_backup.final_backup is False


# -- scheduled maintenance --------------------------------------------------------------------

def event(code: str, start: str, state: str = "active") -> dict[str, str]:
    return {"Code": code, "Description": f"The instance is scheduled for {code}",
            "EventId": "instance-event-0123", "NotBefore": start,
            "NotAfter": "8 Dec 2026 12:00:00 GMT", "State": state}


@pytest.mark.parametrize(("code", "start", "state", "expect"), [
    ("instance-stop", "1 Dec 2026 12:05:00 GMT", "active", "suspend"),       # within 600 s
    ("instance-stop", "1 Dec 2026 12:10:01 GMT", "active", "stay"),          # 601 s ahead
    ("instance-stop", "1 Dec 2026 11:00:00 GMT", "active", "suspend"),       # already due
    ("instance-retirement", "1 Dec 2026 12:09:00 GMT", "active", "leave"),
    ("instance-retirement", "1 Dec 2026 12:09:00 GMT", "completed", "stay"),
    ("instance-retirement", "1 Dec 2026 12:09:00 GMT", "canceled", "stay"),
    ("system-reboot", "1 Dec 2026 12:01:00 GMT", "active", "stay"),          # report only
    ("instance-stop", "not a time", "active", "stay"),                        # unparsable
])
def test_maintenance_table(code: str, start: str, state: str, expect: str) -> None:
    d = D.decide(obs(maintenance=[event(code, start, state)]), POLICY, "member", NOW)
    assert d.action == expect
    assert bool(d.notices.get("maintenance")) is (state == "active")


def test_maintenance_policy_report_and_codes() -> None:
    o = obs(maintenance=[event("instance-retirement", "1 Dec 2026 12:00:00 GMT")])
    assert D.decide(o, replace(POLICY, on_maintenance="report"), "member", NOW).action == "stay"
    assert D.decide(o, replace(POLICY, maintenance_codes=("instance-stop",)), "member",
                    NOW).action == "stay"
    reboot = obs(maintenance=[event("system-reboot", "1 Dec 2026 12:00:00 GMT")])
    assert D.decide(reboot, replace(POLICY, maintenance_codes=("system-reboot",)), "member",
                    NOW).action == "leave"
    assert D.decide(o, replace(POLICY, maintenance_lead_s=0), "member", NOW - 1).action == "stay"
    assert D.decide(o, replace(POLICY, maintenance_lead_s=0), "member", NOW).action == "leave"


def test_maintenance_time_format() -> None:
    assert D.parse_maintenance_time("21 Jan 2019 09:00:43 GMT") == calendar.timegm(
        (2019, 1, 21, 9, 0, 43, 0, 0, 0))
    assert D.parse_maintenance_time("2 Jan 2006 15:04:05 GMT") is not None  # Go's layout
    assert D.parse_maintenance_time("2019-01-21T09:00:43Z") is None


# -- policy, membership, status ---------------------------------------------------------------

def test_policy_is_the_config_section() -> None:
    from agent.config.model import load_layers

    cfg = load_layers({"group": "g", "store": {"bucket": "my-fleet"}},
                      {"departure": {"on_rebalance": "leave",
                                     "maintenance_codes": ["instance-stop"]}})
    assert cfg.departure == replace(POLICY, on_rebalance="leave",
                                    maintenance_codes=("instance-stop",))
    base = {"group": "g", "store": {"bucket": "my-fleet"}}
    assert load_layers(base, None).departure == POLICY


def test_policy_rejects_bad_values() -> None:
    from agent.config.model import ConfigInvalid, load_layers

    with pytest.raises(ConfigInvalid, match="departure.on_rebalance"):
        load_layers({"group": "g", "store": {"bucket": "my-fleet"}},
                    {"departure": {"on_rebalance": "panic"}})


def test_decide_rejects_unknown_membership() -> None:
    with pytest.raises(ValueError, match="membership"):
        D.decide(obs(), POLICY, "zombie", NOW)


@pytest.mark.parametrize(("state", "left", "expect"), [
    (None, False, "member"),
    ({"membership": {"state": "ready"}}, False, "member"),
    ({"membership": {"state": "held", "reason": "warm"}}, False, "held"),
    ({"membership": {"state": "suspended", "reason": "spot"}}, True, "suspended"),
    ({"membership": {"state": "leaving"}}, True, "left"),
])
def test_initial_membership(state: Any, left: bool, expect: str) -> None:
    assert initial_membership(state, left)[0] == expect


def test_status_shows_notices_and_why_held() -> None:
    d = D.decide(obs(spot={"action": "stop", "time": "T1"}, lifecycle_state="Standby",
                     rebalance={"noticeTime": "T2"},
                     maintenance=[event("instance-stop", "1 Dec 2026 13:00:00 GMT")]),
                 POLICY, "member", NOW)
    lines = notice_lines(d.notices)
    assert lines == [
        "notice: spot interruption: stop at T1",
        "notice: auto scaling target lifecycle state Standby",
        "notice: rebalance recommended at T2",
        "notice: scheduled instance-stop (active) not before 1 Dec 2026 13:00:00 GMT",
    ]
    from agent.status import format_text

    r = translate({"status": "done", "notices": d.notices,
                   "membership": {"state": "held", "reason": "put in standby"}})
    assert r.status == "done" and r.exit_code == 0  # a notice is not a degradation
    text = format_text(r, now=0)
    assert "membership: held (put in standby)" in text and lines[2] in text
    assert r.to_json()["notices"] == d.notices


def test_metrics_notice_gauge() -> None:
    from agent.host.metrics import Metrics

    m = Metrics()
    text = m.render().decode()
    assert 'ec2_agent_imds_notice{kind="rebalance"} 0.0' in text
    m.set_notices({"rebalance": {}, "spot": {}})
    text = m.render().decode()
    assert 'ec2_agent_imds_notice{kind="rebalance"} 1.0' in text
    assert 'ec2_agent_imds_notice{kind="maintenance"} 0.0' in text
    m.set_notices({})
    assert 'ec2_agent_imds_notice{kind="spot"} 0.0' in m.render().decode()


def test_decision_is_a_value() -> None:
    d = D.decide(obs(), POLICY, "member", NOW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.action = "leave"  # type: ignore[misc]


def test_departing_lives_on_the_member_steps_when_the_daemon_has_them() -> None:
    from types import SimpleNamespace

    from agent.daemon.notices import _set_departing

    plain = SimpleNamespace(departing=None)
    _set_departing(plain, "spot")
    assert plain.departing == "spot"
    split = SimpleNamespace(member=SimpleNamespace(departing=None))
    _set_departing(split, "standby")
    assert split.member.departing == "standby" and not hasattr(split, "departing")
