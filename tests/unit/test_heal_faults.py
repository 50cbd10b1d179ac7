"""Issue #10's rules in the pure core: each case named by the item it closes."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from agent.heal.decide import (
    HealPolicy,
    HealView,
    decide,
    disrupted_zones,
    lease_clearable,
    not_found_belief,
    silence_since_lit,
    stale_records,
)

OBS = "i-obs"


def policy(**over: Any) -> HealPolicy:
    base: dict[str, Any] = dict(grace_s=0, max_per_window=5, confirm_observers=2,
                                dead_after_s=30, silent_after_s=120)
    base.update(over)
    return HealPolicy(**base)


def nine(dead: list[str], **over: Any) -> HealView:
    """Nine members in three zones a/b/c (i-a0..i-c2), the observer is i-a0."""
    ids = [f"i-{z}{n}" for z in "abc" for n in range(3)]
    base: dict[str, Any] = dict(
        observer_id="i-a0", group_size=9,
        verdicts={m: ("dead" if m in dead else "alive") for m in ids if m != "i-a0"},
        suspicions={m: {"i-b0"} for m in dead}, confirmations={m: {"i-b0"} for m in dead},
        ec2_state={m: "stopped" for m in dead}, silent_for={m: 500.0 for m in dead},
        zones={m: f"us-east-1{m[2]}" for m in ids})
    base.update(over)
    return HealView(**base)


def test_zone_with_most_members_silent_is_disrupted_and_not_acted_on() -> None:
    d = decide(nine(["i-c0", "i-c1", "i-c2"]), policy())
    assert not d.frozen and d.actions == ()
    assert d.disrupted_zones == ("us-east-1c",)
    assert all(any(r.startswith("zone-disrupted: us-east-1c") for r in x.reasons)
               for x in d.refusals)


def test_rest_of_the_group_still_heals_beside_a_disrupted_zone() -> None:
    d = decide(nine(["i-c0", "i-c1", "i-c2", "i-b2"]), policy())
    assert not d.frozen and [a.member_id for a in d.actions] == ["i-b2"]


def test_one_death_in_a_zone_is_not_a_disrupted_zone() -> None:
    assert disrupted_zones({"z": 1}, {"z": 1}) == ()
    assert disrupted_zones({"z": 2}, {"z": 3}) == ("z",)
    assert disrupted_zones({"z": 2}, {"z": 4}) == ()
    d = decide(nine(["i-c0"]), policy())
    assert [a.member_id for a in d.actions] == ["i-c0"]


def test_all_zones_disrupted_means_the_observer_is_sick() -> None:
    dead = ["i-a1", "i-a2", "i-b1", "i-b2", "i-c1", "i-c2"]
    d = decide(nine(dead, zones={m: f"z{m[2]}" for m in
                                 [f"i-{z}{n}" for z in "abc" for n in range(3)]}), policy())
    assert d.frozen and d.freeze.scope == "observer"
    assert d.freeze.reason.startswith("all-zones-disrupted")


def test_inconsistent_counts_are_refused() -> None:
    v = nine(["i-c0", "i-c1", "i-c2"], group_size=2)
    d = decide(v, policy())
    assert d.frozen and d.freeze.reason.startswith("inconsistent-view")
    assert d.freeze.scope == "observer" and not d.actions


def test_suspect_is_not_a_confirmation() -> None:
    v = nine(["i-b2"], suspicions={"i-b2": {"i-b0"}}, confirmations={"i-b2": set()})
    d = decide(v, policy())
    assert not d.actions and any("unconfirmed: 1/2" in r for x in d.refusals for r in x.reasons)


def test_asg_already_replaced_is_forgotten_not_acted_on_and_not_counted() -> None:
    dead = ["i-a1", "i-b1", "i-c1", "i-a2"]  # 4/9 > 0.34 if they counted
    v = nine(dead, ec2_state={m: "terminated" for m in dead}, asg_of={m: "web" for m in dead},
             in_asg=frozenset())
    d = decide(v, policy())
    assert not d.frozen and not d.actions
    assert [f.member_id for f in d.forget] == sorted(dead)
    assert all(f.reasons[0].startswith("already-replaced") for f in d.forget)
    # Still listed by its ASG (being replaced right now): not forgotten.
    d = decide(nine(["i-a1"], ec2_state={"i-a1": "terminated"}, asg_of={"i-a1": "web"},
                    in_asg=frozenset({"i-a1"})), policy())
    assert d.forget == ()


def test_probe_from_any_observer_vetoes_and_one_failed_probe_is_not_enough() -> None:
    base = dict(ec2_state={"i-b2": "running"}, probe_ok={"i-b2": False},
                asg_health={"i-b2": "Healthy"})
    d = decide(nine(["i-b2"], **base, peer_probes={"i-b2": {"i-b0": True}}), policy())
    assert not d.actions and any(r.startswith("probe-ok") for x in d.refusals for r in x.reasons)
    d = decide(nine(["i-b2"], **base, peer_probes={"i-b2": {"i-b0": None}}), policy())
    assert not d.actions
    assert any(r.startswith("probe-unconfirmed: 1/2") for x in d.refusals for r in x.reasons)
    d = decide(nine(["i-b2"], **base, peer_probes={"i-b2": {"i-b0": False}}), policy())
    assert [a.member_id for a in d.actions] == ["i-b2"]
    # Terminated per EC2 but its endpoint answers: vetoed all the same.
    d = decide(nine(["i-b2"], probe_ok={"i-b2": True}), policy())
    assert not d.actions


def test_not_found_is_believed_only_when_it_persists() -> None:
    assert not_found_belief(100.0, 100.0, 1, 30) is None
    assert not_found_belief(100.0, 129.0, 5, 30) is None
    assert not_found_belief(100.0, 130.0, 1, 30) is None
    assert not_found_belief(100.0, 130.0, 2, 30) == "terminated"


def test_only_a_lease_without_an_action_can_be_cleared() -> None:
    for state in ("held", "refused", "failed"):
        assert lease_clearable(state, False, 0.0, 60)
    assert not lease_clearable("failed", True, 999.0, 60)
    assert not lease_clearable("acted", True, 999.0, 60)
    assert not lease_clearable("acting", False, 10.0, 60)
    assert lease_clearable("acting", False, 60.0, 60)


def test_a_zone_half_watched_is_judged_on_every_record_s_age() -> None:
    """zone-outage seed 129: the observer watches two of zone c's four members (one dead,
    one suspect); the other two are watched only by dark observers, so no suspicion of
    them exists. 2/4 is no disrupted zone: the observer acted on a dark member. The
    records' ages from one LIST cover every member: the zone is disrupted, nothing done."""
    ids = [f"i-{z}{n}" for z in "abc" for n in range(4)]
    v = HealView(
        observer_id="i-a0", group_size=12,
        verdicts={"i-c0": "dead", "i-c1": "suspect", "i-a1": "alive", "i-b1": "alive"},
        suspicions={"i-c0": {"i-b0"}}, confirmations={"i-c0": {"i-b0"}},
        ec2_state={"i-c0": "stopped"}, silent_for={"i-c0": 500.0},
        zones={m: f"us-east-1{m[2]}" for m in ids})
    assert [a.member_id for a in decide(v, policy()).actions] == ["i-c0"]  # the old picture
    whole = replace(v, record_stale=stale_records(
        {**{m: 5.0 for m in ids}, "i-c0": 90.0, "i-c1": 60.0, "i-c2": 31.0, "i-c3": 30.0,
         "i-a1": 29.0}, 30.0))
    d = decide(whole, policy())
    assert not d.actions and d.disrupted_zones == ("us-east-1c",)
    assert any(r.startswith("zone-disrupted: us-east-1c") for x in d.refusals
               for r in x.reasons)


