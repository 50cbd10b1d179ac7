"""The pure bits of agent/heal/controller.py: lease records, outcomes, streaks, suspicions,
dedupe."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.group.membership import MalformedRecord
from agent.heal.controller import dedupe_key, ec2_still_agrees
from agent.heal.leases import (
    Lease,
    archivable,
    count_suspicions,
    lease_outcome,
    parse_suspicion,
    streak,
    suspicion_key,
)


@dataclass(frozen=True)
class E:
    key: str
    last_modified: float


def test_lease_round_trip_and_malformed() -> None:
    lease = Lease("i-1", "i-2", "launch", "acted", token="ec2a-x", replacement="i-3",
                  acted_at=12.5, asg="web", asg_before=("i-1", "i-4"), adopt_since=7.5,
                  reasons=("dead",))
    back = Lease.parse(lease.body(), etag='"e"', last_modified=13.0)
    assert back == lease and back.etag == '"e"' and back.last_modified == 13.0
    for raw in (b"nope", b"[]", b'{"member": "i-1"}', b'{"member":"a","holder":"b",'
                b'"action":"launch","state":"sleeping"}'):
        with pytest.raises(MalformedRecord):
            Lease.parse(raw)


@pytest.mark.parametrize("state,acted_at,lm,now,hb,expected", [
    ("refused", None, 0, 999, False, "refused"),
    ("done", 0, 0, 999, False, "done"),
    ("failed", 0, 0, 1, True, "failed"),
    ("acted", 100, 100, 150, True, "done"),
    ("acted", 100, 100, 150, False, "in-flight"),
    ("acted", 100, 100, 160, False, "failed"),     # deadline 60 s reached
    ("held", None, 100, 159, False, "in-flight"),  # holder crashed? judged by LastModified
    # A held lease whose holder vanished did nothing: it expires, it never "failed" (#10).
    ("held", None, 100, 160, False, "expired"),
    ("held", None, 100, 120, True, "in-flight"),   # nothing launched yet: not done
    ("acting", None, 100, 189, False, "in-flight"),  # a call may be under way
    ("acting", None, 100, 190, False, "expired"),    # holder died mid-call: not in flight
    ("failed", None, 100, 999, False, "aborted"),    # failed before acting: not a failure
    # Past the deadline, but its replacement or EC2 could not be read: not a failure.
    ("acted", 100, 100, 999, None, "in-flight"),
])
def test_lease_outcome(state: str, acted_at: float | None, lm: float, now: float, hb: bool | None,
                       expected: str) -> None:
    lease = Lease("i-1", "i-2", "launch", state, acted_at=acted_at, last_modified=lm)
    assert lease_outcome(lease, now, 60, hb, expiry_s=60, acting_ttl_s=90) == expected


def test_an_acting_lease_without_a_ttl_stays_in_flight() -> None:
    lease = Lease("i-1", "i-2", "launch", "acting", last_modified=100)
    assert lease_outcome(lease, 10_000, 60, False, expiry_s=60) == "in-flight"


def test_streak_orders_by_act_time_and_respects_resume() -> None:
    leases = [Lease(f"i-{n}", "o", "launch", "acted", acted_at=t)
              for n, t in ((1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0))]
    outcomes = {"i-1": "failed", "i-2": "done", "i-3": "failed", "i-4": "failed"}
    assert streak(leases, outcomes, None) == 2
    assert streak(leases, {**outcomes, "i-2": "failed"}, None) == 4
    assert streak(leases, {**outcomes, "i-2": "failed"}, 25.0) == 2
    assert streak(leases, {**outcomes, "i-4": "in-flight"}, None) == 1


@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from([None, 1.0, 2.0, 3.0]),
                          st.sampled_from([None, 1.0, 2.0]),
                          st.sampled_from(["done", "failed", "in-flight", "refused"])),
                max_size=8),
       st.sampled_from([None, 0.0, 1.0, 2.0]))
def test_streak_is_the_failures_after_the_last_success_in_act_time_order(
        rows: list[tuple[int, float | None, float | None, str]], since: float | None) -> None:
    """The one-pass count (issue #11) is ``failure_streak`` of the closed leases sorted by
    (act time, member), ties and repeated members included, as it was computed before."""
    from agent.heal.decide import failure_streak

    leases = [Lease(f"i-{m}", "o", "launch", "acted", acted_at=t, last_modified=lm)
              for m, t, lm, _ in rows]
    outcomes = {f"i-{m}": out for m, _, _, out in rows}
    closed = sorted(
        (t, x.member, outcomes[x.member] == "failed") for x in leases
        if outcomes[x.member] in ("done", "failed")
        and (t := x.acted_at if x.acted_at is not None else (x.last_modified or 0.0)) is not None
        and (since is None or t > since))
    assert streak(leases, outcomes, since) == failure_streak([f for _, _, f in closed])


@given(st.lists(st.tuples(st.sampled_from([None, 1.0, 2.0, 3.0]), st.sampled_from([0.0, 5.0]),
                          st.sampled_from(["done", "failed", "acted", "refused"]),
                          st.booleans()), max_size=8),
       st.sampled_from([None, 0.0, 1.0, 2.0]), st.sampled_from([0.0, 10.0]))
def test_closing_leases_never_changes_the_failure_streak(
        rows: list[tuple[float | None, float, str, bool]], since: float | None,
        after: float) -> None:
    """Moving ``archivable`` leases out of ``leases/`` (issue #11) leaves the failure streak
    of what stays exactly as it was, for any resume time; what moves is closed, old
    enough, and never the newest success."""
    leases = [Lease(f"i-{n}", "o", "launch", state, acted_at=t, last_modified=lm,
                    pending_terminate="i-x" if pending else "")
              for n, (t, lm, state, pending) in enumerate(rows)]

    def outcomes(xs: list[Lease]) -> dict[str, str]:
        return {x.member: x.state if x.state in ("done", "failed") else "in-flight"
                for x in xs}

    moved = archivable(leases, 10.0, after)
    kept = [x for x in leases if x not in moved]
    assert streak(kept, outcomes(kept), since) == streak(leases, outcomes(leases), since)
    for x in moved:
        assert x.acted and x.state in ("done", "failed") and not x.pending_terminate
        assert 10.0 - (x.last_modified or 0.0) >= after
    if moved:
        assert any(x.state == "done" for x in kept)


def test_closing_keeps_the_newest_success_and_young_leases() -> None:
    def lease(m: str, state: str, t: float, lm: float = 0.0) -> Lease:
        return Lease(m, "o", "launch", state, acted_at=t, last_modified=lm)

    old_ok, old_fail = lease("i-1", "done", 1.0), lease("i-2", "failed", 2.0)
    newest, after = lease("i-3", "done", 3.0), lease("i-4", "failed", 4.0)
    young = lease("i-0", "done", 0.5, lm=95.0)
    assert archivable([old_ok, old_fail, newest, after, young], 100.0, 10.0) == [old_ok,
                                                                                  old_fail]
    assert archivable([old_fail, after], 100.0, 10.0) == []  # no success: all stay


def test_suspicions_count_distinct_fresh_observers() -> None:
    g = "web"
    entries = [E(suspicion_key(g, "i-1", "a"), 100), E(suspicion_key(g, "i-1", "b"), 95),
               E(suspicion_key(g, "i-1", "c"), 50),  # expired
               E(suspicion_key(g, "i-2", "a"), 99), E(f"groups/{g}/suspicions/junk", 100)]
    assert count_suspicions(entries, g, 100, 30) == {"i-1": frozenset({"a", "b"}),
                                                      "i-2": frozenset({"a"})}
    assert parse_suspicion(suspicion_key(g, "i-1", "a"), g) == ("i-1", "a")
    assert parse_suspicion(f"groups/{g}/suspicions/i-1/", g) is None


@given(st.lists(st.tuples(st.sampled_from(["i-1", "i-2", "i-3"]),
                          st.sampled_from(["a", "b", "c", "d"]),
                          st.floats(min_value=0, max_value=200)), max_size=30),
       st.floats(min_value=1, max_value=100))
def test_suspicion_count_never_exceeds_distinct_observers(rows: list, ttl: float) -> None:
    entries = [E(suspicion_key("g", m, o), t) for m, o, t in rows]
    counted = count_suspicions(entries, "g", 200.0, ttl)
    for m, obs in counted.items():
        assert obs <= {o for mm, o, t in rows if mm == m and 200.0 - t <= ttl}


def test_dedupe_key_ignores_numbers() -> None:
    a = dedupe_key("heal-refuse", ["silent 31s < silent_after_s 120s", "unconfirmed: 1/2"])
    b = dedupe_key("heal-refuse", ["unconfirmed: 1/2", "silent 44s < silent_after_s 120s"])
    assert a == b
    assert a != dedupe_key("heal-refuse", ["unconfirmed: 1/2"])


@pytest.mark.parametrize("decided,fresh,asg,ok", [
    ("terminated", "terminated", None, True),
    ("stopped", "terminated", None, True),
    ("terminated", None, None, False),          # API error at the second look
    ("stopped", "running", None, False),        # someone started it again
    ("stopped", "stopping", None, False),
    ("running", "running", "Healthy", True),
    ("running", "running", "Unhealthy", False),
    ("running", "shutting-down", None, False),
    ("running", "stopped", None, False),
    (None, "terminated", None, False),
])
def test_second_look_at_ec2(decided: str | None, fresh: str | None, asg: str | None,
                            ok: bool) -> None:
    assert (ec2_still_agrees(decided, fresh, asg) is None) is ok


def test_lease_equality_ignores_store_metadata() -> None:
    lease = Lease("i-1", "i-2", "launch")
    assert replace(lease, etag='"x"', last_modified=5.0) == lease
