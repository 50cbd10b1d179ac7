"""Heartbeat writer and the register phase against a real moto S3."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.aws.imds import Identity
from agent.aws.store import Store
from agent.bootctx import BootContext
from agent.clock import Clock, Deadline, FakeClock
from agent.config.model import load_layers
from agent.errors import StoreError
from agent.group.heartbeat import (
    Backoff,
    Heartbeater,
    departure_reason,
    next_interval,
    phase_register,
)
from agent.group.membership import MemberRecord
from agent.group.peers import marker_key, member_key
from agent.host import state as statefile
from agent.paths import Paths

BUCKET = "fleet-test"


@pytest.fixture
def store(moto: Any) -> Store:
    s = Store(BUCKET, "prod", region="us-east-1")
    s.ensure_bucket()
    return s


def rec(iid: str = "i-0001", **kw: Any) -> MemberRecord:
    return MemberRecord(instance_id=iid, group="web", seq=0, az="eu-west-1a",
                        private_ip="10.0.0.1", **kw)


class FlakyStore:
    """A real Store whose next ``fail`` PUTs raise, as a sick network would."""

    def __init__(self, inner: Store, fail: int) -> None:
        self.inner, self.fail = inner, fail

    def put(self, *a: Any, **kw: Any) -> str:
        if self.fail > 0:
            self.fail -= 1
            raise StoreError("injected: connection reset")
        return self.inner.put(*a, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_beat_writes_seq_plus_one_and_state(store: Store, tmp_path: Path) -> None:
    sp = tmp_path / "state.json"
    hb = Heartbeater(store, rec(), clock=FakeClock(), state_path=sp)
    r1 = hb.beat(state="ready", health={"status": "warning", "checks": {}},
                 endpoint="http://10.0.0.1:8700")
    r2 = hb.beat()
    assert (r1.ok, r1.seq, r2.seq) == (True, 1, 2)
    assert r1.etag != r2.etag
    got = MemberRecord.loads(store.get(member_key("web", "i-0001")).body)
    assert (got.seq, got.state, got.health["status"], got.endpoint) == (
        2, "ready", "warning", "http://10.0.0.1:8700")
    st = statefile.read(sp)
    assert st["heartbeat"]["seq"] == 2 and st["heartbeat"]["observer_sick"] is False
    assert st["membership"]["state"] == "ready"
    # the join and the state change were announced on the marker
    marker = json.loads(store.get(marker_key("web")).body)
    assert [c["state"] for c in marker["changes"]] == ["ready"]


def test_retries_within_interval_then_succeeds(store: Store) -> None:
    clock = FakeClock()
    hb = Heartbeater(FlakyStore(store, 2), rec(), clock=clock, interval_s=10)
    r = hb.beat(state="ready")
    assert r.ok and r.attempts == 3
    assert clock.slept == [0.2, 0.4] or all(s <= 0.4 for s in clock.slept)
    assert not hb.observer_sick


class StalledStore(FlakyStore):
    """The process is stopped (SIGSTOP) inside a failing PUT: the clock jumps while it fails."""

    def __init__(self, inner: Store, clock: FakeClock, stall_s: float) -> None:
        super().__init__(inner, 1)
        self.clock, self.stall_s = clock, stall_s

    def put(self, *a: Any, **kw: Any) -> str:
        if self.fail > 0:
            self.clock.advance(self.stall_s)  # stopped mid-call; resumed to a failed call
        return super().put(*a, **kw)


def test_a_beat_that_outlived_a_stall_is_retried_at_once(store: Store) -> None:
    """stall-zone seeds 85, 106: a member stopped inside a failing PUT was resumed after
    minutes, gave the beat up (its budget long spent) and waited a whole interval, and was
    stopped again before its next beat: able, silent, acted on (seed 160: 0.22 s after
    resuming, during the retry's backoff). The beat is overdue, not early: it is retried at
    once, without a backoff, with a fresh budget."""
    clock = FakeClock()
    hb = Heartbeater(StalledStore(store, clock, 185.0), rec(), clock=clock, interval_s=10)
    r = hb.beat(state="ready")
    assert r.ok and r.attempts == 2
    assert clock.slept == []  # at once: no backoff after the stall
    assert MemberRecord.loads(store.get(member_key("web", "i-0001")).body).seq == 1


def test_calls_that_keep_hanging_still_fail_the_beat_and_make_the_observer_sick(
        store: Store) -> None:
    """The fresh budget after a stall is given once per beat: PUTs that each hang past the
    budget fail the beat (so an observer cut off this way still becomes observer-sick)."""
    clock = FakeClock()
    stalled = StalledStore(store, clock, 30.0)
    hb = Heartbeater(stalled, rec(), clock=clock, interval_s=10, sick_after=2)
    for _ in range(2):
        stalled.fail = 10_000
        r = hb.beat(state="ready")
        assert not r.ok and r.attempts == 2
    assert hb.observer_sick


def test_repeated_failure_marks_observer_sick_then_recovers(store: Store, tmp_path: Path) -> None:
    clock = FakeClock()
    sp = tmp_path / "state.json"
    flaky = FlakyStore(store, 10_000)
    hb = Heartbeater(flaky, rec(), clock=clock, interval_s=2, sick_after=3, state_path=sp)
    results = [hb.beat(state="ready") for _ in range(3)]
    assert [r.ok for r in results] == [False, False, False]
    assert all(sum(clock.slept) <= 2 * 0.8 * 3 + 1e-9 for _ in [0])  # never past the interval
    assert hb.observer_sick
    st = statefile.read(sp)
    assert st["heartbeat"]["observer_sick"] is True and "connection reset" in st["heartbeat"][
        "last_error"]
    flaky.fail = 0
    r = hb.beat()
    assert r.ok and r.seq == 4  # failed seqs are consumed, never reused
    got = MemberRecord.loads(store.get(member_key("web", "i-0001")).body)
    assert got.observer_sick is True  # the first record after recovery says it was sick
    assert not hb.observer_sick
    assert statefile.read(sp)["heartbeat"]["observer_sick"] is False


def test_backoff_and_jitter_are_values() -> None:
    b = Backoff(base_s=0.2, factor=2, cap_s=1.0)
    assert [b.delay(i) for i in (1, 2, 3, 4)] == [0.2, 0.4, 0.8, 1.0]
    assert b.delay(1, 0.999) >= 0.1
    assert next_interval(10, 0) == 10 and 9 <= next_interval(10, 0.999) <= 10


@pytest.mark.parametrize("spot,target,expect", [
    (None, None, None),
    (None, "InService", None),
    (None, "Terminated", "Terminated"),
    ({"action": "terminate", "time": "2030-01-01T00:00:00Z"}, "InService", "spot"),
    ({}, None, None),
])
def test_departure_reason(spot: Any, target: Any, expect: str | None) -> None:
    got = departure_reason(spot, target)
    assert (got is None) if expect is None else (expect in got)


# -- the register phase ---------------------------------------------------------------------

def Ctx(paths: Paths, store: Store, *, boot_id: str = "boot-1", degraded: tuple[str, ...] = (),
        deadline: Deadline | None = None) -> BootContext:
    """A real boot context after the pull phase: real Config (schema defaults), identity."""
    cfg = load_layers(None, {"group": "web",
                             "store": {"bucket": BUCKET, "prefix": "prod", "region": "us-east-1"}})
    ident = Identity("i-0reg", "ami-1", "t3.micro", "us-east-1", "eu-west-1b", "10.1.2.3", "1",
                     pending_time="2030-01-01T00:00:00Z")
    clock = Clock()
    return BootContext(paths=paths, clock=clock, deadline=deadline or Deadline.after(60),
                       started_wall=1.0, previous={}, boot_id=boot_id, identity=ident,
                       config=cfg, store=store, degraded=degraded)


def test_register_writes_ready(store: Store, root: Path) -> None:
    done = phase_register(Ctx(Paths.from_env(), store))
    assert "ready" in done.detail
    got = MemberRecord.loads(store.get(member_key("web", "i-0reg")).body)
    assert (got.state, got.seq, got.az, got.private_ip, got.image_id, got.boot_id) == (
        "ready", 2, "eu-west-1b", "10.1.2.3", "ami-1", "boot-1")
    assert got.launch_time == "2030-01-01T00:00:00Z" and got.agent_version
    assert done.ctx.state_updates["membership"]["state"] == "ready"
    # a reboot continues the sequence: never rewrites an old body
    phase_register(Ctx(Paths.from_env(), store, boot_id="boot-2"))
    assert MemberRecord.loads(store.get(member_key("web", "i-0reg")).body).seq == 4


def test_register_after_degraded_phase_says_degraded(store: Store, root: Path) -> None:
    phase_register(Ctx(Paths.from_env(), store, degraded=("pull: used last-known-good",)))
    assert MemberRecord.loads(store.get(member_key("web", "i-0reg")).body).state == "degraded"


def test_register_with_store_down_degrades(moto: Any, root: Path) -> None:
    s = Store("bucket-that-does-not-exist", "prod", region="us-east-1")
    done = phase_register(Ctx(Paths.from_env(), s, deadline=Deadline.after(3)))
    assert "not registered" in done.detail and done.ctx.degraded


def test_a_rejoin_is_not_undone_by_a_beat_that_read_the_old_member_file(
        store: Store, tmp_path: Path) -> None:
    """The daemon's main thread rejoins (spot hibernate resumed) while its heartbeat thread
    beats: the beat saw ``left`` cleared but read member.json before the rejoin rewrote it
    (``left: true``), set ``left`` again, and the rejoin then saved that: the member never
    came back (seen once in the suite with two copies running at once:
    test_spot_hibernate_leaves_keeps_data_and_rejoins_on_resume)."""
    import threading

    mp = tmp_path / "member.json"
    mp.write_text(json.dumps({"instance_id": "i-0001", "left": False}))
    hb = Heartbeater(store, rec(), clock=FakeClock(), state_path=tmp_path / "state.json",
                     member_path=mp)
    assert hb.beat().ok
    assert hb.leave("spot hibernate") and json.loads(mp.read_text())["left"]
    real_save, go = hb._save, threading.Event()

    def slow_save() -> None:  # the rejoin is slow to write member.json (a busy disk)
        go.wait(5)
        real_save()

    hb._save = slow_save  # type: ignore[method-assign]
    rejoin = threading.Thread(target=hb.rejoin)
    rejoin.start()
    while hb.left:  # the rejoin has begun: ``left`` is cleared, member.json not yet
        threading.Event().wait(0.01)
    threading.Timer(0.3, go.set).start()
    hb.beat()  # the heartbeat thread's beat, right then
    rejoin.join(10)
    hb._save = real_save  # type: ignore[method-assign]
    assert not hb.left and not json.loads(mp.read_text())["left"]
    assert hb.beat().ok and store.exists(member_key("web", "i-0001"))