def test_members_in_grace_whose_records_are_stale_count_as_silent_for_the_zone() -> None:
    """stall-zone seeds 143 and 152: the observer had every member of zone c but one (143)
    or two (152) in ``grace`` (a replacement started during the outage, or members that had
    just joined), their records stale: grace counted as seen alive, so the zone looked
    lit and its one dead member was terminated in the dark. Grace is not judged, not alive."""
    ids = [f"i-{z}{n}" for z in "abc" for n in range(4)]
    v = HealView(
        observer_id="i-a0", group_size=12,
        verdicts={"i-c0": "dead", "i-c1": "grace", "i-c2": "grace", "i-c3": "grace",
                  "i-a1": "alive"},
        suspicions={"i-c0": {"i-b0"}}, confirmations={"i-c0": {"i-b0"}},
        ec2_state={"i-c0": "stopped"}, silent_for={"i-c0": 500.0},
        zones={m: f"us-east-1{m[2]}" for m in ids},
        record_stale=frozenset({"i-c0", "i-c1", "i-c2", "i-c3"}))
    d = decide(v, policy())
    assert not d.actions and d.disrupted_zones == ("us-east-1c",)
    # records fresh: grace members are not silent, the one dead member is acted on
    fresh = replace(v, record_stale=frozenset({"i-c0"}))
    assert [a.member_id for a in decide(fresh, policy()).actions] == ["i-c0"]


def test_record_ages_only_ever_add_abstention() -> None:
    """A stale record is no death: never acted on, and a member this observer itself sees
    alive (or its own record) is not counted stale by one clock."""
    v = nine([], record_stale={"i-c0", "i-c1", "i-c2"},
             verdicts={"i-c0": "alive", "i-c1": "alive", "i-c2": "suspect"})
    d = decide(v, policy())
    assert not d.actions and d.disrupted_zones == ()
    assert stale_records({"a": 29.9, "b": 30.0}, 30.0) == {"b"}
    assert decide(nine([], record_stale={"i-a0", "i-a1", "i-a2"}), policy()).disrupted_zones == ()


def test_silence_across_a_dark_zone_counts_only_from_when_it_was_lit() -> None:
    """stall-zone seeds 3, 37, 39: a member silent through its zone's outage, able for a few
    seconds after the lights came back, then stopped before its next heartbeat, was acted on
    at once: its record's age counted the outage. Silence counts from the zone's last
    disrupted judgement; not dead until the zone has been lit ``dead_after_s``."""
    zones = {"i-c1": "c", "i-c2": "c", "i-a1": "a"}
    verdicts = {"i-c1": "dead", "i-c2": "alive", "i-a1": "dead"}
    silent = {"i-c1": 400.0, "i-a1": 400.0}
    v, s = silence_since_lit(verdicts, silent, zones, {"c": 10.0}, 30.0)
    assert v == {"i-c1": "suspect", "i-c2": "alive", "i-a1": "dead"}  # zone a: as it was
    assert s == {"i-c1": 10.0, "i-a1": 400.0}
    v, s = silence_since_lit(verdicts, silent, zones, {"c": 45.0}, 30.0)
    assert v["i-c1"] == "dead" and s["i-c1"] == 45.0  # lit long enough: dead, silent 45 s
    # ...so a running-but-silent member still needs silent_after_s from then (invariant 14)
    d = decide(nine(["i-c1"], ec2_state={"i-c1": "running"}, silent_for=s,
                    probe_ok={"i-c1": False}, peer_probes={"i-c1": {"i-b0": False}}), policy())
    assert not d.actions
    assert any(r.startswith("silent 45s < silent_after_s") for x in d.refusals for r in x.reasons)
    assert silence_since_lit(verdicts, silent, zones, {}, 30.0) == (verdicts, silent)
