"""Table tests for agent.heal.decide: one group of tests per invariant of DESIGN.md."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.errors import ConfigError
from agent.group.membership import Verdict
from agent.heal.decide import (
    Decision,
    HealPolicy,
    HealView,
    MalformedRecord,
    PolicyError,
    budget_after,
    budget_take,
    decide,
    failure_streak,
    is_failed_replacement,
    lease_token,
)

OBS = "i-obs"
DEAD = "i-dead"


def policy(**over: Any) -> HealPolicy:
    base: dict[str, Any] = dict(mode="armed", action="asg-terminate", grace_s=300,
                                max_per_window=5, window_s=300, freeze_fraction=0.34,
                                confirm_observers=2, dead_after_s=30, silent_after_s=120,
                                replace_silent=False)
    base.update(over)
    return HealPolicy(**base)


def view(**over: Any) -> HealView:
    """Group of 10; one member (i-dead) dead, confirmed by a peer, stopped per EC2."""
    verdicts: dict[str, Any] = {f"i-{n}": "alive" for n in range(8)}
    verdicts[OBS] = "alive"
    verdicts[DEAD] = "dead"
    base: dict[str, Any] = dict(
        observer_id=OBS, group_size=10, verdicts=verdicts,
        suspicions={DEAD: {"i-1"}}, ec2_state={DEAD: "stopped"},
        asg_health={}, probe_ok={DEAD: None}, silent_for={DEAD: 200.0}, now=1000.0,
    )
    base.update(over)
    return HealView(**base)


def acted(d: Decision) -> list[str]:
    return [a.member_id for a in d.actions]


def refusal(d: Decision, member: str = DEAD) -> str:
    found = [r for r in d.refusals if r.member_id == member]
    assert len(found) == 1, d
    return found[0].reason


def test_baseline_acts_once_with_reasons() -> None:
    d = decide(view(), policy())
    assert d.freeze is None and not d.frozen
    assert acted(d) == [DEAD]
    a = d.actions[0]
    assert a.kind == "asg-terminate" and not a.dry_run
    assert any("confirmed by 2 observers" in r for r in a.reasons)
    assert all(not a.dry_run for a in d.actions)


def test_verdict_objects_accepted() -> None:
    v = view(verdicts={DEAD: Verdict(DEAD, "dead", "x")})
    assert acted(decide(v, policy())) == [DEAD]


# 1. Exactly one actor ---------------------------------------------------------------


def test_inv1_leased_member_is_refused() -> None:
    d = decide(view(leases={DEAD}), policy())
    assert acted(d) == [] and "leased" in refusal(d)


def test_inv1_lease_token_is_stable_short_and_per_lease() -> None:
    t = lease_token("web", DEAD, '"0123abcd"')
    assert t == lease_token("web", DEAD, "0123abcd") == lease_token("web", DEAD, 'W/"0123abcd"')
    assert len(t) <= 64 and t.isascii() and t.startswith("ec2a-")
    assert t != lease_token("web", DEAD, "other")
    assert t != lease_token("db", DEAD, "0123abcd")
    assert t != lease_token("web", "i-other", "0123abcd")
    with pytest.raises(ValueError):
        lease_token("web", DEAD, '""')


def test_inv1_one_action_per_member() -> None:
    v = view(verdicts={DEAD: "dead", "i-d2": "dead"}, group_size=100,
             suspicions={DEAD: {"i-1"}, "i-d2": {"i-1"}},
             ec2_state={DEAD: "stopped", "i-d2": "terminated"})
    d = decide(v, policy())
    assert acted(d) == ["i-d2", DEAD]
    assert len(set(acted(d))) == len(acted(d))


# 2. Confirmed, not suspected -----------------------------------------------------------


def test_inv2_unconfirmed_refused() -> None:
    d = decide(view(suspicions={}), policy())
    assert acted(d) == [] and "unconfirmed: 1/2" in refusal(d)


def test_inv2_self_counts_and_one_peer_confirms() -> None:
    assert acted(decide(view(suspicions={DEAD: {"i-1"}}), policy())) == [DEAD]
    assert acted(decide(view(suspicions={}), policy(confirm_observers=1))) == [DEAD]


def test_inv2_observer_listed_twice_counts_once_member_never_vouches_for_itself() -> None:
    d = decide(view(suspicions={DEAD: {OBS, DEAD}}), policy())
    assert acted(d) == [] and "unconfirmed: 1/2" in refusal(d)


def test_inv2_three_observers_needed() -> None:
    p = policy(confirm_observers=3)
    assert acted(decide(view(suspicions={DEAD: {"i-1"}}), p)) == []
    assert acted(decide(view(suspicions={DEAD: {"i-1", "i-2"}}), p)) == [DEAD]


def test_inv2_unknown_ec2_state_never_counts_as_dead() -> None:
    d = decide(view(ec2_state={DEAD: None}), policy())
    assert acted(d) == [] and "ec2-state-unknown" in refusal(d)
    d = decide(view(ec2_state={}), policy())
    assert acted(d) == [] and "ec2-state-unknown" in refusal(d)


@pytest.mark.parametrize("state", ["shutting-down", "stopping"])
def test_inv2_going_away_means_already_being_replaced(state: str) -> None:
    d = decide(view(ec2_state={DEAD: state}), policy())
    assert acted(d) == [] and "already-being-replaced" in refusal(d)


def test_inv2_terminated_and_leased_is_already_being_replaced() -> None:
    d = decide(view(ec2_state={DEAD: "terminated"}, leases={DEAD}), policy())
    assert acted(d) == [] and "already-being-replaced" in refusal(d)
    assert acted(decide(view(ec2_state={DEAD: "terminated"}), policy())) == [DEAD]


def test_inv2_pending_and_unrecognised_states_refused() -> None:
    assert "ec2-pending" in refusal(decide(view(ec2_state={DEAD: "pending"}), policy()))
    assert "unrecognised" in refusal(decide(view(ec2_state={DEAD: "rebooting"}), policy()))


def running(**over: Any) -> HealView:
    base: dict[str, Any] = dict(ec2_state={DEAD: "running"}, probe_ok={DEAD: False},
                                peer_probes={DEAD: {"i-1": False}},
                                silent_for={DEAD: 200.0}, asg_health={DEAD: "Healthy"})
    base.update(over)
    return view(**base)


def test_inv2_running_but_silent_needs_policy() -> None:
    d = decide(running(), policy(replace_silent=False))
    assert acted(d) == [] and "replace_silent is off" in refusal(d)
    d = decide(running(), policy(replace_silent=True))
    assert acted(d) == [DEAD]
    assert any("probes fail" in r for r in d.actions[0].reasons)


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        (dict(probe_ok={DEAD: True}), "probe-ok"),
        (dict(probe_ok={DEAD: None}), "probe-unknown"),
        (dict(probe_ok={}), "probe-unknown"),
        (dict(silent_for={DEAD: 119.0}), "silent 119s < silent_after_s"),
        (dict(silent_for={DEAD: None}), "silent unknown"),
        (dict(asg_health={DEAD: "Unhealthy"}), "already-being-replaced"),
    ],
)
def test_inv2_running_but_silent_refusals(over: dict[str, Any], needle: str) -> None:
    d = decide(running(**over), policy(replace_silent=True))
    assert acted(d) == [] and needle in refusal(d)


def test_inv2_silent_exactly_at_threshold_acts() -> None:
    d = decide(running(silent_for={DEAD: 120.0}), policy(replace_silent=True))
    assert acted(d) == [DEAD]


def test_inv2_probe_answering_refuses_even_when_ec2_says_stopped() -> None:
    d = decide(view(probe_ok={DEAD: True}), policy())
    assert acted(d) == [] and "probe-ok" in refusal(d)


# 3. Sick observers abstain -------------------------------------------------------------


@pytest.mark.parametrize(("over", "reason"), [
    (dict(observer_sick=True), "observer-sick"),
    (dict(observer_fresh=True), "observer-fresh"),
])
def test_inv3_sick_or_fresh_observer_abstains(over: dict[str, Any], reason: str) -> None:
    d = decide(view(**over), policy())
    assert acted(d) == []
    assert d.freeze is not None and d.freeze.reason.startswith(reason)
    assert d.freeze.scope == "observer"
    assert refusal(d).startswith("frozen: " + reason)


def test_inv3_observer_reason_comes_first_even_with_group_reasons() -> None:
    d = decide(view(observer_sick=True, paused=True, api_healthy=False), policy())
    assert d.freeze is not None and d.freeze.scope == "observer"
    assert [r.split(":")[0] for r in d.freeze.reasons] == ["observer-sick", "paused", "api-failing"]


def test_inv3_observer_never_replaces_itself() -> None:
    v = view(verdicts={OBS: "dead"}, suspicions={OBS: {"i-1", "i-2"}}, ec2_state={OBS: "stopped"})
    d = decide(v, policy())
    assert acted(d) == [] and "self" in refusal(d, OBS)


# 4. Mass death means a sick observer ---------------------------------------------------


def test_inv4_mass_death_freezes_with_counts() -> None:
    verdicts = {"i-a": "dead", "i-b": "dead", "i-c": "suspect", "i-d": "alive", "i-e": "alive"}
    d = decide(view(verdicts=verdicts, group_size=5), policy())
    assert acted(d) == [] and d.frozen
    assert d.freeze is not None and d.freeze.reason == "mass-death: 3/5 dead/suspect > 0.34"
    assert d.freeze.scope == "group"
    assert {r.member_id for r in d.refusals} == {"i-a", "i-b", "i-c"}


def test_inv4_boundary_is_strictly_more_than() -> None:
    verdicts = {"i-a": "dead", "i-b": "alive"}
    p = policy(freeze_fraction=0.5, confirm_observers=1)
    v = view(verdicts=verdicts, group_size=2, suspicions={}, ec2_state={"i-a": "stopped"})
    assert acted(decide(v, p)) == ["i-a"]  # 1/2 is not > 0.5
    assert decide(v, policy(freeze_fraction=0.49, confirm_observers=1)).frozen


def test_inv4_one_death_in_three_heals_at_default_fraction() -> None:
    v = view(verdicts={DEAD: "dead", "i-1": "alive", OBS: "alive"}, group_size=3)
    assert acted(decide(v, policy())) == [DEAD]


def test_inv4_api_failing_freezes() -> None:
    d = decide(view(api_healthy=False), policy())
    assert acted(d) == [] and d.freeze is not None and d.freeze.reason == "api-failing"


def test_inv4_grace_and_leaving_do_not_count_towards_mass_death() -> None:
    verdicts = {DEAD: "dead", "i-a": "grace", "i-b": "leaving", "i-c": "unknown", "i-d": "alive"}
    d = decide(view(verdicts=verdicts, group_size=5), policy())
    assert acted(d) == [DEAD]


# 5. Rate limit and floor ---------------------------------------------------------------


def many_dead(n: int, group: int) -> HealView:
    ids = [f"i-d{k:02d}" for k in range(n)]
    return view(
        verdicts={m: "dead" for m in ids}, group_size=group,
        suspicions={m: {"i-1"} for m in ids}, ec2_state={m: "stopped" for m in ids},
    )


def test_inv5_rate_limit_counts_budget_and_this_decision() -> None:
    p = policy(max_per_window=2, max_in_flight_fraction=1.0)
    d = decide(many_dead(3, 100), p)
    assert acted(d) == ["i-d00", "i-d01"]
    assert "rate-limit: 2/2" in refusal(d, "i-d02")
    d = decide(replace(many_dead(3, 100), budget=1), p)
    assert acted(d) == ["i-d00"]
    d = decide(replace(many_dead(3, 100), budget=2), p)
    assert acted(d) == []


def test_inv5_in_flight_cap_is_ten_percent_with_floor_one() -> None:
    p = policy(max_per_window=100)
    assert acted(decide(many_dead(3, 30), p)) == ["i-d00", "i-d01", "i-d02"]  # 10% of 30
    assert len(acted(decide(many_dead(5, 49), p))) == 4
    d = decide(many_dead(2, 5), policy(max_per_window=100, freeze_fraction=1.0))
    assert acted(d) == ["i-d00"] and "in-flight: 1/1" in refusal(d, "i-d01")
    busy = replace(many_dead(3, 30), in_flight=3)
    assert acted(decide(busy, p)) == []


def test_inv5_in_flight_cap_arithmetic() -> None:
    p = policy()
    assert [p.in_flight_cap(n) for n in (0, 1, 9, 10, 19, 20, 30, 70, 100)] == [
        1, 1, 1, 1, 1, 2, 3, 7, 10]


def test_inv5_budget_counter_windows() -> None:
    assert budget_after(None, 100.0, 300) == (100.0, 0)
    assert budget_after({"window_start": 100.0, "used": 2}, 399.0, 300) == (100.0, 2)
    assert budget_after({"window_start": 100.0, "used": 2}, 400.0, 300) == (400.0, 0)
    # a store frontend a little behind never resets the window
    assert budget_after({"window_start": 100.0, "used": 2}, 90.0, 300) == (100.0, 2)
    assert budget_take(None, 5.0, 300, 1) == {"window_start": 5.0, "used": 1}
    assert budget_take({"window_start": 5.0, "used": 1}, 6.0, 300, 1) is None
    assert budget_take({"window_start": 5.0, "used": 1}, 305.0, 300, 1) == {
        "window_start": 305.0, "used": 1}


@pytest.mark.parametrize("rec", [
    [], {"used": 1}, {"window_start": "x", "used": 1}, {"window_start": 1.0, "used": -1},
    {"window_start": 1.0, "used": 1.5}, {"window_start": 1.0, "used": True},
])
def test_inv5_malformed_counter_rejected(rec: Any) -> None:
    with pytest.raises(MalformedRecord):
        budget_after(rec, 0.0, 300)


def test_inv5_zero_budget_never_acts() -> None:
    d = decide(view(), policy(max_per_window=0))
    assert acted(d) == [] and "rate-limit" in refusal(d)


# 6. Stop after failure -----------------------------------------------------------------


def test_inv6_failed_replacements_freeze() -> None:
    assert acted(decide(view(consecutive_failures=2), policy())) == [DEAD]
    d = decide(view(consecutive_failures=3), policy())
    assert acted(d) == [] and d.freeze is not None
    assert d.freeze.reason == "failed-replacements: 3"


def test_inv6_failure_helpers() -> None:
    assert is_failed_replacement(100.0, 220.0, 120.0, heartbeated=False)
    assert not is_failed_replacement(100.0, 219.0, 120.0, heartbeated=False)
    assert not is_failed_replacement(100.0, 999.0, 120.0, heartbeated=True)
    assert failure_streak([]) == 0
    assert failure_streak([True, True, False, True, True]) == 2
    assert failure_streak([True, True, True]) == 3


# 7 and 8. Grace; leaving is not dying -------------------------------------------------


@pytest.mark.parametrize(("verdict", "needle"), [
    ("grace", "grace"), ("leaving", "leaving is not dying"),
    ("suspect", "suspect"), ("unknown", "unknown"),
])
def test_inv7_inv8_only_dead_is_acted_on(verdict: str, needle: str) -> None:
    v = view(verdicts={DEAD: verdict}, suspicions={DEAD: {"i-1", "i-2", "i-3"}})
    d = decide(v, policy(confirm_observers=1))
    assert acted(d) == [] and needle in refusal(d)


# 9. Kill switch and dry-run ------------------------------------------------------------


def test_inv9_paused_freezes() -> None:
    d = decide(view(paused=True), policy())
    assert acted(d) == [] and d.freeze is not None and d.freeze.reason.startswith("paused")


def test_inv9_dry_run_decides_but_marks() -> None:
    d = decide(view(), policy(mode="dry-run"))
    assert acted(d) == [DEAD] and all(a.dry_run for a in d.actions)
    assert not [a for a in d.actions if not a.dry_run]


def test_inv9_off_does_nothing_at_all() -> None:
    d = decide(view(paused=True, observer_sick=True), policy(mode="off"))
    assert d == Decision()


# 10. Own health only --------------------------------------------------------------------


def test_inv10_alive_member_never_acted_on_whatever_else_says() -> None:
    v = view(verdicts={DEAD: "alive"}, suspicions={DEAD: {"i-1", "i-2"}},
             ec2_state={DEAD: "running"}, asg_health={DEAD: "Unhealthy"},
             probe_ok={DEAD: False}, silent_for={DEAD: 10_000.0})
    d = decide(v, policy(replace_silent=True, confirm_observers=1))
    assert d == Decision()


# 11. Every decision is an event -----------------------------------------------------------


def test_inv11_every_considered_member_has_an_action_or_a_refusal() -> None:
    verdicts = {"i-a": "dead", "i-b": "grace", "i-c": "leaving", "i-d": "alive", "i-e": "dead",
                "i-f": "unknown"}
    v = view(verdicts=verdicts, group_size=20, suspicions={"i-a": {"i-d"}},
             ec2_state={"i-a": "stopped", "i-e": None})
    d = decide(v, policy())
    seen = acted(d) + [r.member_id for r in d.refusals]
    assert sorted(seen) == ["i-a", "i-b", "i-c", "i-e", "i-f"]
    assert all(r.reasons for r in d.refusals) and all(a.reasons for a in d.actions)


def test_inv11_order_is_deterministic() -> None:
    v1 = many_dead(4, 100)
    v2 = replace(v1, verdicts=dict(reversed(list(v1.verdicts.items()))))
    p = policy(max_per_window=2)
    assert decide(v1, p) == decide(v2, p)
    assert acted(decide(v1, p)) == ["i-d00", "i-d01"]


# Validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(("over", "key"), [
    (dict(mode="yolo"), "heal.mode"),
    (dict(action="reboot"), "heal.action"),
    (dict(grace_s=-1), "heal.grace_s"),
    (dict(max_per_window=1.5), "heal.max_per_window"),
    (dict(window_s=0), "heal.window_s"),
    (dict(freeze_fraction=0), "heal.freeze_fraction"),
    (dict(freeze_fraction=1.5), "heal.freeze_fraction"),
    (dict(confirm_observers=0), "heal.confirm_observers"),
    (dict(dead_after_s=float("inf")), "heal.dead_after_s"),
    (dict(failed_before_freeze=0), "heal.failed_before_freeze"),
    (dict(max_in_flight_fraction=0), "heal.max_in_flight_fraction"),
    (dict(replace_silent="yes"), "heal.replace_silent"),
    (dict(confirm_observers=True), "heal.confirm_observers"),
])
def test_policy_rejects_bad_values_naming_the_key(over: dict[str, Any], key: str) -> None:
    with pytest.raises(PolicyError, match=key) as info:
        policy(**over)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("over", [
    dict(verdicts={"i-a": "zombie"}), dict(group_size=-1), dict(budget=-1),
    dict(in_flight=True), dict(consecutive_failures=1.0),
])
def test_view_rejects_bad_values(over: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        view(**over)


def test_view_is_immutable() -> None:
    v = view()
    with pytest.raises(TypeError):
        v.verdicts["i-x"] = "dead"  # type: ignore[index]
    with pytest.raises(AttributeError):
        v.suspicions[DEAD].add("i-9")  # type: ignore[attr-defined]
