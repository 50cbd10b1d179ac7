"""The heal controller against a real moto server (S3 for leases/budget/events, EC2, ASG).

The peers' picture (who is dead) is given as a ``PeersView`` so each test controls
exactly what every observer believes; everything else (suspicions, leases, budget,
pause, EC2's view, events) goes through the real store and cloud.

Known moto gaps met here, said plainly:
* ``set_instance_health(Unhealthy)`` is recorded but moto never replaces the
  instance: the ``asg-mark`` test plays the ASG with a small test-side reconciler
  (sees Unhealthy, terminates it in the group, which launches a replacement).
* moto's terminate goes straight to ``terminated`` (no ``shutting-down``), so the
  "already being replaced" path is covered by the pure tests (tests/unit/test_heal.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import boto3
import pytest

from agent.aws.cloud import REPLACES_TAG, Cloud
from agent.aws.store import Store
from agent.config.model import Config, load_layers
from agent.group.events import list_events
from agent.heal.controller import HealController, ObserverHealth, PeersView
from agent.heal.leases import (
    Lease,
    close_lease,
    lease_key,
    pause,
    read_lease,
    resume,
    superseded,
)
from agent.host import state as statefile
from agent.host.endpoint import Endpoint
from agent.layout import adoption_key, marker_key, member_key
from agent.sim.cloud import EmbeddedCloud
from tests.conftest import CLOSED

GROUP = "web"


def sleep_past(seconds: float) -> None:
    """Sleep until ``seconds`` have passed since an action on every observer's reading of
    the store's clock. ``acted_at`` may be up to 1 s late (``_store_clock`` adds 1 s to a
    whole-second ``Date``) and a later step's ``Date`` up to 1 s early: 2 s, and 0.5 s to
    spare. 4.5 s for a 3 s deadline failed once in CI: the observer had not yet taken the
    lease over, and it stayed ``acted``."""
    time.sleep(seconds + 2.5)


def config(**heal: Any) -> Config:
    base = {"mode": "armed", "action": "launch", "grace_s": 0, "max_per_window": 1,
            "window_s": 300, "freeze_fraction": 0.34, "confirm_observers": 2,
            "silent_after_s": 60, "replace_silent": True}
    base.update(heal)
    return load_layers({"group": GROUP, "store": {"bucket": "replace-tests"}},
                       {"heal": base, "heartbeat": {"interval_s": 5, "dead_after_s": 15},
                        "boot": {"deadline_s": 60}})


def view(ids: list[str], dead: str, *, silent: float = 1000.0,
         endpoints: dict[str, str] | None = None) -> PeersView:
    verdicts = {m: ("dead" if m == dead else "alive") for m in ids}
    return PeersView(verdicts=verdicts, group_size=len(ids),
                     silent_for={dead: silent}, endpoints=endpoints or {},
                     members=frozenset(ids) - {dead})


def unreachable_cloud() -> Cloud:
    """EC2 and Auto Scaling at a closed port: every call fails (an API outage)."""
    return Cloud(ec2=boto3.client("ec2", region_name="us-east-1", endpoint_url=CLOSED),
                 autoscaling=boto3.client("autoscaling", region_name="us-east-1",
                                          endpoint_url=CLOSED))


def store_for(cloud: EmbeddedCloud) -> Store:
    cloud.ensure_bucket()
    return Store(cloud.bucket, cloud.prefix)


def ctl(cloud: EmbeddedCloud, me: str, cfg: Config, tmp_path: Any = None,
        adapter: Cloud | None = None, **kw: Any) -> HealController:
    state = tmp_path / f"{me}.state.json" if tmp_path is not None else None
    return HealController(store_for(cloud), adapter or Cloud("us-east-1"), cfg, me,
                          state_path=state, **kw)


def instance(cloud: EmbeddedCloud, iid: str) -> dict[str, Any]:
    return cloud.client("ec2").describe_instances(
        InstanceIds=[iid])["Reservations"][0]["Instances"][0]


def all_instances(cloud: EmbeddedCloud) -> list[dict[str, Any]]:
    res = cloud.client("ec2").describe_instances()["Reservations"]
    return [i for r in res for i in r["Instances"]]


def kinds(cloud: EmbeddedCloud) -> list[str]:
    return [e.kind for e in list_events(store_for(cloud), GROUP, 500)]


def confirm_then_act(cloud: EmbeddedCloud, ids: list[str], dead: str, cfg: Config,
                     tmp_path: Any, **kw: Any) -> tuple[HealController, Any]:
    """Observer B suspects first (1/2 observers: refused), then A confirms and acts."""
    others = [i for i in ids if i != dead]
    a, b = ctl(cloud, others[0], cfg, tmp_path, **kw), ctl(cloud, others[1], cfg, tmp_path, **kw)
    first = b.step(view(ids, dead), ObserverHealth())
    assert not [a for a in first.actions if not a.dry_run]
    assert any("unconfirmed" in r for x in first.refusals for r in x.reasons)
    return a, a.step(view(ids, dead), ObserverHealth())


def test_launch_clones_a_dead_standalone_instance(cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[2]
    ec2 = cloud.client("ec2")
    sg = ec2.create_security_group(GroupName="web-sg", Description="web",
                                   VpcId=instance(cloud, dead)["VpcId"])["GroupId"]
    ec2.modify_instance_attribute(InstanceId=dead, Groups=[sg])
    ec2.create_tags(Resources=[dead], Tags=[{"Key": "Name", "Value": "web-3"},
                                            {"Key": "team", "Value": "blue"}])
    before = instance(cloud, dead)
    ud_before = ec2.describe_instance_attribute(InstanceId=dead, Attribute="userData")
    ec2.terminate_instances(InstanceIds=[dead])
    n_before = len(all_instances(cloud))

    a, decision = confirm_then_act(cloud, ids, dead, config(action="launch"), tmp_path)

    assert [x.member_id for x in [a for a in decision.actions if not a.dry_run]] == [dead]
    assert [(o.member, o.result) for o in a.outcomes] == [(dead, "acted")]
    new_id = a.outcomes[0].replacement
    assert len(all_instances(cloud)) == n_before + 1
    new = instance(cloud, new_id)
    assert new["ImageId"] == before["ImageId"]
    assert new["InstanceType"] == before["InstanceType"]
    assert new["SubnetId"] == before["SubnetId"]
    assert {g["GroupId"] for g in new["SecurityGroups"]} == {sg}
    tags = {t["Key"]: t["Value"] for t in new["Tags"]}
    assert {t["Key"]: t["Value"] for t in before["Tags"]}.items() <= tags.items()
    assert tags[REPLACES_TAG] == dead
    ud_new = ec2.describe_instance_attribute(InstanceId=new_id, Attribute="userData")
    assert ud_new["UserData"]["Value"] == ud_before["UserData"]["Value"]
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease is not None and lease.state == "acted" and lease.replacement == new_id
    assert lease.token.startswith("ec2a-") and len(lease.token) <= 64
    assert "heal-action" in kinds(cloud)
    # The dead member's record is removed by the actor; its lease supersedes it.
    assert superseded(store_for(cloud), GROUP, dead)
    st = statefile.read(tmp_path / f"{a.me}.state.json")
    assert st is not None and st["heal"]["frozen"] is False and st["heal"]["budget_left"] == 0


def marker_version(cloud: EmbeddedCloud) -> int:
    obj = store_for(cloud).get_or_none(marker_key(GROUP))
    return 0 if obj is None else int(json.loads(obj.body)["version"])


def test_a_replaced_member_is_announced_gone_once_not_by_every_observer(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """Observers whose view still lists a replaced member do not each bump the marker:
    a thousand bumps after one replacement overflow the marker's change log and send
    every watcher to a full LIST (issue #11). A record that really survived the actor's
    delete is still removed, and announced once."""
    ids = cloud.run_standalone(GROUP, 5)
    dead = ids[2]
    cloud.client("ec2").terminate_instances(InstanceIds=[dead])
    cfg = config(action="launch")
    a, decision = confirm_then_act(cloud, ids, dead, cfg, tmp_path)
    assert [(o.member, o.result) for o in a.outcomes] == [(dead, "acted")]
    after_act = marker_version(cloud)
    assert after_act >= 1
    stale = replace(view(ids, dead), members=frozenset(ids))  # they have not seen it go
    others = [i for i in ids if i not in (dead, a.me)]
    for me in others[:2]:
        ctl(cloud, me, cfg, tmp_path).step(stale, ObserverHealth())
    assert marker_version(cloud) == after_act
    # The record survived (say the actor's delete failed): one observer removes it.
    store_for(cloud).put(member_key(GROUP, dead), b"{}")
    for me in others:
        ctl(cloud, me, cfg, tmp_path).step(stale, ObserverHealth())
    assert store_for(cloud).head(member_key(GROUP, dead)) is None
    assert marker_version(cloud) == after_act + 1


def test_asg_terminate_on_a_hung_instance(cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.create_asg(GROUP, 4)
    hung = ids[0]  # EC2 says running; the agent is silent and its endpoint does not answer
    cfg = config(action="asg-terminate", replace_silent=True, silent_after_s=60)
    eps = {hung: CLOSED}
    others = [i for i in ids if i != hung]
    a, b = ctl(cloud, others[0], cfg, tmp_path), ctl(cloud, others[1], cfg, tmp_path)
    b.step(view(ids, hung, endpoints=eps), ObserverHealth())
    # Not silent long enough yet: refused, with the reason.
    early = a.step(view(ids, hung, silent=30, endpoints=eps), ObserverHealth())
    assert not [a for a in early.actions if not a.dry_run]
    assert any(r.startswith("silent 30s") for x in early.refusals for r in x.reasons)
    decision = a.step(view(ids, hung, silent=61, endpoints=eps), ObserverHealth())
    assert [x.kind for x in [a for a in decision.actions if not a.dry_run]] == ["asg-terminate"]
    assert instance(cloud, hung)["State"]["Name"] == "terminated"
    now = cloud.asg_instance_ids(GROUP)
    assert hung not in now and len(now) == 4  # the ASG launched a replacement
    assert read_lease(store_for(cloud), GROUP, hung).state == "acted"


def test_probe_that_answers_blocks_replacing_a_silent_running_member(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """Cut off from S3 but alive: its health endpoint answers, so nobody replaces it."""
    ids = cloud.create_asg(GROUP, 4)
    cut_off = ids[1]
    cfg = config(action="asg-terminate")
    with Endpoint("127.0.0.1", 0, metrics_fn=None) as ep:
        eps = {cut_off: ep.url}
        others = [i for i in ids if i != cut_off]
        a, b = ctl(cloud, others[0], cfg, tmp_path), ctl(cloud, others[1], cfg, tmp_path)
        b.step(view(ids, cut_off, endpoints=eps), ObserverHealth())
        d = a.step(view(ids, cut_off, endpoints=eps), ObserverHealth())
    assert not d.actions
    assert any(r.startswith("probe-ok") for x in d.refusals for r in x.reasons)
    assert instance(cloud, cut_off)["State"]["Name"] == "running"
    assert read_lease(store_for(cloud), GROUP, cut_off) is None


def reconcile_asg(cloud: EmbeddedCloud, group: str) -> list[str]:
    """Plays the ASG's health replacement, which moto does not do: Unhealthy -> replaced."""
    asg = cloud.client("autoscaling")
    ids = cloud.asg_instance_ids(group)
    out = asg.describe_auto_scaling_instances(InstanceIds=ids)["AutoScalingInstances"]
    replaced = []
    for i in out:
        if i["HealthStatus"] == "Unhealthy":
            asg.terminate_instance_in_auto_scaling_group(
                InstanceId=i["InstanceId"], ShouldDecrementDesiredCapacity=False)
            replaced.append(i["InstanceId"])
    return replaced


def asg_action_replaced(cloud: EmbeddedCloud, cfg: Config, tmp_path: Any, **kw: Any
                        ) -> tuple[list[str], str, HealController, str, Store]:
    """An ASG of 4 whose last member is stopped: observer A marks it (``asg-mark``), the
    ASG (``reconcile_asg``) replaces it and the replacement heartbeats. Returns the group's
    first ids, the dead member, A (the lease's holder), the replacement and the store."""
    ids = cloud.create_asg(GROUP, 4)
    dead = ids[3]
    cloud.client("ec2").stop_instances(InstanceIds=[dead])
    a, d = confirm_then_act(cloud, ids, dead, cfg, tmp_path, **kw)
    assert [x.kind for x in d.actions if not x.dry_run] == ["asg-mark"], a.outcomes
    assert reconcile_asg(cloud, GROUP) == [dead]
    (new,) = set(cloud.asg_instance_ids(GROUP)) - set(ids)
    store = store_for(cloud)
    store.put(member_key(GROUP, new), b"{}")  # the replacement heartbeats
    return ids, dead, a, new, store


def test_asg_mark_with_a_test_side_reconciler(cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """moto records set_instance_health but never replaces: ``reconcile_asg`` plays the ASG."""
    ids = cloud.create_asg(GROUP, 4)
    dead = ids[3]
    cloud.client("ec2").stop_instances(InstanceIds=[dead])
    cfg = config(action="asg-mark")
    a, d = confirm_then_act(cloud, ids, dead, cfg, tmp_path, replace_deadline_s=3600)
    assert [x.kind for x in [a for a in d.actions if not a.dry_run]] == ["asg-mark"], a.outcomes
    health = cloud.client("autoscaling").describe_auto_scaling_instances(
        InstanceIds=[dead])["AutoScalingInstances"][0]["HealthStatus"]
    assert health == "Unhealthy", a.outcomes
    assert reconcile_asg(cloud, GROUP) == [dead]
    new = sorted(set(cloud.asg_instance_ids(GROUP)) - set(ids))
    assert len(new) == 1
    # The holder adopts the ASG's replacement; once it heartbeats the lease is done.
    a.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease.replacement == new[0] and lease.state == "acted"
    store_for(cloud).put(f"groups/{GROUP}/members/{new[0]}.json", b"{}")
    a.step(view(ids, dead), ObserverHealth())
    assert read_lease(store_for(cloud), GROUP, dead).state == "done"
    assert "heal-replaced" in kinds(cloud)


def test_an_asg_member_launched_before_the_action_landed_is_not_its_replacement(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """The call went out before the ASG launched an instance for another member and landed
    after it (a stalled SetInstanceHealth; chaos seeds 17 and 113, issue #11): that
    instance is new since ``asg_before`` but not this action's. Adopted, it closed the lease
    ``done`` and freed the in-flight slot while the real replacement was still to come."""
    ids = cloud.create_asg(GROUP, 4)
    dead, other = ids[3], ids[2]
    cloud.client("ec2").stop_instances(InstanceIds=[dead])
    cloud.client("autoscaling").terminate_instance_in_auto_scaling_group(
        InstanceId=other, ShouldDecrementDesiredCapacity=False)
    (early,) = sorted(set(cloud.asg_instance_ids(GROUP)) - set(ids))
    time.sleep(7.0)  # LaunchTime has one-second resolution; the slack is 5 s
    cfg = config(action="asg-mark")
    a, d = confirm_then_act(cloud, ids, dead, cfg, tmp_path, replace_deadline_s=3600)
    assert [x.kind for x in d.actions if not x.dry_run] == ["asg-mark"], a.outcomes
    store = store_for(cloud)
    lease = read_lease(store, GROUP, dead)
    # The group as the call found it when it was sent, before ``early`` was launched.
    store.put(lease_key(GROUP, dead), replace(lease, asg_before=tuple(ids)).body(),
              if_match=lease.etag, content_type="application/json")
    a._lease_cache.clear()
    a.step(view(ids, dead), ObserverHealth())
    assert read_lease(store, GROUP, dead).replacement == ""  # not ``early``
    assert reconcile_asg(cloud, GROUP) == [dead]
    (new,) = sorted(set(cloud.asg_instance_ids(GROUP)) - set(ids) - {early})
    a.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store, GROUP, dead)
    assert lease.replacement == new and lease.state == "acted"


def test_a_launch_owed_to_a_member_that_left_the_group_is_not_taken_for_the_actions(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """Stall-zone seed 85 (issue #11): another member left the group around the action
    (the control plane ended it, the ASG replaced it on its own), and its launch came
    first, inside the adoption slack. Adopted, it closed the lease ``done`` on its own
    heartbeat while the action's replacement still booted, and one more action went over
    the in-flight cap. Which launch is whose AWS does not say: the lease closes only once
    as many launches heartbeat as the group owed (two here), not on the first."""
    ids = cloud.create_asg(GROUP, 4)
    dead, other = ids[3], ids[2]
    cloud.client("ec2").stop_instances(InstanceIds=[dead])
    a, d = confirm_then_act(cloud, ids, dead, config(action="asg-mark"), tmp_path,
                            replace_deadline_s=3600)
    assert [x.kind for x in d.actions if not x.dry_run] == ["asg-mark"], a.outcomes
    cloud.client("autoscaling").terminate_instance_in_auto_scaling_group(
        InstanceId=other, ShouldDecrementDesiredCapacity=False)  # the ASG, on its own
    (first,) = sorted(set(cloud.asg_instance_ids(GROUP)) - set(ids))
    time.sleep(1.1)  # LaunchTime has one-second resolution: ``first`` is the earlier
    assert reconcile_asg(cloud, GROUP) == [dead]
    (second,) = sorted(set(cloud.asg_instance_ids(GROUP)) - set(ids) - {first})
    store = store_for(cloud)
    store.put(member_key(GROUP, first), b"{}")  # the other's replacement booted first
    a.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store, GROUP, dead)
    assert lease.state == "acted" and lease.replacement == "", lease  # not done on it
    store.put(member_key(GROUP, second), b"{}")
    a.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store, GROUP, dead)
    assert lease.state == "done" and lease.replacement in (first, second), lease


def test_at_the_deadline_the_holder_adopts_before_another_observer_fails_the_lease(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """With a launch owed to another member, the holder may adopt only at the deadline;
    another observer stepping first at that instant marked the lease failed while a launch
    heartbeated (N = 1,000, ``everything``, seed 1: three such "failures" froze a healthy
    group at 1,389 s). Others now give the holder ``lease_expiry_s`` past the deadline."""
    ids = cloud.create_asg(GROUP, 4)
    dead, other = ids[3], ids[2]
    cloud.client("ec2").stop_instances(InstanceIds=[dead])
    cfg = config(action="asg-mark")
    a, d = confirm_then_act(cloud, ids, dead, cfg, tmp_path, replace_deadline_s=4)
    assert [x.kind for x in d.actions if not x.dry_run] == ["asg-mark"], a.outcomes
    b = ctl(cloud, ids[1], cfg, tmp_path, replace_deadline_s=4)
    cloud.client("autoscaling").terminate_instance_in_auto_scaling_group(
        InstanceId=other, ShouldDecrementDesiredCapacity=False)  # the ASG, on its own
    assert reconcile_asg(cloud, GROUP) == [dead]
    store = store_for(cloud)
    for new in set(cloud.asg_instance_ids(GROUP)) - set(ids):
        store.put(member_key(GROUP, new), b"{}")  # both launches heartbeat
    sleep_past(4)  # the deadline
    b.step(view(ids, dead), ObserverHealth())  # another observer steps first
    assert read_lease(store, GROUP, dead).state == "acted"
    a.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store, GROUP, dead)
    assert lease.state == "done" and lease.replacement, lease
    assert "heal-replacement-failed" not in kinds(cloud)


def test_a_replacement_nobody_could_look_up_is_not_a_failed_one(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """Chaos seed 7009 (N = 47, session 15's soak): an EC2/ASG outage began 7 s after
    three ASG actions and outlasted their deadline. Each holder took "cannot list the
    group" for "nothing launched" and failed its lease while every replacement heartbeated;
    three such failures froze the healthy group (failed-replacements: 3). Past the deadline
    with the API out, the lease stays in flight; another observer, past the holder's grace,
    looks the replacement up itself instead of failing the lease unseen."""
    cfg = config(action="asg-mark")
    kw: dict[str, Any] = {"replace_deadline_s": 4, "lease_expiry_s": 3}
    ids, dead, a, new, store = asg_action_replaced(cloud, cfg, tmp_path, **kw)
    a.cloud = unreachable_cloud()  # the holder: the API is out
    sleep_past(4)  # the deadline
    a.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store, GROUP, dead)
    assert lease.state == "acted" and lease.replacement == "", lease  # not failed
    time.sleep(3.0)  # past the holder's grace (deadline + lease_expiry_s = 7 s)
    b = ctl(cloud, ids[1], cfg, tmp_path, **kw)
    b.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store, GROUP, dead)
    assert lease.state == "done" and lease.replacement == new, lease
    assert "heal-replacement-failed" not in kinds(cloud)


