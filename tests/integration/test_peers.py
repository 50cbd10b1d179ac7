"""The peers watcher against a real moto S3: change marker, watch sets, store-clock ages."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from agent.aws.store import Store
from agent.clock import Clock, FakeClock
from agent.group.heartbeat import Heartbeater
from agent.group.membership import MemberRecord, watch_set, watchers
from agent.group.peers import (
    PeerWatcher,
    Roster,
    bump_marker,
    changes_since,
    marker_apply,
    marker_key,
    member_key,
    read_group,
    read_if_changed,
    should_rerender,
)
from agent.host import state as statefile


class SkewedClock(Clock):
    """The agent's wall clock off by ``offset`` seconds; monotonic from a FakeClock."""

    def __init__(self, offset: float, mono: FakeClock) -> None:
        self.offset, self.fake = offset, mono

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return self.fake.monotonic()

    def sleep(self, s: float) -> None:
        self.fake.advance(s)


@pytest.fixture
def store(moto: Any) -> Store:
    s = Store("fleet-peers", "prod", region="us-east-1")
    s.ensure_bucket()
    return s


def join(store: Store, iid: str, ip: str, state: str = "ready") -> Heartbeater:
    hb = Heartbeater(store, MemberRecord(instance_id=iid, group="web", seq=0, az="az-a",
                                         private_ip=ip), clock=FakeClock())
    assert hb.beat(state=state).ok
    return hb


def test_marker_deltas_reach_the_view_without_a_list(store: Store) -> None:
    me = join(store, "i-me", "10.0.0.1")
    clock = FakeClock()
    w = PeerWatcher(store, "web", "i-me", clock=clock)
    r = w.tick()
    assert r.listed and {p.id for p in w.peers()} == {"i-me"}
    join(store, "i-b", "10.0.0.2")
    clock.advance(10)
    r = w.tick()
    assert r.marker_changed and not r.listed
    assert [p["id"] for p in w.template_peers()] == ["i-b", "i-me"]
    assert w.watching == ["i-b"]
    # steady state: 1 marker GET (304) + k watch GETs, no LIST
    clock.advance(10)
    before = sum(store.usage.requests.values())
    r = w.tick()
    assert not r.listed and not r.marker_changed
    assert sum(store.usage.requests.values()) - before == 2
    assert me.record.seq == 1


def test_leave_and_booting_are_not_ready_peers(store: Store) -> None:
    join(store, "i-me", "10.0.0.1")
    b = join(store, "i-b", "10.0.0.2")
    join(store, "i-c", "10.0.0.3", state="booting")
    w = PeerWatcher(store, "web", "i-me", clock=FakeClock())
    w.tick()
    assert [p["id"] for p in w.template_peers()] == ["i-b", "i-me"]
    b.leave("test")
    w.clock.advance(10)
    w.tick()
    assert "i-b" not in {p.id for p in w.peers()}
    assert [p["id"] for p in w.template_peers()] == ["i-me"]


def test_ages_on_store_clock_unchanged_by_local_skew(store: Store) -> None:
    """±10 minutes of local wall-clock skew changes no age and no verdict."""
    for i in range(4):
        join(store, f"i-{i}", f"10.0.0.{i}")
    verdicts = {}
    ages = {}
    for offset in (-600.0, 0.0, 600.0):
        fake = FakeClock()
        clock = SkewedClock(offset, fake)
        hb = Heartbeater(store, MemberRecord(instance_id="i-me", group="web", seq=0), clock=clock)
        assert hb.beat(state="ready").ok
        w = PeerWatcher(store, "web", "i-me", clock=clock)
        for _ in range(3):
            w.tick()
            fake.advance(10)
        ages[offset] = {p.id: p.age_s for p in w.peers()}
        verdicts[offset] = {m: v.status for m, v in
                            w.verdicts(dead_after_s=30, grace_s=0).items()}
    for offset in (-600.0, 600.0):
        assert verdicts[offset] == verdicts[0.0]
        for mid, age in ages[0.0].items():
            assert age is not None and age < 120
            assert abs(ages[offset][mid] - age) < 60  # seconds of test runtime, not 600
    assert set(verdicts[0.0].values()) <= {"alive", "unknown"}


def test_conditional_read_keeps_store_date(store: Store) -> None:
    hb = join(store, "i-a", "10.0.0.9")
    r = read_if_changed(store, member_key("web", "i-a"))
    assert r.status == "changed" and r.store_now > 0
    again = read_if_changed(store, member_key("web", "i-a"), r.etag)
    assert again.status == "unchanged" and again.store_now >= r.store_now - 1
    hb.leave()
    assert read_if_changed(store, member_key("web", "i-a"), r.etag).status == "gone"


def test_bump_marker_cas_keeps_every_change(store: Store) -> None:
    stale = read_if_changed(store, marker_key("web"))
    assert stale.status == "gone"
    v1 = bump_marker(store, "web", {"id": "a", "state": "ready"})
    # a writer with an old copy loses the CAS, re-reads, and appends rather than overwrites
    v2 = bump_marker(store, "web", {"id": "b", "state": "ready"}, known=("", {}))
    marker = json.loads(store.get(marker_key("web")).body)
    assert (v1, v2) == (1, 2) and [c["id"] for c in marker["changes"]] == ["a", "b"]


