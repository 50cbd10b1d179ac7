"""Leaving is not dying: the record goes (after saying 'leaving'), with an event and a marker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.aws.store import Store
from agent.clock import FakeClock
from agent.daemon.notices import check_departure
from agent.group.events import append_event, list_events
from agent.group.heartbeat import Heartbeater
from agent.group.membership import MemberRecord
from agent.group.peers import PeerWatcher, marker_key, member_key
from agent.sim.imds import ImdsServer


@pytest.fixture
def store(moto: Any) -> Store:
    s = Store("fleet-leave", "prod", region="us-east-1")
    s.ensure_bucket()
    return s


def member(store: Store, iid: str) -> Heartbeater:
    hb = Heartbeater(store, MemberRecord(instance_id=iid, group="web", seq=0,
                                         private_ip="10.0.0.5"), clock=FakeClock())
    assert hb.beat(state="ready").ok
    return hb


def test_leave_deletes_record_with_event_and_marker(store: Store, tmp_path: Any) -> None:
    hb = member(store, "i-leaver")
    hb.state_path = tmp_path / "state.json"
    assert hb.leave("ec2-agent leave") is True
    assert store.get_or_none(member_key("web", "i-leaver")) is None
    marker = json.loads(store.get(marker_key("web")).body)
    assert marker["changes"][-1] == {"id": "i-leaver", "state": "gone", "ip": "10.0.0.5",
                                     "az": "", "v": marker["version"]}
    events = list_events(store, "web")
    assert [(e.kind, e.member, e.reasons) for e in events] == [
        ("leave", "i-leaver", ("ec2-agent leave",))]
    assert events[0].details["record_deleted"] is True
    st = json.loads((tmp_path / "state.json").read_text())
    assert st["membership"] == {"state": "leaving", "left": True, "endpoint": ""}
    # idempotent, and the daemon's next beat does not resurrect the record
    assert hb.leave() is True
    assert not hb.beat().ok
    assert store.get_or_none(member_key("web", "i-leaver")) is None
    assert len(list_events(store, "web")) == 1


def test_watcher_sees_leaving_not_dead(store: Store) -> None:
    member(store, "i-obs")
    leaver = member(store, "i-leaver")
    clock = FakeClock()
    w = PeerWatcher(store, "web", "i-obs", clock=clock)
    w.tick()
    assert w.watching == ["i-leaver"]
    leaver.leave("spot interruption notice")
    clock.advance(10)
    w.tick()
    v = w.verdicts(dead_after_s=30, grace_s=0)
    # gone from the view; liveness remembers it as leaving, never dead
    from agent.group.membership import liveness

    assert liveness(w.liveness, "i-leaver", dead_after_s=30, grace_s=0).status == "leaving"
    assert "i-leaver" not in v


def test_events_sorted_and_limited(store: Store) -> None:
    t = [1_700_000_000.0]

    def now() -> float:
        t[0] += 1
        return t[0]

    for i in range(5):
        append_event(store, "web", actor="i-a", kind="refuse", member=f"i-{i}",
                     reasons=["paused"], now=now)
    evs = list_events(store, "web", limit=3)
    assert [e.member for e in evs] == ["i-2", "i-3", "i-4"]


def test_check_departure_from_imds(imds_server: ImdsServer) -> None:
    from agent.aws.imds import ImdsClient

    client = ImdsClient(retries=0)
    assert check_departure(client) is None
    imds_server.meta.target_lifecycle_state = "Terminated"
    assert "Terminated" in check_departure(client)
    imds_server.meta.target_lifecycle_state = "InService"
    imds_server.meta.spot_action = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    assert "spot" in check_departure(client)


def test_check_departure_imds_down_is_not_departure() -> None:
    from agent.aws.imds import ImdsClient

    # conftest points IMDS at a closed loopback port
    assert check_departure(ImdsClient(retries=0, timeout=0.5)) is None


def test_cli_peers_leave_events(store: Store, root: Any, capsys: Any) -> None:
    from agent.cli import main
    from agent.group.heartbeat import member_file, write_member_file
    from agent.paths import Paths

    paths = Paths.from_env()
    write_member_file(paths, {"instance_id": "i-cli", "group": "web", "bucket": "fleet-leave",
                              "prefix": "prod", "region": "us-east-1", "seq": 0})
    hb = Heartbeater(store, MemberRecord(instance_id="i-cli", group="web", seq=0, az="az-b",
                                         private_ip="10.9.9.9"), clock=FakeClock(),
                     member_path=member_file(paths))
    assert hb.beat(state="ready").ok
    member(store, "i-other")
    assert main(["peers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["state"], r["health"]) for r in rows] == [
        ("i-cli", "ready", "passing"), ("i-other", "ready", "passing")]
    assert main(["peers"]) == 0
    table = capsys.readouterr().out
    assert "i-cli" in table and "10.9.9.9" in table and "age" in table.splitlines()[0]
    assert main(["leave", "--reason", "scale-in"]) == 0
    assert store.get_or_none(member_key("web", "i-cli")) is None
    assert not hb.beat().ok  # the daemon's writer sees the leave and stays out
    assert store.get_or_none(member_key("web", "i-cli")) is None
    capsys.readouterr()
    assert main(["events", "--json"]) == 0
    evs = json.loads(capsys.readouterr().out)
    assert [(e["kind"], e["member"], e["reasons"]) for e in evs] == [
        ("leave", "i-cli", ["scale-in"])]


def test_cli_without_registration_is_an_error(root: Any, capsys: Any) -> None:
    from agent.cli import main

    assert main(["peers"]) == 1
    assert "not registered" in capsys.readouterr().err


class _LeaveDuringPut(Store):
    """A real Store whose next PUT lands only after another process's whole leave.

    Plays the race between the daemon's heartbeat and `ec2-agent leave`: the
    daemon checked "not left", then its PUT is slow; meanwhile the leaver marks
    member.json, writes "leaving" and deletes the record.
    """

    def __init__(self, inner: Store, leaver: Heartbeater) -> None:
        super().__init__(inner.bucket, inner.prefix, client=inner.client)
        self.leaver: Heartbeater | None = leaver

    def put(self, rel: str, body: bytes, **kw: Any) -> str:
        if self.leaver is not None and rel.endswith("/i-racer.json"):
            leaver, self.leaver = self.leaver, None
            assert leaver.leave("ec2-agent leave") is True
        return super().put(rel, body, **kw)


def test_heartbeat_racing_a_leave_never_resurrects_the_record(store: Store,
                                                              tmp_path: Any) -> None:
    member_path = tmp_path / "member.json"
    member_path.write_text(json.dumps({"instance_id": "i-racer", "left": False}))
    rec = MemberRecord(instance_id="i-racer", group="web", seq=0, private_ip="10.0.0.9")
    leaver = Heartbeater(store, rec, clock=FakeClock(), member_path=member_path)
    daemon = Heartbeater(_LeaveDuringPut(store, leaver), rec, clock=FakeClock(),
                         member_path=member_path)
    res = daemon.beat(state="ready")
    assert not res.ok and res.error == "left the group"
    assert store.get_or_none(member_key("web", "i-racer")) is None
    assert not daemon.beat().ok  # and it stays gone
    assert store.get_or_none(member_key("web", "i-racer")) is None
