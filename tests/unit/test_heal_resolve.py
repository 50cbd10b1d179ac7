"""The pure rule for an acting lease whose holder vanished (``agent.heal.resolve``)."""

from __future__ import annotations

import pytest

from agent.heal.resolve import (
    CloudSays,
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
    r = resolve_acting(action, age, 30.0, says)
    assert r.verdict == verdict and r.reasons


def test_resolved_launch_terminates_the_member_unless_ec2_says_it_is_gone() -> None:
    r = resolve_acting("launch", 60, 30, CloudSays(launched="i-9", member_ec2="stopped"))
    assert (r.replacement, r.terminate) == ("i-9", True)
    r = resolve_acting("launch", 60, 30, CloudSays(launched="i-9", member_ec2="terminated"))
    assert (r.replacement, r.terminate) == ("i-9", False)
