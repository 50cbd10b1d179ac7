"""IMDS notices acted on by real agent processes (boot + run) on the emulated cloud.

Spot hibernate: leave, keep the data, rejoin on resume. Warm pool: boot, but join only
InService. Rebalance / retirement with departure configured: leave early, final backup,
the notice in state and in /metrics.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import urllib.request
from typing import Any

import pytest

from agent.sim.cloud import EmbeddedCloud
from agent.sim.fleet import fast_config
from agent.sim.imds import maintenance_time
from agent.sim.netutil import wait_for
from agent.store import Store

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
        wait_for(lambda: _seq(cloud, iid) >= 2)
        meta = cloud.imds.host(iid).meta
        meta.spot_action = {"action": "hibernate", "time": "2026-12-01T12:02:00Z"}
        wait_for(lambda: _state(cloud, iid).get("membership", {}).get("state") == "suspended",
                 timeout=30)
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
        wait_for(lambda: iid in _members(cloud), timeout=30)
        wait_for(lambda: _state(cloud, iid).get("membership", {}).get("state") == "ready")
        assert _seq(cloud, iid) > seq_left
        assert "notices" in _state(cloud, iid) and _state(cloud, iid)["notices"] == {}
    finally:
        _stop(p)


def test_warm_pool_instance_boots_but_joins_only_in_service(cloud: EmbeddedCloud) -> None:
    iid = cloud.run_standalone("web", 1, _config(cloud))[0]
    meta = cloud.imds.host(iid).meta
    meta.target_lifecycle_state = "Warmed:Running"
    assert cloud.boot_all([iid]) == {iid: 0}
    st = _state(cloud, iid)
    assert st["status"] == "done"
    assert [ph["status"] for ph in st["phases"]] == ["ok"] * len(st["phases"])
    assert st["membership"]["state"] == "held" and "Warmed:Running" in st["membership"]["reason"]
    assert iid not in _members(cloud)
    p = cloud.spawn(iid, "run")
    try:
        # the daemon runs its departure check several times and still does not join
        wait_for(lambda: _state(cloud, iid).get("daemon", {}).get("tasks", {})
                 .get("depart", {}).get("runs", 0) >= 3, timeout=30)
        assert iid not in _members(cloud)
        assert _state(cloud, iid)["notices"] == {"lifecycle": {"target_state": "Warmed:Running"}}
        meta.target_lifecycle_state = "InService"
        wait_for(lambda: iid in _members(cloud), timeout=30)
        wait_for(lambda: _state(cloud, iid).get("membership", {}).get("state") == "ready")
        # back to the warm pool (scale-in with reuse): leave, nobody replaces it
        meta.target_lifecycle_state = "Warmed:Stopped"
        wait_for(lambda: iid not in _members(cloud), timeout=30)
        assert _state(cloud, iid)["membership"]["state"] == "suspended"
    finally:
        _stop(p)


@pytest.mark.parametrize("signal_kind", ["rebalance", "retirement"])
def test_configured_early_leave_takes_a_final_backup(cloud: EmbeddedCloud,
                                                     signal_kind: str) -> None:
    cfg = _config(cloud, data=DATA, departure={"on_rebalance": "leave",
                                               "maintenance_lead_s": 3600})
    iid = cloud.run_standalone("web", 1, cfg)[0]
    data = cloud.instances[iid].root / "var/lib/app"
    data.mkdir(parents=True)
    (data / "a.txt").write_text("a\n")
    assert cloud.boot_all([iid]) == {iid: 0}
    p = cloud.spawn(iid, "run")
    try:
        store = Store(cloud.bucket, cloud.prefix)

        def endpoint() -> str:
            obj = store.get_or_none(f"groups/web/members/{iid}.json")
            return json.loads(obj.body)["endpoint"] if obj is not None else ""

        wait_for(lambda: bool(endpoint()))  # the daemon's own record, with its endpoint
        url = endpoint()
        meta = cloud.imds.host(iid).meta
        if signal_kind == "rebalance":
            meta.rebalance_time = "2026-12-01T11:58:00Z"
        else:
            soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=30)
            meta.maintenance_events = [{
                "Code": "instance-retirement", "Description": "retirement",
                "EventId": "instance-event-0abc", "State": "active",
                "NotBefore": maintenance_time(soon),
                "NotAfter": maintenance_time(soon + dt.timedelta(days=1))}]
        wait_for(lambda: iid not in _members(cloud), timeout=30)
        wait_for(lambda: "final_backup" in _state(cloud, iid).get("daemon", {}), timeout=60)
        st = _state(cloud, iid)
        assert st["membership"]["state"] == "leaving"
        fb = st["daemon"]["final_backup"]
        assert fb["ok"] is True and fb["entries"] == ["app"]
        kind = "rebalance" if signal_kind == "rebalance" else "maintenance"
        assert kind in st["notices"]
        assert ("rebalance recommendation" if kind == "rebalance"
                else "scheduled instance-retirement") in fb["reason"]
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        assert f'ec2_agent_imds_notice{{kind="{kind}"}} 1.0' in text
        assert 'ec2_agent_imds_notice{kind="spot"} 0.0' in text
        # status shows it (and a notice is not a degradation)
        from agent.status import format_text, translate

        rep = translate(st)
        assert rep.status == "done"
        assert "notice: " in format_text(rep) and json.dumps(rep.to_json())
        assert p.poll() is None
    finally:
        _stop(p)
