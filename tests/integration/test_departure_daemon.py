"""IMDS notices acted on by real agent processes (boot + run) on the emulated cloud.

As real agent processes: spot hibernate/stop (leave, keep the data, rejoin on resume or
at the next boot) and a warm pool (boot, join only InService, no backups before). The
daemon's departure task in-process (its DaemonLike side, fake clock, real store and
emulator): scheduled events, a rebalance with departure configured (final backup,
notice in state and metrics), `ec2-agent leave` while suspended, the launch hook of a
Warmed:Running instance.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.aws.imds import ImdsClient
from agent.aws.store import Store
from agent.clock import FakeClock
from agent.config.model import load_layers
from agent.daemon.notices import DepartureWatch
from agent.group.heartbeat import Heartbeater
from agent.group.membership import MemberRecord
from agent.paths import Paths
from agent.sim.cloud import EmbeddedCloud
from agent.sim.fleet import fast_config
from agent.sim.imds import ImdsServer, InstanceMeta, maintenance_time
from agent.sim.netutil import wait_for

DATA = [{"name": "app", "path": "/var/lib/app", "required": False, "backup_interval_s": 3600}]


def _config(cloud: EmbeddedCloud, **extra: Any) -> dict:
    return fast_config(cloud, "web", interval_s=0.5, heal={"mode": "off"},
                       bundle={"refresh_s": 30}, **extra)


def _members(cloud: EmbeddedCloud) -> set[str]:
    store = Store(cloud.bucket, cloud.prefix)
    return {e.key.rsplit("/", 1)[-1].removesuffix(".json")
            for e in store.list("groups/web/members/").entries}


def _state(cloud: EmbeddedCloud, iid: str) -> dict:
    return cloud.instances[iid].state() or {}


def _seq(cloud: EmbeddedCloud, iid: str) -> int:
    return int(_state(cloud, iid).get("heartbeat", {}).get("seq", 0))


def _stop(p: Any) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=60)


def test_spot_hibernate_leaves_keeps_data_and_rejoins_on_resume(cloud: EmbeddedCloud) -> None:
    iid = cloud.run_standalone("web", 1, _config(cloud, data=DATA))[0]
    data = cloud.instances[iid].root / "var/lib/app"
    data.mkdir(parents=True)
    (data / "kept.txt").write_text("local data\n")
    assert cloud.boot_all([iid]) == {iid: 0}
    p = cloud.spawn(iid, "run")
    try:
        wait_for(lambda: _seq(cloud, iid) >= 3)  # the daemon beats (the boot wrote 1, 2)
        meta = cloud.imds.host(iid).meta
        meta.spot_action = {"action": "hibernate", "time": "2026-12-01T12:02:00Z"}
        wait_for(lambda: _state(cloud, iid).get("membership", {}).get("state") == "suspended",
                 timeout=90)
        assert iid not in _members(cloud)  # left first: nobody replaces it
        wait_for(lambda: "final_backup" in _state(cloud, iid).get("daemon", {}), timeout=60)
        st = _state(cloud, iid)
        assert "hibernate" in st["membership"]["reason"]
        assert st["notices"]["spot"] == {"action": "hibernate", "time": "2026-12-01T12:02:00Z"}
        assert st["daemon"]["final_backup"]["ok"] is True
        assert (data / "kept.txt").read_text() == "local data\n"
        assert p.poll() is None
        seq_left = _seq(cloud, iid)
        # resumed: the notice is gone; the same process rejoins with the same instance id
        meta.spot_action = None
        wait_for(lambda: iid in _members(cloud), timeout=90)
        wait_for(lambda: _state(cloud, iid).get("membership", {}).get("state") == "ready")
        assert _seq(cloud, iid) > seq_left
        assert "notices" in _state(cloud, iid) and _state(cloud, iid)["notices"] == {}
        # a spot stop: leave; the instance stops (systemd sends SIGTERM) and starts again
        # with the same id: a reboot (no restore, local data kept) that registers again
        meta.spot_action = {"action": "stop", "time": "2026-12-01T12:30:00Z"}
        wait_for(lambda: iid not in _members(cloud), timeout=90)
        wait_for(lambda: _state(cloud, iid)["membership"].get("state") == "suspended")
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(timeout=60) == 0
        assert iid not in _members(cloud)
        meta.spot_action = None
        cloud.instances[iid].boot_id = uuid.uuid4().hex  # a new kernel boot
        assert cloud.boot_all([iid]) == {iid: 0}
        st = _state(cloud, iid)
        assert (st["boot_kind"], st["membership"]["state"]) == ("reboot", "ready")
        assert iid in _members(cloud)
        assert (data / "kept.txt").read_text() == "local data\n"
    finally:
        _stop(p)


def test_warm_pool_instance_boots_but_joins_only_in_service(cloud: EmbeddedCloud) -> None:
    from agent.data.backup import latest_snapshot

    iid = cloud.run_standalone("web", 1, _config(cloud, data=DATA))[0]
    (cloud.instances[iid].root / "var/lib/app").mkdir(parents=True)
    store = Store(cloud.bucket, cloud.prefix)
    meta = cloud.imds.host(iid).meta
    meta.target_lifecycle_state = "Warmed:Running"
    assert cloud.boot_all([iid]) == {iid: 0}
    st = _state(cloud, iid)
    assert st["status"] == "done"
    assert [ph["status"] for ph in st["phases"]] == ["ok"] * len(st["phases"])
    assert st["membership"]["state"] == "held" and "Warmed:Running" in st["membership"]["reason"]
    assert iid not in _members(cloud)
    asked = cloud.imds.host(iid).faults.count
    lifecycle = "latest/meta-data/autoscaling/target-lifecycle-state"
    booted = asked("GET", lifecycle)
    p = cloud.spawn(iid, "run")
    try:
        # the daemon asks IMDS for the lifecycle state several times and still does not join
        wait_for(lambda: asked("GET", lifecycle) >= booted + 3, timeout=90)
        assert iid not in _members(cloud)
        assert _state(cloud, iid)["notices"] == {"lifecycle": {"target_state": "Warmed:Running"}}
        # and it backs nothing up: its copy of the data is not the group's
        assert _state(cloud, iid)["daemon"]["tasks"]["backup"]["runs"] >= 1
        assert latest_snapshot(store, "web", "app") is None
        meta.target_lifecycle_state = "InService"
        wait_for(lambda: iid in _members(cloud), timeout=90)
        wait_for(lambda: _state(cloud, iid).get("membership", {}).get("state") == "ready")
        wait_for(lambda: latest_snapshot(store, "web", "app") is not None, timeout=90)
        # back to the warm pool (scale-in with reuse): leave, nobody replaces it
        meta.target_lifecycle_state = "Warmed:Stopped"
        wait_for(lambda: iid not in _members(cloud), timeout=90)
        wait_for(lambda: _state(cloud, iid)["membership"].get("state") == "suspended")
    finally:
        _stop(p)


# -- scheduled maintenance: DepartureWatch in-process (its DaemonLike side), real store + IMDS --

class _Daemon:
    """The parts of agent.daemon.loop.Daemon that DepartureWatch uses (notices.DaemonLike)."""

    def __init__(self, paths: Paths, clock: FakeClock, hb: Heartbeater, policy: dict,
                 **extra: Any) -> None:
        self.paths, self.clock, self.hb = paths, clock, hb
        cfg = load_layers({"group": "web", "store": {"bucket": "fleet-depart", "prefix": "prod"}},
                          {"departure": policy, **extra})
        self.ctx = SimpleNamespace(config=cfg, identity=SimpleNamespace(instance_id="i-0maint"))
        self.departing: str | None = None
        self.imds: ImdsClient | None = None
        self.records: dict[str, Any] = {}

    def depart(self, reason: str) -> None:  # as Daemon.depart
        self.departing = reason
        self.hb.leave(reason)

    def _bulk_store(self) -> Any:
        from agent.data.backup import store_for

        return store_for(self.ctx.config, region="us-east-1")

    def _record(self, what: str, doc: dict[str, Any]) -> None:
        self.records[what] = doc


@pytest.mark.parametrize(("code", "after"), [("instance-retirement", "left"),
                                             ("instance-stop", "suspended")])
def test_scheduled_event_leaves_before_its_time(moto: Any, tmp_path: Path, code: str,
                                                after: str) -> None:
    store = Store("fleet-depart", "prod", region="us-east-1")
    store.ensure_bucket()
    clock = FakeClock(now=dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc).timestamp())
    paths = Paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    hb = Heartbeater(store, MemberRecord(instance_id="i-0maint", group="web", seq=0),
                     clock=clock, state_path=paths.state_file,
                     member_path=paths.state_dir / "member.json")
    assert hb.beat(state="ready").ok
    key = "groups/web/members/i-0maint.json"
    start = dt.datetime(2026, 12, 1, 13, tzinfo=dt.timezone.utc)  # an hour from now
    with ImdsServer(InstanceMeta("i-0maint"), clock=clock) as imds:
        imds.meta.maintenance_events = [{
            "Code": code, "Description": f"The instance is scheduled for {code}",
            "EventId": "instance-event-0abc", "State": "active",
            "NotBefore": maintenance_time(start),
            "NotAfter": maintenance_time(start + dt.timedelta(days=1))}]
        d = _Daemon(paths, clock, hb, {"maintenance_lead_s": 900})
        d.imds = ImdsClient(imds.url, clock=clock, retries=0)
        watch = DepartureWatch(d)
        assert watch.step().action == "stay"  # 3600 s ahead, lead 900 s: report only
        assert store.get_or_none(key) is not None
        st = json.loads(paths.state_file.read_text())
        assert st["notices"]["maintenance"][0]["code"] == code
        clock.advance(2700)  # 900 s before NotBefore
        decision = watch.step()
        assert decision.action == ("leave" if after == "left" else "suspend")
        assert store.get_or_none(key) is None and d.departing  # left: nobody replaces it
        assert watch.membership == after
        assert code in json.loads(paths.state_file.read_text())["membership"].get(
            "reason", decision.reason)
        # the event completes (the instance was stopped and started again in place)
        imds.meta.maintenance_events[0]["State"] = "completed"
        clock.advance(3600)
        again = watch.step()
        if after == "suspended":
            assert again.action == "join" and d.departing is None
            assert hb.beat(state="ready").ok and store.get_or_none(key) is not None
        else:
            assert again.action == "stay" and store.get_or_none(key) is None
        d.imds.close()


def test_ec2_agent_leave_while_suspended_is_final(moto: Any, tmp_path: Path) -> None:
    from agent.group.heartbeat import leave_group, write_member_file

    store = Store("fleet-depart", "prod", region="us-east-1")
    store.ensure_bucket()
    clock = FakeClock()
    paths = Paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    write_member_file(paths, {"instance_id": "i-0maint", "group": "web", "seq": 0,
                              "bucket": "fleet-depart", "prefix": "prod",
                              "region": "us-east-1", "left": False})
    hb = Heartbeater(store, MemberRecord(instance_id="i-0maint", group="web", seq=0),
                     clock=clock, state_path=paths.state_file,
                     member_path=paths.state_dir / "member.json")
    assert hb.beat(state="ready").ok
    with ImdsServer(InstanceMeta("i-0maint"), clock=clock) as imds:
        d = _Daemon(paths, clock, hb, {})
        d.imds = ImdsClient(imds.url, clock=clock, retries=0)
        watch = DepartureWatch(d)
        imds.meta.spot_action = {"action": "stop", "time": "2026-12-01T12:02:00Z"}
        assert watch.step().action == "suspend"
        assert leave_group(paths, clock=clock) is True  # an operator: stay out
        imds.meta.spot_action = None
        assert watch.step().action == "join"  # the decision; the shell refuses it
        assert watch.membership == "left" and d.departing
        assert not hb.beat(state="ready").ok
        assert store.get_or_none("groups/web/members/i-0maint.json") is None
        d.imds.close()


def test_warm_running_instance_answers_the_hook_when_it_joins(moto: Any,
                                                               tmp_path: Path) -> None:
    """Warmed:Running -> InService without a reboot: the daemon answers the launch hook
    (Stubber: moto has no CompleteLifecycleAction) and joins."""
    import boto3
    from botocore.stub import Stubber

    from agent.aws.cloud import Cloud
    from agent.aws.imds import Identity
    from agent.boot.lifecycle import ASG_TAG
    from agent.bootctx import BootContext
    from agent.clock import Deadline

    store = Store("fleet-depart", "prod", region="us-east-1")
    store.ensure_bucket()
    clock = FakeClock()
    paths = Paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    paths.state_file.write_text(json.dumps({"status": "done", "membership": {
        "state": "held", "reason": "Warmed:Running"}}))
    hb = Heartbeater(store, MemberRecord(instance_id="i-0warm", group="web", seq=2),
                     clock=clock, state_path=paths.state_file,
                     member_path=paths.state_dir / "member.json")
    client = boto3.client("autoscaling", region_name="us-east-1",
                          endpoint_url="http://127.0.0.1:9")  # never contacted: stubbed
    stub = Stubber(client)
    stub.add_response("complete_lifecycle_action", {}, {
        "AutoScalingGroupName": "web-asg", "LifecycleHookName": "launch",
        "InstanceId": "i-0warm", "LifecycleActionResult": "CONTINUE"})
    with ImdsServer(InstanceMeta("i-0warm", target_lifecycle_state="Warmed:Running"),
                    clock=clock) as imds, stub:
        d = _Daemon(paths, clock, hb, {})
        d.ctx = BootContext(
            paths=paths, clock=clock, deadline=Deadline.after(60, "run", clock),
            started_wall=0.0, previous=json.loads(paths.state_file.read_text()),
            boot_id="b-1", boot_kind="first",
            config=load_layers({"group": "web", "store": {"bucket": "fleet-depart"},
                                "boot": {"lifecycle_hook": "launch"}}, None),
            identity=Identity("i-0warm", "ami-1", "t3.micro", "us-east-1", "us-east-1a",
                              "10.0.0.1", "1", tags={ASG_TAG: "web-asg"}))
        d.imds = ImdsClient(imds.url, clock=clock, retries=0)
        watch = DepartureWatch(d, cloud=Cloud("us-east-1", autoscaling=client))
        assert d.departing and watch.never_joined
        assert watch.step().action == "hold"
        imds.meta.target_lifecycle_state = "InService"
        assert watch.step().action == "join"
        stub.assert_no_pending_responses()
        lc = json.loads(paths.state_file.read_text())["lifecycle"]
        assert lc["completed"] is True and "leaving the warm pool" in lc["reason"]
        assert d.departing is None and hb.beat(state="ready").ok
        assert store.get_or_none("groups/web/members/i-0warm.json") is not None
        d.imds.close()


def test_rebalance_leave_takes_a_final_backup(moto: Any, tmp_path: Path) -> None:
    """``departure.on_rebalance: leave``: leave early, final backup, notice in state/metrics."""
    from agent.data.backup import latest_snapshot, load_manifest
    from agent.host import metrics
    from agent.status import format_text, translate

    store = Store("fleet-depart", "prod", region="us-east-1")
    store.ensure_bucket()
    clock = FakeClock(now=dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc).timestamp())
    paths = Paths(tmp_path)
    paths.state_dir.mkdir(parents=True)
    data = paths.rooted("/var/lib/app")
    data.mkdir(parents=True)
    (data / "a.txt").write_text("a\n")
    paths.state_file.write_text(json.dumps({"status": "done"}))
    hb = Heartbeater(store, MemberRecord(instance_id="i-0maint", group="web", seq=0),
                     clock=clock, state_path=paths.state_file,
                     member_path=paths.state_dir / "member.json")
    assert hb.beat(state="ready").ok
    with ImdsServer(InstanceMeta("i-0maint"), clock=clock) as imds:
        d = _Daemon(paths, clock, hb, {"on_rebalance": "leave"}, data=DATA)
        d.imds = ImdsClient(imds.url, clock=clock, retries=0)
        watch = DepartureWatch(d)
        assert watch.step().action == "stay"
        imds.meta.rebalance_time = "2026-12-01T11:58:00Z"
        decision = watch.step()
        d.imds.close()
    assert decision.action == "leave" and watch.membership == "left"
    assert store.get_or_none("groups/web/members/i-0maint.json") is None
    fb = d.records["final_backup"]
    assert fb["ok"] is True and fb["entries"] == ["app"]
    assert "rebalance recommendation at 2026-12-01T11:58:00Z" in fb["reason"]
    snap = latest_snapshot(store, "web", "app")
    assert snap and {f.path for f in load_manifest(store, "web", "app", snap).files} == {"a.txt"}
    st = json.loads(paths.state_file.read_text())
    assert st["notices"] == {"rebalance": {"notice_time": "2026-12-01T11:58:00Z"}}
    text = metrics.get().render().decode()  # what the daemon's /metrics serves
    assert 'ec2_agent_imds_notice{kind="rebalance"} 1.0' in text
    assert 'ec2_agent_imds_notice{kind="spot"} 0.0' in text
    rep = translate(st)  # status shows it, and a notice is not a degradation
    assert rep.status == "done"
    assert "notice: rebalance recommended at 2026-12-01T11:58:00Z" in format_text(rep)