def test_pause_means_zero_actions_and_resume_lets_it_act(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[0]
    cloud.client("ec2").terminate_instances(InstanceIds=[dead])
    n = len(all_instances(cloud))
    store = store_for(cloud)
    pause(store, GROUP, "ops@test", "maintenance")
    cfg = config(action="launch")
    others = [i for i in ids if i != dead]
    a, b = ctl(cloud, others[0], cfg, tmp_path), ctl(cloud, others[1], cfg, tmp_path)
    for _ in range(2):
        for c in (b, a):
            d = c.step(view(ids, dead), ObserverHealth())
            assert d.frozen and d.freeze.reason.startswith("paused")
            assert not d.actions
    assert len(all_instances(cloud)) == n
    assert read_lease(store, GROUP, dead) is None
    st = statefile.read(tmp_path / f"{a.me}.state.json")
    assert st["heal"]["frozen"] and st["heal"]["paused"]
    resume(store, GROUP, "ops@test", "done")
    d = a.step(view(ids, dead), ObserverHealth())
    assert [x.member_id for x in [a for a in d.actions if not a.dry_run]] == [dead]
    assert len(all_instances(cloud)) == n + 1
    ks = kinds(cloud)
    assert ks.index("pause") < ks.index("heal-freeze") < ks.index("resume")
    assert "heal-unfreeze" in ks and "heal-action" in ks


def test_pause_flipped_between_decision_and_action_refuses_and_keeps_the_lease(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[0]
    cloud.client("ec2").terminate_instances(InstanceIds=[dead])
    n = len(all_instances(cloud))
    cfg = config(action="launch")
    others = [i for i in ids if i != dead]
    a, b = ctl(cloud, others[0], cfg, tmp_path), ctl(cloud, others[1], cfg, tmp_path)
    b.step(view(ids, dead), ObserverHealth())
    real_head = a.store.head
    flipped: list[bool] = []

    def head(rel: str) -> Any:  # an operator pauses between the decision and the action
        if rel.endswith("control/pause") and not flipped:
            flipped.append(True)
            pause(store_for(cloud), GROUP, "ops@test", "now")
        return real_head(rel)

    a.store.head = head  # type: ignore[method-assign]
    d = a.step(view(ids, dead), ObserverHealth())
    assert [x.member_id for x in [a for a in d.actions if not a.dry_run]] == [dead]  # decided...
    assert a.outcomes[-1].result == "refused" and "paused" in a.outcomes[-1].detail  # ...not done
    assert len(all_instances(cloud)) == n
    assert read_lease(store_for(cloud), GROUP, dead).state == "refused"
    assert not superseded(store_for(cloud), GROUP, dead)


def test_dry_run_decides_and_records_but_touches_nothing(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[1]
    cloud.client("ec2").terminate_instances(InstanceIds=[dead])
    n = len(all_instances(cloud))
    cfg = config(mode="dry-run", action="launch")
    a, d = confirm_then_act(cloud, ids, dead, cfg, tmp_path)
    assert [x.member_id for x in d.actions] == [dead] and d.actions[0].dry_run
    assert not [a for a in d.actions if not a.dry_run]
    a.step(view(ids, dead), ObserverHealth())  # a second step does not record it again
    assert len(all_instances(cloud)) == n
    assert read_lease(store_for(cloud), GROUP, dead) is None
    events = [e for e in list_events(store_for(cloud), GROUP, 100) if e.kind == "heal-dry-run"]
    assert len(events) == 1 and events[0].member == dead
    assert any("confirmed by 2" in r for r in events[0].reasons)


def test_api_failure_freezes_with_api_failing_and_acts_on_nothing(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[0]
    cloud.client("ec2").terminate_instances(InstanceIds=[dead])
    n = len(all_instances(cloud))
    broken = unreachable_cloud()
    cfg = config(action="launch")
    others = [i for i in ids if i != dead]
    a = ctl(cloud, others[0], cfg, tmp_path, adapter=broken)
    b = ctl(cloud, others[1], cfg, tmp_path, adapter=broken)
    b.step(view(ids, dead), ObserverHealth())
    d = a.step(view(ids, dead), ObserverHealth())
    assert d.frozen and d.freeze.reason == "api-failing"
    assert not d.actions and len(all_instances(cloud)) == n
    assert read_lease(store_for(cloud), GROUP, dead) is None
    st = statefile.read(tmp_path / f"{a.me}.state.json")
    assert st["heal"]["reason"] == "api-failing" and st["heal"]["api_error"]
    ev = [e for e in list_events(store_for(cloud), GROUP, 50) if e.kind == "heal-freeze"]
    assert ev and ev[-1].reasons[0] == "api-failing"


def test_sick_observer_abstains_and_writes_no_suspicion(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[0]
    a = ctl(cloud, ids[1], config(), tmp_path)
    d = a.step(view(ids, dead), ObserverHealth(sick=True, reason="PUT failing"))
    assert d.frozen and d.freeze.scope == "observer"
    assert store_for(cloud).list(f"groups/{GROUP}/suspicions/").entries == ()


def test_three_failed_replacements_freeze_until_resume(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 5)
    store = store_for(cloud)
    # Three earlier replacements that never heartbeated (deadline 0 s: already failed).
    for i, m in enumerate(["i-gone1", "i-gone2", "i-gone3"]):
        lease = Lease(m, "i-other", "launch", "acted", token=f"t{i}",
                      replacement=f"i-never{i}", acted_at=1000.0 + i)
        store.create(lease_key(GROUP, m), lease.body())
    dead = ids[0]
    cloud.client("ec2").terminate_instances(InstanceIds=[dead])
    cfg = config(action="launch")
    a = ctl(cloud, ids[1], cfg, tmp_path, replace_deadline_s=0)
    b = ctl(cloud, ids[2], cfg, tmp_path, replace_deadline_s=0)
    b.step(view(ids, dead), ObserverHealth())
    d = a.step(view(ids, dead), ObserverHealth())
    assert d.frozen and d.freeze.reason == "failed-replacements: 3"
    assert read_lease(store, GROUP, "i-gone1").state == "failed"
    assert "heal-replacement-failed" in kinds(cloud)
    resume(store, GROUP, "ops@test", "fixed the image")
    d = a.step(view(ids, dead), ObserverHealth())
    assert not d.frozen and [x.member_id for x in [a for a in d.actions if not a.dry_run]] == [dead]


def test_closed_leases_leave_the_lease_prefix_and_still_mean_replaced(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """Issue #11: one lease per death, kept, made every observer's step O(deaths). Old
    closed leases move to ``closed-leases/``; the member still reads itself superseded,
    and an observer whose stale view calls it dead again finds the closed lease after
    taking a fresh one, and acts on nothing."""
    ids = cloud.run_standalone(GROUP, 5)
    store = store_for(cloud)
    old = ids[4]  # replaced long ago; EC2 has it terminated
    cloud.client("ec2").terminate_instances(InstanceIds=[old])
    for m, state, t in ((old, "done", 1000.0), ("i-gone2", "failed", 1001.0),
                        ("i-gone3", "done", 1002.0)):
        store.create(lease_key(GROUP, m), Lease(m, "i-left", "launch", state, token=m,
                                                replacement=f"r-{m}", acted_at=t).body())
    members = sorted(ids[:4])
    calm = PeersView(verdicts={m: "alive" for m in members}, group_size=4,
                     members=frozenset(members))
    cfg = config(action="launch", max_per_window=5)
    ctl(cloud, members[1], cfg, tmp_path, archive_after_s=0).step(calm, ObserverHealth())
    assert read_lease(store, GROUP, old) is not None  # only the smallest id closes orphans
    ctl(cloud, members[0], cfg, tmp_path, archive_after_s=0).step(calm, ObserverHealth())
    left = [e.key.rsplit("/", 1)[-1] for e in store.list(f"groups/{GROUP}/leases/").entries]
    assert left == ["i-gone3"]  # the newest success stays: the streak is unchanged
    closed = store.list(f"groups/{GROUP}/closed-leases/").entries
    assert sorted(e.key.rsplit("/", 1)[-1] for e in closed) == sorted([old, "i-gone2"])
    assert superseded(store, GROUP, old)
    n_before = len(all_instances(cloud))
    a, decision = confirm_then_act(cloud, ids, old, cfg, tmp_path, archive_after_s=0)
    assert len(all_instances(cloud)) == n_before  # nothing launched, nothing terminated
    assert [(o.member, o.result) for o in a.outcomes] == []
    assert read_lease(store, GROUP, old) is None
    assert "heal-already-replaced" in kinds(cloud)


def test_superseded_reads_the_lease_against_me(cloud: EmbeddedCloud) -> None:
    store = store_for(cloud)
    assert not superseded(store, GROUP, "i-me")
    lease = Lease("i-me", "i-peer", "launch", "refused")
    store.create(lease_key(GROUP, "i-me"), lease.body())
    assert not superseded(store, GROUP, "i-me")  # refused: nothing was done to me
    for state in ("held", "acting"):  # taken, maybe about to act: nothing happened yet
        store.put(lease_key(GROUP, "i-me"), replace(lease, state=state).body())
        assert not superseded(store, GROUP, "i-me")
    # Failed before any action (a throttled call): not replaced either (#10 item 2).
    store.put(lease_key(GROUP, "i-me"), replace(lease, state="failed").body())
    assert not superseded(store, GROUP, "i-me")
    store.put(lease_key(GROUP, "i-me"), replace(lease, state="acted", acted_at=5.0).body())
    assert superseded(store, GROUP, "i-me")
    # Acted, and its replacement never heartbeated: the action still happened.
    store.put(lease_key(GROUP, "i-me"), replace(lease, state="failed", acted_at=5.0).body())
    assert superseded(store, GROUP, "i-me")
    store.put(lease_key(GROUP, "i-me"), b"not json")
    assert not superseded(store, GROUP, "i-me")


def test_events_carry_reasons_for_refusals_once(cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[0]  # EC2 says running and the policy does not replace silent members
    a = ctl(cloud, ids[1], config(replace_silent=False), tmp_path)
    for silent in (100, 101, 102):
        a.step(view(ids, dead, silent=silent), ObserverHealth())
    refusals = [e for e in list_events(store_for(cloud), GROUP, 100) if e.kind == "heal-refuse"]
    assert len(refusals) == 1
    assert any(r.startswith("silent-but-running") for r in refusals[0].reasons)
    assert json.loads(json.dumps(refusals[0].to_json()))["member"] == dead


def test_a_suspect_member_is_no_refusal_event_a_dead_one_is(cloud: EmbeddedCloud,
                                                              tmp_path: Any) -> None:
    """Only a member judged dead is decided about: a suspect one (stale, not yet on both
    clocks) writes no heal-refuse, or a dark zone costs an event per observer per member
    (issue #11). A dead one that is refused (1/2 observers) still does."""
    ids = cloud.run_standalone(GROUP, 4)
    a = ctl(cloud, ids[1], config(), tmp_path)
    suspect = replace(view(ids, ids[0]), verdicts={m: ("suspect" if m == ids[0] else "alive")
                                                   for m in ids})
    d = a.step(suspect, ObserverHealth())
    assert [r.member_id for r in d.refusals] == [ids[0]]
    assert "heal-refuse" not in kinds(cloud)
    a.step(view(ids, ids[0]), ObserverHealth())
    assert kinds(cloud).count("heal-refuse") == 1


@pytest.mark.parametrize("health", [None, SimpleNamespace(observer_sick=False, last_error="")])
def test_step_accepts_a_heartbeater_like_health(cloud: EmbeddedCloud, health: Any) -> None:
    ids = cloud.run_standalone(GROUP, 3)
    a = ctl(cloud, ids[0], config())
    d = a.step(PeersView(verdicts={i: "alive" for i in ids}, group_size=3), health)
    assert not d.frozen and not d.actions and not d.refusals


def test_step_takes_the_real_peer_watcher(cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """The daemon passes its ``PeerWatcher``: a fresh observer abstains (invariant 3)."""
    from agent.clock import FakeClock
    from agent.group.membership import MemberRecord
    from agent.group.peers import PeerWatcher, member_key

    ids = cloud.run_standalone(GROUP, 3)
    store = store_for(cloud)
    for i in ids:
        store.put(member_key(GROUP, i), MemberRecord(i, GROUP, 1, "ready").dumps())
    clock = FakeClock()
    watcher = PeerWatcher(store, GROUP, ids[0], clock=clock)
    watcher.tick()
    a = HealController(store, Cloud("us-east-1"), config(), ids[0], clock,
                       state_path=tmp_path / "s.json", watcher=watcher)
    d = a.step(observer_sick=False)
    assert d.frozen and d.freeze.reason.startswith("observer-fresh")
    pv = PeersView.from_watcher(watcher, dead_after_s=15, grace_s=0)
    assert pv.group_size == 3 and set(pv.verdicts) == set(ids[1:])
    clock.advance(20)  # a full window later, and everyone has heartbeated since
    for i in ids:
        store.put(member_key(GROUP, i), MemberRecord(i, GROUP, 2, "ready").dumps())
    watcher.tick()
    d = a.step(watcher, SimpleNamespace(observer_sick=False, last_error=""))
    assert not d.frozen and not d.actions
    assert not a.superseded


def test_hook_action_runs_the_command_once_for_the_dead_member(cloud: EmbeddedCloud,
                                                                tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[0]
    out = tmp_path / "hook.log"
    cfg = config(action="hook", hook=f'echo "$EC2_AGENT_DEAD_ID $EC2_AGENT_GROUP" >> {out}')
    cloud.client("ec2").terminate_instances(InstanceIds=[dead])
    _, decision = confirm_then_act(cloud, ids, dead, cfg, tmp_path)
    assert [x.kind for x in [a for a in decision.actions if not a.dry_run]] == ["hook"]
    assert out.read_text().split() == [dead, GROUP]
    # Another observer that also sees it dead finds the lease: the hook never runs twice.
    ctl(cloud, ids[3], cfg, tmp_path).step(view(ids, dead), ObserverHealth())
    assert out.read_text().split() == [dead, GROUP]
    assert "heal-action" in kinds(cloud)


@pytest.mark.parametrize("losing", ["verdict", "adoption"])
def test_a_failed_verdict_that_lost_the_race_to_done_is_not_counted(
        cloud: EmbeddedCloud, tmp_path: Any, losing: str) -> None:
    """Everything seed 1 at N = 1,000 (session 18's 24 h run, at 42,254.8 s): an API outage
    outlasted four ASG actions' deadlines. The instant it ended, two observers adopted the
    replacements and closed the leases ``done``; a third, 0.04 s behind them, counted four
    ``failed`` verdicts whose writes had lost (the ETags had moved) and froze the healthy
    group: ``failed-replacements: 3`` with 0 replacements really failed (25
    unjustified-freeze). In regression seed refused-api-outage-102 each such verdict came
    right after an adoption write that lost: the observer had found the replacement and
    judged the lease without it. A write the store refused is not a verdict.
    The holder closes the lease ``done`` just before observer C's write lands: C's
    adoption of the new instance, or C's ``failed`` (C sees a wrong answer, the group
    without its new instance: "nothing launched")."""
    cfg = config(action="asg-mark", failed_before_freeze=1)
    kw: dict[str, Any] = {"replace_deadline_s": 2, "lease_expiry_s": 1}
    ids, dead, a, new, store = asg_action_replaced(cloud, cfg, tmp_path, **kw)
    sleep_past(3)  # the deadline and the holder's grace (deadline + lease_expiry_s)
    c = ctl(cloud, ids[2], cfg, tmp_path, **kw)
    if losing == "verdict":
        c.cloud.asg_member_ids = lambda name: sorted(ids)  # type: ignore[method-assign]
    real_put = c.store.put
    mark = b'"failed"' if losing == "verdict" else new.encode()

    def put(rel: str, body: bytes, **kwargs: Any) -> str:
        if rel == lease_key(GROUP, dead) and mark in body:
            a.step(view(ids, dead), ObserverHealth())  # the holder closes it first
            assert read_lease(store, GROUP, dead).state == "done"
        return real_put(rel, body, **kwargs)

    c.store.put = put  # type: ignore[method-assign]
    d = c.step(view(ids, dead), ObserverHealth())
    assert not (d.frozen and "failed-replacements" in d.freeze.reason), d.freeze
    lease = read_lease(store, GROUP, dead)
    assert lease.state == "done" and lease.replacement == new, lease
    assert "heal-replacement-failed" not in kinds(cloud)
    d = c.step(view(ids, dead), ObserverHealth())  # the next step reads the store's copy
    assert not (d.frozen and "failed-replacements" in d.freeze.reason), d.freeze


def test_two_leases_never_adopt_the_same_launch(cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """Session 19's 24 h run: one launch (a28) was adopted by the leases of two members
    (4b9 and 36f). The replacements an observer counts as taken came from its own lease
    cache, and a lease listed before the one it maintains was not yet read: two ASG
    actions, both launches heartbeat, A adopts one for its member, and B, which lists its
    own member's lease first, adopted the same one. Closed ``done`` on another member's
    instance, a lease hides a replacement that failed and frees its in-flight slot early."""
    ids = cloud.create_asg(GROUP, 6)
    first, second, *_, y, x = sorted(ids)  # y's lease lists before x's
    cfg = config(action="asg-mark", max_per_window=2)
    a = ctl(cloud, first, cfg, tmp_path, replace_deadline_s=3600)
    b = ctl(cloud, second, cfg, tmp_path, replace_deadline_s=3600)
    store = store_for(cloud)
    acted_at = time.time()
    for member, holder in ((x, a), (y, b)):
        lease = Lease(member=member, holder=holder.me, action="asg-mark", state="acted",
                      token=f"t-{member}", acted_at=acted_at, asg=GROUP,
                      asg_before=tuple(ids), nonce=f"n-{member}")
        store.put(lease_key(GROUP, member), lease.body(), content_type="application/json")
    asg = cloud.client("autoscaling")
    for member in (x, y):
        asg.terminate_instance_in_auto_scaling_group(
            InstanceId=member, ShouldDecrementDesiredCapacity=False)
        time.sleep(1.1)  # LaunchTime has one-second resolution
    launches = sorted(set(cloud.asg_instance_ids(GROUP)) - set(ids))
    assert len(launches) == 2, launches
    for new in launches:
        store.put(member_key(GROUP, new), b"{}")  # both heartbeat
    both = PeersView(verdicts={m: ("dead" if m in (x, y) else "alive") for m in ids},
                     group_size=len(ids), silent_for={x: 1000.0, y: 1000.0},
                     members=frozenset(ids) - {x, y})
    a.step(both, ObserverHealth())
    b.step(both, ObserverHealth())
    b.step(both, ObserverHealth())  # a claim lost to another lease waits a step
    adopted = [read_lease(store, GROUP, m).replacement for m in (x, y)]
    assert sorted(adopted) == launches, adopted


@pytest.mark.parametrize("owner_state", ["failed", "acted", "archived"])
def test_a_claim_is_taken_over_only_once_its_lease_let_go(
        cloud: EmbeddedCloud, tmp_path: Any, owner_state: str) -> None:
    """A claim whose lease closed without naming the launch (its adoption's write lost,
    then the lease failed) is no one's: the launch's own lease takes the claim over. A
    claim whose lease is still open, or was archived naming the launch, keeps the launch
    from every other lease (here one kept in flight past the archiving)."""
    ids = cloud.create_asg(GROUP, 4)
    first, *_, x = sorted(ids)
    owner = "i-0000000000000000f"  # a member gone from the group, leased before x
    cfg = config(action="asg-mark")
    a = ctl(cloud, first, cfg, tmp_path, replace_deadline_s=3600)
    store = store_for(cloud)
    acted_at = time.time()
    cloud.client("autoscaling").terminate_instance_in_auto_scaling_group(
        InstanceId=x, ShouldDecrementDesiredCapacity=False)
    (new,) = set(cloud.asg_instance_ids(GROUP)) - set(ids)
    store.put(member_key(GROUP, new), b"{}")
    store.put(adoption_key(GROUP, new), json.dumps({"member": owner}).encode(),
              if_none_match=True)
    for member, state in ((x, "acted"), (owner, owner_state)):
        lease = Lease(member=member, holder=a.me, action="asg-mark", state=state,
                      token=f"t-{member}", acted_at=acted_at, asg=GROUP,
                      asg_before=tuple(ids), nonce=f"n-{member}")
        if state == "archived":
            lease = replace(lease, state="done", replacement=new)
        store.put(lease_key(GROUP, member), lease.body(), content_type="application/json")
        if state == "archived":  # moved to closed-leases/, its claim kept
            assert close_lease(store, GROUP, read_lease(store, GROUP, member))
    peers = view(ids, x)
    a.step(peers, ObserverHealth())
    a.step(peers, ObserverHealth())
    lease = read_lease(store, GROUP, x)
    if owner_state == "failed":
        assert lease.replacement == new and lease.state == "done", lease
        assert json.loads(store.get(adoption_key(GROUP, new)).body)["member"] == x
    else:
        assert lease.replacement == "" and lease.state == "acted", lease
