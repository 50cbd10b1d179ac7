"""Auto Scaling launch lifecycle hooks: CONTINUE after a good boot, ABANDON after a failed one.

moto (5.x) does not implement CompleteLifecycleAction: its server answers HTTP 500
with an HTML page for it. So:

* the adapter call itself (``Cloud.complete_lifecycle_action``) and the success
  path of ``agent.boot.lifecycle.complete_lifecycle`` are tested with botocore's
  ``Stubber``, which checks the exact request parameters (AutoScalingGroupName,
  LifecycleHookName, InstanceId, LifecycleActionResult) against the real service
  model. That is a stub, not an emulator, and is said here plainly;
* the boot-level wiring is tested against the real moto server and the IMDSv2
  emulator: ``run_boot`` on an instance of a real (moto) Auto Scaling group with a
  real launch hook attempts the call with CONTINUE after a done boot and ABANDON
  after a failed one, and moto's real 500 is recorded as ``degraded`` (never as an
  ``error``) - which is exactly what must happen when AWS fails that call.
"""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from agent.aws.cloud import Cloud
from agent.aws.imds import Identity
from agent.boot.lifecycle import ASG_TAG, complete_lifecycle, hook_name, plan
from agent.boot.run import run_boot
from agent.bootctx import BootContext
from agent.clock import Deadline, FakeClock
from agent.config.model import load_layers
from agent.errors import CloudError
from agent.paths import Paths
from agent.sim.cloud import EmbeddedCloud, SimInstance, cloud_config

IID = "i-0123456789abcdef0"


# -- the adapter call, with botocore's Stubber (moto answers 500) ------------------------------

def _stubbed() -> tuple[Cloud, Stubber]:
    client = boto3.client("autoscaling", region_name="us-east-1",
                          endpoint_url="http://127.0.0.1:9")  # never contacted: stubbed
    return Cloud("us-east-1", autoscaling=client), Stubber(client)


@pytest.mark.parametrize("result", ["CONTINUE", "ABANDON"])
def test_adapter_sends_exact_parameters_stubber(result: str) -> None:
    """Stubber, not moto: moto has no CompleteLifecycleAction. Checks the request shape."""
    cloud, stub = _stubbed()
    stub.add_response("complete_lifecycle_action", {}, {
        "AutoScalingGroupName": "web-asg", "LifecycleHookName": "launch",
        "InstanceId": IID, "LifecycleActionResult": result})
    with stub:
        cloud.complete_lifecycle_action("web-asg", "launch", IID, result)
    stub.assert_no_pending_responses()


def test_adapter_maps_service_errors_to_clouderror_stubber() -> None:
    """Stubber: the ValidationError AWS sends when no action is pending becomes a CloudError."""
    cloud, stub = _stubbed()
    stub.add_client_error("complete_lifecycle_action", "ValidationError",
                          "No active Lifecycle Action found with instance ID " + IID)
    with stub, pytest.raises(CloudError, match="ValidationError"):
        cloud.complete_lifecycle_action("web-asg", "launch", IID, "CONTINUE")


def test_adapter_refuses_other_results() -> None:
    cloud, _ = _stubbed()
    with pytest.raises(ValueError):
        cloud.complete_lifecycle_action("web-asg", "launch", IID, "DEFAULT")


def _ctx(*, tags: dict[str, str] | None = None, hook: str | None = "launch",
         boot_kind: str = "first", previous: dict | None = None) -> BootContext:
    """A real boot context at the end of a boot: real Config (schema defaults), identity."""
    boot = {"lifecycle_hook": hook} if hook else {}
    cfg = load_layers(None, {"group": "web", "store": {"bucket": "fleet-bucket"}, "boot": boot})
    ident = Identity(IID, "ami-1", "t3.micro", "us-east-1", "us-east-1a", "10.0.0.1", "1",
                     tags={ASG_TAG: "web-asg"} if tags is None else tags)
    clock = FakeClock()
    return BootContext(paths=Paths.from_env(), clock=clock, deadline=Deadline.after(60, "b", clock),
                       started_wall=0.0, previous=previous or {}, boot_id="b-1",
                       boot_kind=boot_kind, identity=ident, config=cfg)


@pytest.mark.parametrize(("status", "result", "after"), [
    ("done", "CONTINUE", "done"), ("degraded", "CONTINUE", "degraded"),
    ("error", "ABANDON", "error")])
def test_complete_lifecycle_success_path_stubber(status: str, result: str, after: str) -> None:
    """Stubber (moto cannot answer success): a delivered answer leaves the status alone."""
    cloud, stub = _stubbed()
    stub.add_response("complete_lifecycle_action", {}, {
        "AutoScalingGroupName": "web-asg", "LifecycleHookName": "launch",
        "InstanceId": IID, "LifecycleActionResult": result})
    st = {"status": status, "degraded": []}
    with stub:
        rec = complete_lifecycle(_ctx(), st, cloud=cloud)
    stub.assert_no_pending_responses()
    assert rec["completed"] is True and rec["result"] == result and rec["asg"] == "web-asg"
    assert st["status"] == after and st["lifecycle"] is rec and st["degraded"] == []