def test_read_group_for_the_cli(store: Store) -> None:
    for i in range(3):
        join(store, f"i-{i}", f"10.0.0.{i}")
    peers, now = read_group(store, "web")
    assert [p.id for p in peers] == ["i-0", "i-1", "i-2"] and now > 0
    assert all(p.state == "ready" and p.health == "passing" and p.age_s is not None for p in peers)


def test_write_state(store: Store, tmp_path: Any) -> None:
    join(store, "i-me", "10.0.0.1")
    w = PeerWatcher(store, "web", "i-me", clock=FakeClock())
    w.tick()
    sp = tmp_path / "state.json"
    w.write_state(sp)
    st = statefile.read(sp)
    assert st["peers"] == [{"id": "i-me", "ip": "10.0.0.1", "az": "az-a", "state": "ready"}]


# -- pure parts -------------------------------------------------------------------------------

def test_ring_watch_sets_cover_everyone_k_times() -> None:
    ids = [f"i-{i:04d}" for i in range(50)]
    for m in ids:
        assert len(watchers(m, ids, 3)) == 3
    assert all(len(watch_set(o, ids, 3)) == 3 for o in ids)
    assert sorted(watch_set("i-0000", ids[:3], 3)) == ["i-0001", "i-0002"]
    # one join moves at most k assignments
    before = {o: set(watch_set(o, ids, 3)) for o in ids}
    after = {o: set(watch_set(o, [*ids, "i-new"], 3)) for o in ids}
    assert sum(before[o] != after[o] for o in ids) <= 3


def test_marker_log() -> None:
    m: dict = {}
    for i in range(70):
        m = marker_apply(m, {"id": f"i-{i}", "state": "ready"}, keep=64)
    assert m["version"] == 70 and len(m["changes"]) == 64
    assert [c["id"] for c in changes_since(m, 68)] == ["i-68", "i-69"]
    assert changes_since(m, 70) == []
    assert changes_since(m, 3) is None and changes_since(m, None) is None


@pytest.mark.parametrize("changes,now,expect", [
    ([], 100, False),
    ([(100, "a")], 103, False),
    ([(100, "a")], 105, True),
    ([(100, "a"), (104, "b")], 108, False),
    ([(100, "a"), (104, "b"), (126, "c")], 130, True),  # max_s after the first
    ([(100, "a"), (126, "c")], 129.9, False),
])
def test_should_rerender(changes: list, now: float, expect: bool) -> None:
    assert should_rerender(changes, now, 5, 30) is expect


def test_example_upstream_template_over_peers(store: Store) -> None:
    from pathlib import Path

    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    join(store, "i-me", "10.0.0.1")
    join(store, "i-b", "10.0.0.2")
    join(store, "i-c", "10.0.0.3", state="booting")
    w = PeerWatcher(store, "web", "i-me", clock=FakeClock())
    w.tick()
    src = Path(__file__).resolve().parents[2] / "templates/example-bundle/upstream.conf.j2"
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    out = env.from_string(src.read_text()).render(
        group="web", instance={"id": "i-me", "az": "az-a"}, vars={}, peers=w.template_peers())
    assert "server 10.0.0.1:8080" in out and "server 10.0.0.2:8080" in out
    assert "10.0.0.3" not in out and "backup" not in out


def test_a_list_with_the_same_ids_keeps_the_roster_and_refreshes_every_age(store: Store) -> None:
    """A LIST rebuilds each PeerInfo (new store clock) but keeps the roster (and the ring)
    while the set of ids is unchanged; a new id rebuilds it (issue #11)."""
    clock = FakeClock()
    hbs = [join(store, f"i-{n}", f"10.0.0.{n}") for n in range(5)]
    w = PeerWatcher(store, "web", "i-0", clock=clock, k=2)
    w.tick()
    w.tick()  # the first LIST's unknown records fetched
    roster = w.roster()
    assert roster.members == {f"i-{n}" for n in range(5)}
    before = dict(w.view)
    for hb in hbs[1:]:
        assert hb.beat().ok  # new ETags, so the LIST has news for every record
    clock.advance(400.0)
    rep = w.tick()
    assert rep.listed
    assert w.roster() is roster
    for m, p in w.view.items():
        if m == "i-0":
            continue
        t = w.liveness.members[m]
        assert (p.etag, p.last_modified, p.store_now) == (t.etag, t.last_modified, t.store_now)
        assert p.etag != before[m].etag and (p.state, p.ip, p.az) == (
            before[m].state, before[m].ip, before[m].az)
    join(store, "i-9", "10.0.0.9")
    clock.advance(400.0)
    assert w.tick().listed
    assert w.roster() is not roster and "i-9" in w.roster().members
    hbs[2].leave()  # through the marker: the roster is patched, not rebuilt
    w.tick()
    want, got = Roster.of(w.view, "i-0"), w.roster()
    assert "i-2" not in got.members and len(got.members) == 5
    assert (got.members, got.departing, dict(got.zones), dict(got.endpoints)) == (
        want.members, want.departing, dict(want.zones), dict(want.endpoints))
