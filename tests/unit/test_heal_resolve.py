"""The pure rule for an acting lease whose holder vanished (``agent.heal.resolve``)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.heal.resolve import (
    CloudSays,
    asg_replacement,
    death_token,
    launched_for,
    newer_member,
    resolve_acting,
)
from agent.interfaces import Replacement


def test_death_token_is_a_valid_client_token_stable_per_nonce() -> None:
    t = death_token("web", "i-0abc", "00ff")
    assert t == death_token("web", "i-0abc", "00ff") and len(t) <= 64 and t.isascii()
    assert t != death_token("web", "i-0abc", "00fe") != death_token("db", "i-0abc", "00ff")


def test_launched_for_prefers_a_live_instance_with_the_token() -> None:
    found = [Replacement("i-1", "m", "terminated", "t"), Replacement("i-2", "m", "running", "t"),
             Replacement("i-0", "m", "running", "other")]
    assert launched_for("t", found) == "i-2"
    assert launched_for("x", found) is None and launched_for("", found) is None


def test_newer_member_needs_a_live_instance_naming_it() -> None:
    found = [Replacement("i-1", "m", "terminated", "t"), Replacement("i-2", "n", "running", "t")]
    assert newer_member("m", found) is None
    assert newer_member("n", found) == "i-2"


@pytest.mark.parametrize(("action", "age", "says", "verdict"), [
    ("launch", 10.0, None, "wait"),                      # young: the holder may be calling
    ("launch", None, None, "wait"),
    ("launch", 60.0, None, "observe"),
    ("hook", 60.0, None, "operator"),                    # the cloud cannot see a hook
    ("launch", 60.0, CloudSays(api_error="Throttling"), "wait"),
    ("launch", 60.0, CloudSays(launched="i-9", member_alive=True), "wait"),
    ("launch", 60.0, CloudSays(launched="i-9", member_ec2="stopped"), "acted"),
    ("launch", 60.0, CloudSays(member_ec2="stopped"), "retry"),
    ("asg-terminate", 60.0, CloudSays(member_ec2="terminated", in_asg=True), "acted"),
    ("asg-terminate", 60.0, CloudSays(member_ec2="running", in_asg=False), "acted"),
    ("asg-terminate", 60.0, CloudSays(member_ec2="running", in_asg=True), "retry"),
    ("asg-mark", 60.0, CloudSays(member_ec2="running", in_asg=True, asg_health="Unhealthy"),
     "acted"),
    ("asg-mark", 60.0, CloudSays(member_ec2="running", in_asg=True, asg_health="Healthy"),
     "retry"),
    ("bogus", 60.0, CloudSays(), "operator"),
])
def test_resolve_acting(action: str, age: float | None, says: CloudSays | None,
                        verdict: str) -> None:
    r = resolve_acting(action, age, 30.0, says, call_over_s=60.0)
    assert r.verdict == verdict and r.reasons


@pytest.mark.parametrize(("action", "says"), [
    ("launch", CloudSays(member_ec2="stopped")),
    ("asg-terminate", CloudSays(member_ec2="running", in_asg=True)),
    ("asg-mark", CloudSays(member_ec2="running", in_asg=True, asg_health="Healthy")),
])
def test_nothing_seen_is_not_nothing_done_while_a_call_may_still_land(
        action: str, says: CloudSays) -> None:
    """Partitions seed 5014: a terminate 120 s in transit landed 1 s after the lease was
    resolved "not done" and its in-flight slot given to another death."""
    assert resolve_acting(action, 119.0, 30.0, says, call_over_s=120.0).verdict == "wait"
    assert resolve_acting(action, 120.0, 30.0, says, call_over_s=120.0).verdict == "retry"
    # what is seen is seen at once: the action happened
    gone = CloudSays(launched="i-9", member_ec2="terminated", in_asg=False)
    assert resolve_acting(action, 31.0, 30.0, gone, call_over_s=120.0).verdict == "acted"


def test_resolved_launch_terminates_the_member_unless_ec2_says_it_is_gone() -> None:
    r = resolve_acting("launch", 60, 30, CloudSays(launched="i-9", member_ec2="stopped"),
                       call_over_s=60)
    assert (r.replacement, r.terminate) == ("i-9", True)
    r = resolve_acting("launch", 60, 30, CloudSays(launched="i-9", member_ec2="terminated"),
                       call_over_s=60)
    assert (r.replacement, r.terminate) == ("i-9", False)


# -- the ASG's replacement among launches it owed others too (stall-zone seed 85) -------------

_launches = st.lists(st.integers(100, 200), min_size=1, max_size=6)  # LaunchTimes, all since


@given(times=_launches, mine=st.integers(0, 5), beating=st.sets(st.integers(0, 5)))
def test_a_lease_never_adopts_while_its_own_replacement_has_not_heartbeated(
        times: list[int], mine: int, beating: set[int]) -> None:
    """Ground truth the function is not told: which launch is the action's. The others
    are owed to members that left the group, in any launch order. Before the deadline,
    whatever heartbeats, while the action's own launch is silent no other launch is
    adopted (the lease would close ``done`` on its heartbeat, its slot freed early)."""
    mine %= len(times)
    ids = [f"i-{k}" for k in range(len(times))]
    up = {ids[k] for k in beating if k < len(times)} - {ids[mine]}
    launched = list(zip(times, ids, strict=True))
    got = asg_replacement(launched, 100.0, len(times) - 1, up, settle=False)
    assert got in ("", ids[mine])


@given(times=_launches)
def test_once_every_launch_heartbeats_one_is_adopted(times: list[int]) -> None:
    ids = [f"i-{k}" for k in range(len(times))]
    launched = list(zip(times, ids, strict=True))
    got = asg_replacement(launched, 100.0, len(times) - 1, set(ids), settle=False)
    assert got in ids


def test_with_nothing_owed_the_earliest_launch_since_the_action_is_adopted_at_once() -> None:
    launched = [(99.0, "i-early"), (105.0, "i-b"), (101.0, "i-a")]
    assert asg_replacement(launched, 100.0, 0, set(), settle=False) == "i-a"
    assert asg_replacement([(99.0, "i-early")], 100.0, 0, set(), settle=False) == ""


def test_a_launch_owed_before_the_slack_counts_as_the_others_and_past_the_deadline_any_beat_does(
) -> None:
    # The other's launch came before ``since``: the one after it is the action's.
    assert asg_replacement([(95.0, "i-other"), (110.0, "i-mine")], 100.0, 1, set(),
                           settle=False) == "i-mine"
    # Two since, one beats: not before the deadline; after it, that one closes the lease.
    two = [(101.0, "i-a"), (102.0, "i-b")]
    assert asg_replacement(two, 100.0, 1, {"i-a"}, settle=False) == ""
    assert asg_replacement(two, 100.0, 1, {"i-a"}, settle=True) == "i-a"
    assert asg_replacement(two, 100.0, 1, set(), settle=True) == ""