def test_complete_lifecycle_failure_degrades_a_done_boot_stubber() -> None:
    cloud, stub = _stubbed()
    stub.add_client_error("complete_lifecycle_action", "ValidationError", "no active action")
    st = {"status": "done", "degraded": []}
    with stub:
        rec = complete_lifecycle(_ctx(), st, cloud=cloud)
    assert rec["completed"] is False and "ValidationError" in rec["error"]
    assert st["status"] == "degraded"
    assert st["degraded"] and "CONTINUE not delivered" in st["degraded"][0]


def test_asg_from_describe_when_tags_are_not_in_metadata_stubber() -> None:
    """Tags in IMDS are off by default: the group comes from DescribeAutoScalingInstances."""
    cloud, stub = _stubbed()
    stub.add_response("describe_auto_scaling_instances", {"AutoScalingInstances": [{
        "InstanceId": IID, "AutoScalingGroupName": "from-api", "AvailabilityZone": "us-east-1a",
        "LifecycleState": "Pending:Wait", "HealthStatus": "HEALTHY",
        "ProtectedFromScaleIn": False}]}, {"InstanceIds": [IID]})
    stub.add_response("complete_lifecycle_action", {}, {
        "AutoScalingGroupName": "from-api", "LifecycleHookName": "launch",
        "InstanceId": IID, "LifecycleActionResult": "CONTINUE"})
    st = {"status": "done", "degraded": []}
    with stub:
        rec = complete_lifecycle(_ctx(tags={}), st, cloud=cloud)
    assert rec["completed"] is True and rec["asg"] == "from-api"


# -- the pure decision ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "action", "result", "why"), [
    ({"hook": None}, "skip", None, "no boot.lifecycle_hook"),
    ({"instance_id": None}, "skip", None, "instance id unknown"),
    ({"boot_kind": "reboot"}, "skip", None, "reboot"),
    ({"asg": None}, "skip", None, "no Auto Scaling group known"),
    ({"previous": {"completed": True, "instance_id": IID, "result": "CONTINUE"}},
     "skip", "CONTINUE", "already completed"),
    ({"previous": {"completed": True, "instance_id": "i-other", "result": "CONTINUE"}},
     "complete", "CONTINUE", "boot done"),
    ({"status": "degraded"}, "complete", "CONTINUE", "boot degraded"),
    ({"status": "error"}, "complete", "ABANDON", "boot error"),
    ({}, "complete", "CONTINUE", "boot done"),
    # leaving a warm pool: the launch hook runs again, on a reboot or in the same process
    ({"boot_kind": "reboot", "entering_service": True}, "complete", "CONTINUE",
     "leaving the warm pool"),
    ({"previous": {"completed": True, "instance_id": IID, "result": "CONTINUE"},
      "entering_service": True}, "complete", "CONTINUE", "leaving the warm pool"),
    ({"entering_service": True, "status": "error"}, "complete", "ABANDON", "warm pool"),
    ({"entering_service": True, "asg": None}, "skip", None, "no Auto Scaling group"),
])
def test_plan_table(kw: dict, action: str, result: str | None, why: str) -> None:
    args = {"hook": "launch", "status": "done", "instance_id": IID, "boot_kind": "first",
            "asg": "web-asg", "previous": None, **kw}
    p = plan(**args)
    assert (p.action, p.result) == (action, result)
    assert why in p.reason


def test_hook_name_from_raw_layers_when_config_failed() -> None:
    baked = {"boot": {"lifecycle_hook": "baked-hook"}}
    user = {"boot": {"lifecycle_hook": "user-hook"}, "heal": {"mode": "nonsense"}}
    assert hook_name(None, (baked, user)) == "user-hook"
    assert hook_name(None, (baked, {"boot": "not a mapping"})) == "baked-hook"
    assert hook_name(None, (None, None)) is None


# -- boot-level wiring against the real moto server and the IMDSv2 emulator ---------------------

def _asg_instance(cloud: EmbeddedCloud, monkeypatch: pytest.MonkeyPatch, agent_cfg: dict,
                  *, tags_in_metadata: bool = True) -> SimInstance:
    """One instance of a moto Auto Scaling group with a real launch hook; this process is it."""
    iid = cloud.create_asg("web", 1, agent_cfg)[0]
    cloud.client("autoscaling").put_lifecycle_hook(
        LifecycleHookName="launch", AutoScalingGroupName="web",
        LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
        HeartbeatTimeout=300, DefaultResult="ABANDON")
    cloud.imds.host(iid).meta.tags_exposed = tags_in_metadata
    inst = cloud.instances[iid]
    for k, v in inst.env(cloud).items():
        if k.startswith(("AWS_", "EC2_AGENT_")):
            monkeypatch.setenv(k, v)
    return inst


