"""One contract, two backends: moto_server and the simulator's in-memory twins.

Every case runs through the real adapters (``agent.aws.store.Store``,
``agent.group.peers.read_if_changed``, ``agent.aws.cloud.Cloud``) against moto's boto3
clients and against ``agent.sim.twins``. A twin that drifts from moto fails here.
Where the twin is deliberately closer to AWS than moto (ClientToken idempotency,
``shutting-down`` before ``terminated``, an ASG that replaces later, not at once)
the case accepts both answers and says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from agent.aws.cloud import REPLACES_TAG, Cloud, LaunchSpec
from agent.aws.store import NotModified, Obj, Store
from agent.errors import CloudError, NotFound, PreconditionFailed
from agent.group.peers import read_if_changed
from agent.sim.twins import CloudTwin, S3Twin

BUCKET = "contract"
_IMAGE: dict[str, str] = {}  # moto's catalogue is slow to list and never changes


@dataclass
class Backend:
    name: str
    s3: Any
    ec2: Any
    asg: Any
    make_group: Callable[[str, int], list[str]]
    run_standalone: Callable[[int], list[str]]
    settle: Callable[[], None]

    def store(self) -> Store:
        return Store(BUCKET, "p", client=self.s3)

    def cloud(self) -> Cloud:
        return Cloud("us-east-1", ec2=self.ec2, autoscaling=self.asg)


def _moto_backend(url: str) -> Backend:
    kw = {"region_name": "us-east-1", "endpoint_url": url, "aws_access_key_id": "testing",
          "aws_secret_access_key": "testing"}
    s3, ec2, asg = (boto3.client(s, **kw) for s in ("s3", "ec2", "autoscaling"))
    s3.create_bucket(Bucket=BUCKET)
    subnets = [s["SubnetId"] for s in sorted(ec2.describe_subnets()["Subnets"],
                                             key=lambda s: s["AvailabilityZone"])][:3]
    image = _IMAGE.get("ami") or sorted(
        i["ImageId"] for i in ec2.describe_images(Owners=["amazon"])["Images"])[0]
    _IMAGE["ami"] = image

    def make_group(name: str, n: int) -> list[str]:
        ec2.create_launch_template(LaunchTemplateName=f"lt-{name}",
                                   LaunchTemplateData={"ImageId": image,
                                                       "InstanceType": "t3.micro"})
        asg.create_auto_scaling_group(
            AutoScalingGroupName=name, MinSize=0, MaxSize=n * 2, DesiredCapacity=n,
            LaunchTemplate={"LaunchTemplateName": f"lt-{name}", "Version": "$Latest"},
            VPCZoneIdentifier=",".join(subnets), HealthCheckGracePeriod=0)
        g = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
        return sorted(i["InstanceId"] for i in g[0]["Instances"])

    def run_standalone(n: int) -> list[str]:
        r = ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=n, MaxCount=n,
                              SubnetId=subnets[0])
        return [i["InstanceId"] for i in r["Instances"]]

    return Backend("moto", s3, ec2, asg, make_group, run_standalone, lambda: None)


def _twin_backend() -> Backend:
    now = [1_800_000_000.0]
    s3 = S3Twin(lambda: now[0])
    s3.client().create_bucket(Bucket=BUCKET)
    cloud = CloudTwin(lambda: now[0], boot_s=0.0, shutdown_s=0.0)

    def make_group(name: str, n: int) -> list[str]:
        return cloud.create_group(name, n, sorted(cloud.zones), grace_s=0.0, state="running")

    def run_standalone(n: int) -> list[str]:
        return [cloud.launch_instance(subnet_id="subnet-a", state="running").instance_id
                for _ in range(n)]

    def settle() -> None:
        now[0] += 1.0
        cloud.reconcile()

    return Backend("twin", s3.client(), cloud.ec2_client(), cloud.asg_client(), make_group,
                   run_standalone, settle)


@pytest.fixture(params=["moto", "twin"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "moto":
        server = request.getfixturevalue("moto")
        yield _moto_backend(server.url)
    else:
        yield _twin_backend()


# -- S3 ---------------------------------------------------------------------------------------

def test_put_get_etag_is_md5_and_times_are_whole_seconds(backend: Backend) -> None:
    st = backend.store()
    etag = st.put("a/k", b"hello")
    assert etag == '"' + hashlib.md5(b"hello").hexdigest() + '"'  # noqa: S324
    obj = st.get("a/k")
    assert isinstance(obj, Obj)
    assert (obj.body, obj.etag) == (b"hello", etag)
    assert obj.last_modified == int(obj.last_modified)
    assert obj.store_now == int(obj.store_now)
    assert obj.store_now >= obj.last_modified
    head = st.head("a/k")
    assert head is not None and (head.etag, head.size) == (etag, 5)
    assert head.last_modified == obj.last_modified


def test_missing_keys(backend: Backend) -> None:
    st = backend.store()
    with pytest.raises(NotFound):
        st.get("nope")
    assert st.get_or_none("nope") is None
    assert st.head("nope") is None
    st.delete("nope")  # S3 deletes are idempotent
    r = read_if_changed(st, "nope")
    assert r.status == "gone"


def test_create_only(backend: Backend) -> None:
    st = backend.store()
    st.create("lease", b"one")
    with pytest.raises(PreconditionFailed):
        st.create("lease", b"two")
    assert st.get_or_none("lease").body == b"one"


def test_compare_and_swap_put(backend: Backend) -> None:
    st = backend.store()
    e1 = st.put("budget", b"1")
    e2 = st.put("budget", b"2", if_match=e1)
    assert e2 != e1
    with pytest.raises(PreconditionFailed):
        st.put("budget", b"3", if_match=e1)
    assert st.get_or_none("budget").body == b"2"


def test_if_match_on_a_missing_key(backend: Backend) -> None:
    st = backend.store()
    with pytest.raises((NotFound, PreconditionFailed)):
        st.put("ghost", b"x", if_match='"0123456789abcdef0123456789abcdef"')
    assert st.get_or_none("ghost") is None


def test_conditional_delete(backend: Backend) -> None:
    st = backend.store()
    e1 = st.put("rec", b"a")
    st.put("rec", b"b")
    with pytest.raises(PreconditionFailed):
        st.delete("rec", if_match=e1)
    assert st.get_or_none("rec") is not None
    cur = st.head("rec")
    st.delete("rec", if_match=cur.etag)
    assert st.get_or_none("rec") is None


def test_conditional_get_keeps_the_store_clock(backend: Backend) -> None:
    st = backend.store()
    etag = st.put("m", b"v")
    assert isinstance(st.get("m", if_none_match=etag), NotModified)
    r = read_if_changed(st, "m", etag)
    assert r.status == "unchanged" and r.store_now > 0
    st.put("m", b"w")
    r2 = read_if_changed(st, "m", etag)
    assert r2.status == "changed" and r2.body == b"w" and r2.etag != etag


def test_list_order_prefix_and_pages(backend: Backend) -> None:
    st = backend.store()
    keys = ["g/b", "g/a/2", "g/a/10", "g/a-", "g/A", "g/é", "h/x", "f/x"]
    for k in keys:
        st.put(k, k.encode())
    listing = st.list("g/")
    want = sorted(k for k in keys if k.startswith("g/"))
    assert [e.key for e in listing.entries] == want
    assert [e.size for e in listing.entries] == [len(k.encode()) for k in want]
    assert listing.store_now > 0
    got: list[str] = []
    token = None
    pages = 0
    while True:
        kw: dict[str, Any] = {"Bucket": BUCKET, "Prefix": "p/g/", "MaxKeys": 2}
        if token:
            kw["ContinuationToken"] = token
        resp = backend.s3.list_objects_v2(**kw)
        pages += 1
        got += [o["Key"] for o in resp.get("Contents", [])]
        if not resp.get("IsTruncated"):
            break
        token = resp["NextContinuationToken"]
    assert got == ["p/" + k for k in want]
    assert pages == 3
    assert st.list("zzz/").entries == ()


# -- EC2 and Auto Scaling ----------------------------------------------------------------------

def test_states_running_terminated_and_unknown(backend: Backend) -> None:
    ids = backend.run_standalone(2)
    c = backend.cloud()
    assert c.states(ids) == {i: "running" for i in ids}
    assert c.terminate(ids[1]) in ("shutting-down", "terminated")
    backend.settle()
    unknown = "i-0123456789abcdef0"
    assert c.states([*ids, unknown]) == {ids[0]: "running", ids[1]: "terminated",
                                         unknown: "terminated"}
    assert c.describe(unknown) is None
    assert c.describe(ids[0])["InstanceId"] == ids[0]


def test_asg_membership_health_and_terminate(backend: Backend) -> None:
    ids = backend.make_group("web", 3)
    solo = backend.run_standalone(1)
    c = backend.cloud()
    members = c.asg_instances([*ids, *solo])
    assert set(members) == set(ids)
    assert {(m.group, m.health) for m in members.values()} == {("web", "Healthy")}
    assert c.asg_member_ids("web") == sorted(ids)
    assert c.asg_group("nope") is None
    c.set_unhealthy(ids[0], respect_grace=False)
    a = c.asg_instances([ids[0]]).get(ids[0])
    # moto records the mark and never acts on it; the twin replaces at its next reconcile
    assert a is None or a.health == "Unhealthy"
    c.asg_terminate(ids[1])
    backend.settle()
    backend.settle()
    after = c.asg_member_ids("web")
    assert ids[1] not in after
    assert len(after) == 3
    assert c.states([ids[1]])[ids[1]] in ("shutting-down", "terminated")
    with pytest.raises(CloudError):
        c.asg_terminate(solo[0])


def test_launch_tags_and_subnet(backend: Backend) -> None:
    src = backend.run_standalone(1)[0]
    c = backend.cloud()
    inst = c.describe(src)
    spec = LaunchSpec("clone", inst["SubnetId"], image_id=inst["ImageId"],
                      instance_type="t3.micro", tags=(("Name", "x"),))
    new = c.launch(spec, "tok-" + src, replaces=src)
    d = c.describe(new)
    tags = {t["Key"]: t["Value"] for t in d.get("Tags", [])}
    assert tags[REPLACES_TAG] == src and tags["Name"] == "x"
    assert d["SubnetId"] == inst["SubnetId"]
    assert c.states([new])[new] in ("pending", "running")


def test_replacements_are_found_by_their_tag_with_their_token(backend: Backend) -> None:
    src, other = backend.run_standalone(2)
    c = backend.cloud()
    inst = c.describe(src)
    spec = LaunchSpec("clone", inst["SubnetId"], image_id=inst["ImageId"],
                      instance_type="t3.micro")
    new = c.launch(spec, "tok-" + src, replaces=src)
    c.launch(spec, "tok-" + other, replaces=other)
    found = c.replacements([src])
    assert [(r.instance_id, r.replaces, r.token) for r in found] == [(new, src, "tok-" + src)]
    assert found[0].state in ("pending", "running")
    assert c.replacements(["i-0123456789abcdef0"]) == []


def test_twin_client_token_is_idempotent_like_ec2() -> None:
    """Real EC2 honours ClientToken; moto does not (tests/integration/test_cloud.py says so)."""
    b = _twin_backend()
    c = b.cloud()
    spec = LaunchSpec("clone", "subnet-a", image_id="ami-x", instance_type="t3.micro")
    assert c.launch(spec, "same-token") == c.launch(spec, "same-token")
    assert c.launch(spec, "other-token") != c.launch(spec, "same-token")


# -- Auto Scaling lifecycle hooks ----------------------------------------------------------------
# moto 5 stores, describes and deletes hooks but never holds an instance on one, and answers
# CompleteLifecycleAction with HTTP 500 (not implemented). The contract is what both do:
# the hook records, and a completion that matches no waiting action fails. What only AWS
# (and the twin) does, instances waiting in Pending:Wait / Terminating:Wait, is tested on
# the twin alone below.

LAUNCH_T = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERM_T = "autoscaling:EC2_INSTANCE_TERMINATING"


def test_lifecycle_hooks_are_put_described_and_deleted(backend: Backend) -> None:
    backend.make_group("hooked", 1)
    asg = backend.asg
    asg.put_lifecycle_hook(AutoScalingGroupName="hooked", LifecycleHookName="boot",
                           LifecycleTransition=LAUNCH_T)
    asg.put_lifecycle_hook(AutoScalingGroupName="hooked", LifecycleHookName="drain",
                           LifecycleTransition=TERM_T, HeartbeatTimeout=120,
                           DefaultResult="CONTINUE")
    got = {h["LifecycleHookName"]: h for h in asg.describe_lifecycle_hooks(
        AutoScalingGroupName="hooked")["LifecycleHooks"]}
    assert set(got) == {"boot", "drain"}
    boot, drain = got["boot"], got["drain"]
    assert (boot["AutoScalingGroupName"], boot["LifecycleTransition"]) == ("hooked", LAUNCH_T)
    # AWS's defaults: an hour's heartbeat timeout, ABANDON, a 48 h global timeout
    assert (boot["HeartbeatTimeout"], boot["DefaultResult"], boot["GlobalTimeout"]) == (
        3600, "ABANDON", 172800)
    assert (drain["LifecycleTransition"], drain["HeartbeatTimeout"],
            drain["DefaultResult"]) == (TERM_T, 120, "CONTINUE")
    only = asg.describe_lifecycle_hooks(AutoScalingGroupName="hooked",
                                        LifecycleHookNames=["drain"])["LifecycleHooks"]
    assert [h["LifecycleHookName"] for h in only] == ["drain"]
    asg.delete_lifecycle_hook(AutoScalingGroupName="hooked", LifecycleHookName="boot")
    left = asg.describe_lifecycle_hooks(AutoScalingGroupName="hooked")["LifecycleHooks"]
    assert [h["LifecycleHookName"] for h in left] == ["drain"]


def test_completing_an_action_nobody_waits_on_fails(backend: Backend) -> None:
    ids = backend.make_group("hooked2", 1)
    backend.asg.put_lifecycle_hook(AutoScalingGroupName="hooked2", LifecycleHookName="boot",
                                   LifecycleTransition=LAUNCH_T)
    # AWS (and the twin): ValidationError "No active Lifecycle Action found"; moto: HTTP 500.
    # The instance is InService: it never waited on the hook (created before it).
    with pytest.raises(CloudError):
        _no_retry(backend).complete_lifecycle_action("hooked2", "boot", ids[0], "CONTINUE")
    a = backend.cloud().asg_instances(ids)[ids[0]]
    assert a.group == "hooked2"


def _no_retry(backend: Backend) -> Cloud:
    """moto's 500 would be retried by botocore's default policy for seconds: ask once."""
    if backend.name != "moto":
        return backend.cloud()
    from botocore.config import Config

    ep = backend.asg.meta.endpoint_url
    asg = boto3.client("autoscaling", region_name="us-east-1", endpoint_url=ep,
                       aws_access_key_id="testing", aws_secret_access_key="testing",
                       config=Config(retries={"total_max_attempts": 1}))
    return Cloud("us-east-1", ec2=backend.ec2, autoscaling=asg)


def _hooked_twin(transition: str, **hook: Any) -> tuple[CloudTwin, list[float], Any, str]:
    now = [1_800_000_000.0]
    cloud = CloudTwin(lambda: now[0], boot_s=0.0, shutdown_s=0.0)
    ids = cloud.create_group("web", 2, sorted(cloud.zones), grace_s=0.0, state="running")
    asg = cloud.asg_client()
    asg.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="h",
                           LifecycleTransition=transition, **hook)
    return cloud, now, asg, ids[0]


def _lifecycle(asg: Any, iid: str) -> str | None:
    got = asg.describe_auto_scaling_instances(InstanceIds=[iid])["AutoScalingInstances"]
    return got[0]["LifecycleState"] if got else None


def test_twin_launch_hook_holds_a_new_instance_until_continue() -> None:
    cloud, now, asg, old = _hooked_twin(LAUNCH_T)
    asg.terminate_instance_in_auto_scaling_group(InstanceId=old,
                                                 ShouldDecrementDesiredCapacity=False)
    [(_, new)] = cloud.reconcile()
    assert _lifecycle(asg, new) == "Pending:Wait"
    assert cloud.instances[new].state == "running"  # EC2 runs it while the group holds it
    token = cloud.lifecycle_token("web", new)
    with pytest.raises(ClientError, match="No active Lifecycle Action"):  # wrong token
        asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="h",
                                      LifecycleActionResult="CONTINUE", InstanceId=new,
                                      LifecycleActionToken="nope")
    Cloud("us-east-1", autoscaling=asg).complete_lifecycle_action("web", "h", new, "CONTINUE",
                                                                  token=token)
    assert _lifecycle(asg, new) == "InService"
    with pytest.raises(ClientError, match="No active Lifecycle Action"):  # answered once
        asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="h",
                                      LifecycleActionResult="CONTINUE", InstanceId=new)


def test_twin_launch_abandoned_is_terminated_and_replaced() -> None:
    cloud, now, asg, old = _hooked_twin(LAUNCH_T)
    asg.terminate_instance_in_auto_scaling_group(InstanceId=old,
                                                 ShouldDecrementDesiredCapacity=False)
    [(_, new)] = cloud.reconcile()
    asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="h",
                                  LifecycleActionResult="ABANDON", InstanceId=new)
    assert cloud.instances[new].state == "shutting-down"
    now[0] += 1.0
    [(replaced, newer)] = cloud.reconcile()
    assert replaced == new and _lifecycle(asg, newer) == "Pending:Wait"
    assert _lifecycle(asg, new) is None


def test_twin_terminate_hook_keeps_it_running_until_answered() -> None:
    cloud, now, asg, old = _hooked_twin(TERM_T)
    asg.terminate_instance_in_auto_scaling_group(InstanceId=old,
                                                 ShouldDecrementDesiredCapacity=False)
    assert _lifecycle(asg, old) == "Terminating:Wait"
    assert cloud.reconcile() == [] and cloud.instances[old].state == "running"
    # Either result terminates (ABANDON only skips the other hooks).
    asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="h",
                                  LifecycleActionResult="ABANDON", InstanceId=old)
    assert cloud.instances[old].state == "shutting-down"
    now[0] += 1.0
    [(replaced, _)] = cloud.reconcile()
    assert replaced == old and _lifecycle(asg, old) is None


def test_twin_unanswered_hook_takes_its_default_result_and_heartbeats_extend_it() -> None:
    cloud, now, asg, old = _hooked_twin(TERM_T, HeartbeatTimeout=60, DefaultResult="CONTINUE")
    cloud.groups["web"].health[old] = "Unhealthy"  # the ASG's own health check
    assert cloud.reconcile() == [] and _lifecycle(asg, old) == "Terminating:Wait"
    now[0] += 50.0
    asg.record_lifecycle_action_heartbeat(AutoScalingGroupName="web", LifecycleHookName="h",
                                          InstanceId=old)
    now[0] += 50.0
    cloud.advance()
    assert _lifecycle(asg, old) == "Terminating:Wait"  # 100 s in, 50 s since the heartbeat
    now[0] += 11.0
    cloud.advance()
    assert cloud.instances[old].state == "shutting-down"
    cloud2, now2, asg2, old2 = _hooked_twin(LAUNCH_T, HeartbeatTimeout=30)
    asg2.terminate_instance_in_auto_scaling_group(InstanceId=old2,
                                                  ShouldDecrementDesiredCapacity=False)
    [(_, new)] = cloud2.reconcile()
    now2[0] += 30.0
    cloud2.advance()  # the default ABANDON: a launch nobody confirmed is terminated
    assert cloud2.instances[new].state == "shutting-down"


def test_twin_rejects_what_aws_rejects() -> None:
    cloud, now, asg, old = _hooked_twin(LAUNCH_T)
    for bad in ({"LifecycleTransition": "autoscaling:EC2_INSTANCE_REBOOTING"},
                {"LifecycleTransition": LAUNCH_T, "HeartbeatTimeout": 10},
                {"LifecycleTransition": LAUNCH_T, "DefaultResult": "MAYBE"}):
        with pytest.raises(ClientError, match="ValidationError"):
            asg.put_lifecycle_hook(AutoScalingGroupName="web", LifecycleHookName="x", **bad)
    with pytest.raises(ClientError, match="not found"):
        asg.put_lifecycle_hook(AutoScalingGroupName="nope", LifecycleHookName="x",
                               LifecycleTransition=LAUNCH_T)
