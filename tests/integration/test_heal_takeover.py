"""One death, one replacement, when the observer acting on it vanishes half-way (issue #10).

Against moto, at the controller level. moto does not honour RunInstances' ClientToken
(tests/integration/test_cloud.py), so "exactly one replacement" here is held by the
agent itself: the token names the death (every takeover keeps it, and the instance
carries it in a tag), and an observer that takes over finds what was launched with it.
Faults are injected by wrapping one call of the real adapter: the call reaches moto,
then its response is lost (``CloudError``) or the observer freezes (``Frozen``, a
``BaseException`` nothing in the controller catches: the process stopped there).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from agent.aws.cloud import REPLACES_TAG, TOKEN_TAG, Cloud
from agent.errors import CloudError
from agent.heal.controller import HealController, ObserverHealth
from agent.heal.leases import read_lease, superseded
from agent.interfaces import LaunchSpec
from agent.sim.cloud import EmbeddedCloud
from tests.integration.test_heal_faults import executable, has_record, records
from tests.integration.test_replace import (
    GROUP,
    all_instances,
    config,
    ctl,
    kinds,
    store_for,
    view,
)


class Frozen(BaseException):
    """The observer's process stopped here (SIGSTOP, then SIGKILL): nothing after runs."""


class LaunchFault(Cloud):
    """The real adapter; RunInstances reaches moto (``after``) or not, then ``fault``."""

    def __init__(self, fault: type[BaseException], *, after: bool = True) -> None:
        super().__init__("us-east-1")
        self.fault, self.after, self.tokens = fault, after, []

    def launch(self, spec: LaunchSpec, client_token: str, *, replaces: str = "") -> str:
        self.tokens.append(client_token)
        if self.after:
            super().launch(spec, client_token, replaces=replaces)
        if self.fault is CloudError:
            raise CloudError("run_instances: ReadTimeoutError: the response was lost")
        raise self.fault("frozen right after RunInstances" if self.after else "frozen")


def replacements_of(cloud: EmbeddedCloud, member: str) -> list[dict[str, Any]]:
    return [i for i in all_instances(cloud)
            if {"Key": REPLACES_TAG, "Value": member} in (i.get("Tags") or [])]


def tag(inst: dict[str, Any], key: str) -> str:
    return next((t["Value"] for t in inst.get("Tags") or [] if t["Key"] == key), "")


def stopped_member(cloud: EmbeddedCloud, n: int = 4) -> tuple[list[str], str]:
    """A standalone group whose member ids[0] is dead: EC2 says stopped (not terminated,
    so nothing says it was already replaced: only the lease and the token can)."""
    ids = cloud.run_standalone(GROUP, n)
    cloud.client("ec2").stop_instances(InstanceIds=[ids[0]])
    return ids, ids[0]


# -- invariant 1: the token names the death, not the lease generation ---------------------