@pytest.mark.parametrize("tags_in_metadata", [True, False])
def test_done_boot_attempts_continue_and_moto_500_is_degraded(
        cloud: EmbeddedCloud, monkeypatch: pytest.MonkeyPatch, tags_in_metadata: bool) -> None:
    cfg = cloud.agent_config("web", boot={"lifecycle_hook": "launch"})
    inst = _asg_instance(cloud, monkeypatch, cfg, tags_in_metadata=tags_in_metadata)
    st = run_boot(Paths(inst.root))
    assert st["errors"] == []
    # without tags in metadata the group came from moto's DescribeAutoScalingInstances
    assert (st["identity"]["tags"].get(ASG_TAG) == "web") is tags_in_metadata
    assert all(p["status"] == "ok" for p in st["phases"]), st["phases"]
    lc = st["lifecycle"]
    assert (lc["action"], lc["result"], lc["asg"], lc["hook"], lc["instance_id"]) == (
        "complete", "CONTINUE", "web", "launch", inst.instance_id)
    # moto's real answer to CompleteLifecycleAction is a 500 page: the call reached it
    assert lc["completed"] is False and "complete_lifecycle_action" in lc["error"]
    assert "500" in lc["error"] or "Internal Server Error" in lc["error"]
    assert st["status"] == "degraded"  # not "error": the instance serves
    assert any("CONTINUE not delivered" in d for d in st["degraded"])
    assert (inst.root / "var/lib/ec2-agent/state.json").exists()


def test_failed_boot_attempts_abandon(cloud: EmbeddedCloud,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cloud.agent_config("web", boot={"lifecycle_hook": "launch"})
    inst = _asg_instance(cloud, monkeypatch, cfg)
    # A config the schema refuses: the config phase fails, the hook name is still known.
    bad = dict(cfg, heal={"mode": "sometimes"})
    cloud.imds.host(inst.instance_id).meta.user_data = cloud_config(bad)
    st = run_boot(Paths(inst.root))
    assert st["status"] == "error"
    assert {p["name"]: p["status"] for p in st["phases"]}["config"] == "error"
    lc = st["lifecycle"]
    assert (lc["action"], lc["result"], lc["asg"]) == ("complete", "ABANDON", "web")
    assert lc["completed"] is False and "complete_lifecycle_action" in lc["error"]
    assert st["status"] == "error"  # stays error; the failed delivery is recorded as well
    assert any("ABANDON not delivered" in d for d in st["degraded"])


def test_no_hook_configured_makes_no_call(cloud: EmbeddedCloud,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    inst = _asg_instance(cloud, monkeypatch, cloud.agent_config("web"))
    st = run_boot(Paths(inst.root))
    assert st["status"] == "done", st["errors"]
    assert st["lifecycle"]["action"] == "skip" and st["lifecycle"]["completed"] is False


def test_standalone_instance_records_no_asg_known(cloud: EmbeddedCloud,
                                                  instance: SimInstance) -> None:
    """Not in any group (real DescribeAutoScalingInstances on moto says so): done, recorded."""
    Path(Paths(instance.root).config_file).parent.mkdir(parents=True, exist_ok=True)
    Paths(instance.root).config_file.write_text("boot: {lifecycle_hook: launch}\n")
    st = run_boot(Paths(instance.root))
    assert st["status"] == "done", (st["errors"], st["degraded"])
    assert st["lifecycle"]["action"] == "skip"
    assert "no Auto Scaling group known" in st["lifecycle"]["reason"]


def test_reboot_does_not_answer_again(cloud: EmbeddedCloud,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cloud.agent_config("web", boot={"lifecycle_hook": "launch"})
    inst = _asg_instance(cloud, monkeypatch, cfg)
    first = run_boot(Paths(inst.root))
    assert first["lifecycle"]["action"] == "complete"
    monkeypatch.setenv("EC2_AGENT_BOOT_ID", "another-kernel-boot")
    again = run_boot(Paths(inst.root))
    assert again["boot_kind"] == "reboot"
    assert again["lifecycle"]["action"] == "skip" and "reboot" in again["lifecycle"]["reason"]
    assert again["status"] == "done", again["degraded"]


def test_warm_pool_instance_answers_the_hook_again_when_it_enters_service(
        cloud: EmbeddedCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warmed:Stopped: the first boot is held (no record) and answers the hook; started
    from the pool, the reboot sees InService, registers and answers the hook again."""
    cfg = cloud.agent_config("web", boot={"lifecycle_hook": "launch"})
    inst = _asg_instance(cloud, monkeypatch, cfg)
    meta = cloud.imds.host(inst.instance_id).meta
    meta.target_lifecycle_state = "Warmed:Stopped"
    held = run_boot(Paths(inst.root))
    assert held["membership"]["state"] == "held"
    assert held["lifecycle"]["action"] == "complete"  # Warmed:Pending:Wait is answered too
    meta.target_lifecycle_state = "InService"
    monkeypatch.setenv("EC2_AGENT_BOOT_ID", "started-from-the-warm-pool")
    joined = run_boot(Paths(inst.root))
    assert joined["boot_kind"] == "reboot" and joined["membership"]["state"] == "ready"
    lc = joined["lifecycle"]
    assert (lc["action"], lc["result"]) == ("complete", "CONTINUE")
    assert "leaving the warm pool" in lc["reason"]
    assert "complete_lifecycle_action" in lc["error"]  # moto's 500: the call was made
