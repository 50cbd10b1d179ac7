"""agent/aws/cloud.py against a real moto server (and botocore's Stubber where moto cannot).

moto gaps, said plainly:
* RunInstances ClientToken is not idempotent in moto (two calls with one token give
  two instances); the controller tests count instances instead (test_lease_race.py).
* ``set_instance_health(Unhealthy)`` is recorded, never acted on (see test_replace.py).
* terminate goes straight to ``terminated``.
* CompleteLifecycleAction answers 500 in moto: tested with botocore's Stubber, the
  one place this suite stubs boto3, because no emulator we run implements it.
"""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from agent.aws.cloud import REPLACES_TAG, Cloud, LaunchSpec
from agent.errors import CloudError
from agent.heal.decide import lease_token
from agent.sim.cloud import EmbeddedCloud
from tests.conftest import CLOSED

TOKEN = "bcd2f1b8-9a1a-4f2c-8a8e-1234567890ab"  # the API wants 36 chars


def closed_cloud() -> Cloud:
    return Cloud(ec2=boto3.client("ec2", region_name="us-east-1", endpoint_url=CLOSED),
                 autoscaling=boto3.client("autoscaling", region_name="us-east-1",
                                          endpoint_url=CLOSED))


def test_states_running_terminated_and_unknown_ids(cloud: EmbeddedCloud) -> None:
    ids = cloud.run_standalone("web", 2)
    cloud.client("ec2").terminate_instances(InstanceIds=[ids[1]])
    c = Cloud("us-east-1")
    unknown = "i-0123456789abcdef0"
    assert c.states([*ids, unknown]) == {ids[0]: "running", ids[1]: "terminated",
                                         unknown: "terminated"}
    assert c.describe(unknown) is None


def test_api_errors_are_never_evidence_of_death() -> None:
    c = closed_cloud()
    states, err = c.states_or_none(["i-1", "i-2"])
    assert states == {"i-1": None, "i-2": None} and err
    with pytest.raises(CloudError):
        c.states(["i-1"])
    with pytest.raises(CloudError):
        c.asg_instances(["i-1"])


def test_asg_membership_mark_and_terminate(cloud: EmbeddedCloud) -> None:
    ids = cloud.create_asg("web", 3)
    c = Cloud("us-east-1")
    members = c.asg_instances(ids)
    assert set(members) == set(ids)
    assert {m.group for m in members.values()} == {"web"}
    assert {m.health for m in members.values()} == {"Healthy"}
    assert c.asg_instances(cloud.run_standalone("solo", 1)) == {}
    c.set_unhealthy(ids[0])
    assert c.asg_instances([ids[0]])[ids[0]].health == "Unhealthy"
    c.asg_terminate(ids[1])
    assert c.states([ids[1]])[ids[1]] == "terminated"
    now = c.asg_member_ids("web")
    assert ids[1] not in now and len(now) == 3  # capacity kept: the ASG launched another


def test_launch_spec_from_the_launch_template(cloud: EmbeddedCloud) -> None:
    ids = cloud.create_asg("web", 2)
    c = Cloud("us-east-1")
    spec = c.launch_spec(ids[0])
    assert spec.source == "launch-template"
    assert spec.launch_template["LaunchTemplateId"].startswith("lt-")
    inst = c.describe(ids[0])
    assert spec.subnet_id == inst["SubnetId"]
    kw = spec.run_instances_kwargs(lease_token("web", ids[0], '"etag"'), replaces=ids[0])
    assert "ImageId" not in kw and kw["SubnetId"] == inst["SubnetId"]
    tags = {t["Key"]: t["Value"] for t in kw["TagSpecifications"][0]["Tags"]}
    assert not any(k.startswith("aws:") for k in tags) and tags[REPLACES_TAG] == ids[0]
    new = c.launch(spec, lease_token("web", ids[0], '"etag"'), replaces=ids[0])
    assert c.describe(new)["ImageId"] == inst["ImageId"]


def test_launch_clone_of_a_standalone_instance(cloud: EmbeddedCloud) -> None:
    iid = cloud.run_standalone("solo", 1)[0]
    c = Cloud("us-east-1")
    spec = c.launch_spec(iid)
    inst = c.describe(iid)
    assert spec.source == "clone"
    assert (spec.image_id, spec.instance_type, spec.subnet_id) == (
        inst["ImageId"], inst["InstanceType"], inst["SubnetId"])
    assert spec.user_data is not None and spec.user_data.startswith(b"#cloud-config")
    token = lease_token("solo", iid, '"abc"')
    new = c.launch(spec, token, replaces=iid)
    assert c.user_data(new) == spec.user_data
    assert c.describe(new)["SubnetId"] == inst["SubnetId"]
    c.terminate(iid)
    assert c.states([iid]) == {iid: "terminated"}


def test_run_instances_kwargs_same_token_same_request() -> None:
    spec = LaunchSpec("clone", "subnet-1", image_id="ami-1", instance_type="t3.micro",
                      security_group_ids=("sg-1",), user_data=b"#cloud-config\n",
                      tags=(("Name", "w"), ("aws:autoscaling:groupName", "x")))
    a = spec.run_instances_kwargs("ec2a-x", "i-dead")
    assert a == spec.run_instances_kwargs("ec2a-x", "i-dead")
    assert a["UserData"] == "#cloud-config\n" and a["SecurityGroupIds"] == ["sg-1"]
    for bad in ("", "x" * 65, "é"):
        with pytest.raises(ValueError):
            spec.run_instances_kwargs(bad)


@pytest.mark.parametrize("result", ["CONTINUE", "ABANDON"])
def test_complete_lifecycle_action_with_stubber(result: str) -> None:
    """moto answers CompleteLifecycleAction with a 500, so botocore's Stubber stands in."""
    asg = boto3.client("autoscaling", region_name="us-east-1", endpoint_url=CLOSED)
    with Stubber(asg) as stub:
        stub.add_response("complete_lifecycle_action", {}, {
            "AutoScalingGroupName": "web", "LifecycleHookName": "boot",
            "LifecycleActionResult": result, "InstanceId": "i-1",
            "LifecycleActionToken": TOKEN})
        Cloud(autoscaling=asg).complete_lifecycle_action("web", "boot", "i-1", result,
                                                         token=TOKEN)
        stub.assert_no_pending_responses()
    with Stubber(asg) as stub:
        stub.add_client_error("complete_lifecycle_action", "ValidationError", "no such hook")
        with pytest.raises(CloudError, match="ValidationError"):
            Cloud(autoscaling=asg).complete_lifecycle_action("web", "boot", "i-1", result)
    with pytest.raises(ValueError):
        Cloud(autoscaling=asg).complete_lifecycle_action("web", "boot", "i-1", "MAYBE")