def test_retried_launch_after_a_takeover_reuses_the_token_one_replacement(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids, dead = stopped_member(cloud)
    cfg = config(action="launch", max_per_window=3)
    lost = LaunchFault(CloudError)  # RunInstances happened; its response never came back
    a = ctl(cloud, ids[1], cfg, tmp_path, adapter=lost, lease_expiry_s=0)
    b = ctl(cloud, ids[2], cfg, tmp_path, lease_expiry_s=0)
    b.step(view(ids, dead), ObserverHealth())  # b suspects: a's step confirms and acts
    a.step(view(ids, dead), ObserverHealth())
    assert a.outcomes[-1].result == "failed", a.outcomes
    assert "outcome unknown" in a.outcomes[-1].detail
    first = replacements_of(cloud, dead)
    assert len(first) == 1
    # The error does not say the launch did not happen: the lease stays acting (its
    # in-flight slot taken), and b, once it is lease_expiry_s old, finds the launch by the
    # death's token and records it; no second RunInstances.
    assert read_lease(store_for(cloud), GROUP, dead).state == "acting"
    b.step(view(ids, dead), ObserverHealth())
    got = replacements_of(cloud, dead)
    assert [i["InstanceId"] for i in got] == [first[0]["InstanceId"]], got
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease is not None and lease.holder == ids[2] and lease.acted
    assert lease.token == lost.tokens[0], "a takeover must keep the death's token"
    assert len(lease.token) <= 64 and lease.token.isascii()
    assert lease.replacement == first[0]["InstanceId"]
    for o in (a, b):
        o.step(view(ids, dead), ObserverHealth())
    assert len(replacements_of(cloud, dead)) == 1  # never acted twice
    assert superseded(store_for(cloud), GROUP, dead)
    assert tag(first[0], TOKEN_TAG) == lost.tokens[0]  # anyone can find it by its token


def test_a_new_death_after_the_member_came_back_gets_a_new_token(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """A lease cleared by a heartbeat ends the death: the next one is a new death."""
    ids, dead = stopped_member(cloud)
    cfg = config(action="launch", max_per_window=3)
    refuse = LaunchFault(CloudError, after=False)  # fails before reaching EC2
    a = ctl(cloud, ids[1], cfg, tmp_path, adapter=refuse, lease_expiry_s=0)
    b = ctl(cloud, ids[2], cfg, tmp_path, lease_expiry_s=0)
    b.step(view(ids, dead), ObserverHealth())
    a.step(view(ids, dead), ObserverHealth())
    first = read_lease(store_for(cloud), GROUP, dead)
    # acting: a RunInstances error cannot say it did not happen (nothing did here)
    assert first is not None and first.state == "acting" and not first.acted and first.token
    alive = view(ids, "")
    b.step(alive, ObserverHealth())  # the member heartbeats again: its lease is cleared
    assert read_lease(store_for(cloud), GROUP, dead) is None
    b.step(view(ids, dead), ObserverHealth())  # and dies for real later
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease is not None and lease.acted and lease.token != first.token


# -- an acting lease whose holder died is resolved from what the cloud says ----------------

def test_acting_lease_whose_launch_happened_is_resolved_to_acted(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids, dead = stopped_member(cloud)
    cfg = config(action="launch", max_per_window=3)
    frozen = LaunchFault(Frozen)
    a = ctl(cloud, ids[1], cfg, tmp_path, adapter=frozen)
    b = ctl(cloud, ids[2], cfg, tmp_path, lease_expiry_s=0)
    c = ctl(cloud, ids[3], cfg, tmp_path, lease_expiry_s=0)
    c.step(view(ids, dead), ObserverHealth())
    with pytest.raises(Frozen):
        a.step(view(ids, dead), ObserverHealth())
    stuck = read_lease(store_for(cloud), GROUP, dead)
    assert stuck is not None and stuck.state == "acting" and stuck.acted_at is None
    launched = [i["InstanceId"] for i in replacements_of(cloud, dead)]
    assert len(launched) == 1
    b.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease is not None and lease.state == "acted", lease
    assert lease.replacement == launched[0] and lease.holder == ids[2]
    assert lease.token == stuck.token
    assert "heal-lease-resolved" in kinds(cloud)
    # The resolver finishes the job: the dead member is terminated, fenced.
    states = {i["InstanceId"]: i["State"]["Name"] for i in all_instances(cloud)}
    assert states[dead] == "terminated"
    for o in (b, c, b, c):
        o.step(view(ids, dead), ObserverHealth())
    assert [i["InstanceId"] for i in replacements_of(cloud, dead)] == launched  # once
    assert superseded(store_for(cloud), GROUP, dead)


def test_acting_lease_whose_launch_never_happened_is_taken_over_with_the_same_token(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids, dead = stopped_member(cloud)
    cfg = config(action="launch", max_per_window=3)
    frozen = LaunchFault(Frozen, after=False)  # fenced (acting), then stopped before the call
    a = ctl(cloud, ids[1], cfg, tmp_path, adapter=frozen)
    b = ctl(cloud, ids[2], cfg, tmp_path, lease_expiry_s=0)
    b.step(view(ids, dead), ObserverHealth())
    with pytest.raises(Frozen):
        a.step(view(ids, dead), ObserverHealth())
    stuck = read_lease(store_for(cloud), GROUP, dead)
    assert stuck is not None and stuck.state == "acting" and not replacements_of(cloud, dead)
    d = b.step(view(ids, dead), ObserverHealth())
    assert [x.member_id for x in executable(d)] == [dead], (d.refusals, b.outcomes)
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease is not None and lease.acted and lease.holder == ids[2]
    assert lease.token == stuck.token == frozen.tokens[0]
    got = replacements_of(cloud, dead)
    assert len(got) == 1 and tag(got[0], TOKEN_TAG) == stuck.token
    assert "heal-lease-resolved" in kinds(cloud)


def test_young_acting_lease_and_hook_are_left_alone(cloud: EmbeddedCloud,
                                                   tmp_path: Any) -> None:
    ids, dead = stopped_member(cloud)
    cfg = config(action="hook", hook="true")

    def frozen_hook(command: str, member: str, group: str) -> str:
        raise Frozen("stopped inside the hook")

    a = ctl(cloud, ids[1], cfg, tmp_path, hook=frozen_hook)
    b = ctl(cloud, ids[2], cfg, tmp_path)  # expiry 4 x dead_after: the lease is young
    b.step(view(ids, dead), ObserverHealth())
    with pytest.raises(Frozen):
        a.step(view(ids, dead), ObserverHealth())
    b.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease is not None and lease.state == "acting"
    assert "heal-lease-resolved" not in kinds(cloud) and "heal-lease-stuck" not in kinds(cloud)
    old = HealController(store_for(cloud), Cloud("us-east-1"), cfg, ids[3], lease_expiry_s=0)
    for _ in range(2):
        old.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease is not None and lease.state == "acting"  # nobody can tell: an operator
    assert kinds(cloud).count("heal-lease-stuck") == 1


# -- invariant 15: a newer member took its place (standalone groups) -----------------------

def test_standalone_member_whose_replacement_runs_is_already_replaced(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[0]
    store = records(cloud, ids)
    ec2 = cloud.client("ec2")
    img = ec2.describe_instances(InstanceIds=[dead])["Reservations"][0]["Instances"][0]
    newer = ec2.run_instances(
        ImageId=img["ImageId"], InstanceType=img["InstanceType"], MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": REPLACES_TAG, "Value": dead}]}],
    )["Instances"][0]["InstanceId"]
    ec2.terminate_instances(InstanceIds=[dead])
    cfg = config(action="launch", max_per_window=3)
    a, b = ctl(cloud, ids[1], cfg, tmp_path), ctl(cloud, ids[2], cfg, tmp_path)
    n = len(all_instances(cloud))
    b.step(view(ids, dead), ObserverHealth())
    d = a.step(view(ids, dead), ObserverHealth())
    assert not executable(d), d.actions
    assert [f.member_id for f in d.forget] == [dead]
    assert newer in d.forget[0].reasons[0]
    assert not has_record(store, dead)
    assert len(all_instances(cloud)) == n
    ks = kinds(cloud)
    assert "heal-already-replaced" in ks
    assert "heal-action-failed" not in ks and "heal-freeze" not in ks
    assert read_lease(store, GROUP, dead) is None


def test_standalone_member_whose_tagged_replacement_died_too_is_replaced(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    """A REPLACES tag on a terminated instance took nobody's place: a real death."""
    ids = cloud.run_standalone(GROUP, 4)
    dead = ids[0]
    records(cloud, ids)
    ec2 = cloud.client("ec2")
    img = ec2.describe_instances(InstanceIds=[dead])["Reservations"][0]["Instances"][0]
    old = ec2.run_instances(
        ImageId=img["ImageId"], InstanceType=img["InstanceType"], MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": REPLACES_TAG, "Value": dead}]}],
    )["Instances"][0]["InstanceId"]
    ec2.terminate_instances(InstanceIds=[dead, old])
    cfg = config(action="launch", max_per_window=3)
    a, b = ctl(cloud, ids[1], cfg, tmp_path), ctl(cloud, ids[2], cfg, tmp_path)
    b.step(view(ids, dead), ObserverHealth())
    d = a.step(view(ids, dead), ObserverHealth())
    assert [x.member_id for x in executable(d)] == [dead] and not d.forget


class AsgTerminateFault(Cloud):
    """The real adapter; the observer stops right after TerminateInstanceInAutoScalingGroup."""

    def asg_terminate(self, instance_id: str) -> str:
        super().asg_terminate(instance_id)
        raise Frozen("frozen right after TerminateInstanceInAutoScalingGroup")


def test_acting_asg_terminate_whose_call_happened_is_resolved_and_the_asg_replacement_found(
        cloud: EmbeddedCloud, tmp_path: Any) -> None:
    ids = cloud.create_asg(GROUP, 4)
    dead = ids[0]
    cloud.client("ec2").stop_instances(InstanceIds=[dead])
    cfg = config(action="asg-terminate", max_per_window=3)
    a = ctl(cloud, ids[1], cfg, tmp_path, adapter=AsgTerminateFault("us-east-1"))
    b = ctl(cloud, ids[2], cfg, tmp_path, lease_expiry_s=0, replace_deadline_s=3600)
    b.step(view(ids, dead), ObserverHealth())
    with pytest.raises(Frozen):
        a.step(view(ids, dead), ObserverHealth())
    stuck = read_lease(store_for(cloud), GROUP, dead)
    assert stuck is not None and stuck.state == "acting" and stuck.asg == GROUP
    assert sorted(stuck.asg_before) == sorted(ids)
    new = sorted(set(cloud.asg_instance_ids(GROUP)) - set(ids))
    assert len(new) == 1  # the ASG launched its replacement
    # Resolved well after the call: the replacement is still adopted (launched after the
    # ``acting`` write), not lost for being older than the resolution (``adopt_since``).
    time.sleep(6.0)
    b.step(view(ids, dead), ObserverHealth())
    lease = read_lease(store_for(cloud), GROUP, dead)
    assert lease is not None and lease.state == "acted" and lease.replacement == new[0], lease
    for _ in range(2):
        b.step(view(ids, dead), ObserverHealth())
    assert sorted(set(cloud.asg_instance_ids(GROUP)) - set(ids)) == new  # acted once
    assert "heal-action-failed" not in kinds(cloud)
