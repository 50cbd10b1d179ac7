"""Kill-one with IAM enforced: the agents hold only the shipped least-privilege policy.

A moto server of its own with IAM enforcement (``INITIAL_NO_AUTH_ACTION_COUNT``):
the first calls are free and create an admin (for the test harness) and the agent's
user with exactly ``packaging/iam/ec2-agent-policy.json`` plus the launch add-on
(``heal.action: launch``); every later request must be signed and allowed. moto
checks actions, and resources only for S3: for every other service it evaluates a
request against the resource ``*``, so an EC2 or Auto Scaling Allow scoped to
``instance/*`` never matches there. The test therefore widens, for moto only, the
Resource of the non-S3 *Allow* statements to ``*`` (Deny statements are left as
shipped: with moto ignoring Condition, a widened Deny would deny always). What this
test proves is the action set; the resource and condition scoping is checked by
parliament and ``tests/integration/test_packaging.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from agent.sim.fleet import Fleet, FleetCloud, fast_config
from agent.sim.moto import MotoServer

pytestmark = pytest.mark.fleet

IAM = Path(__file__).resolve().parents[2] / "packaging" / "iam"
N = 4


def _render(name: str, **values: str) -> str:
    """The shipped policy with its placeholders filled, adapted to moto (module docstring)."""
    doc = json.loads(Template((IAM / name).read_text()).substitute(values))
    for st in doc["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        if st["Effect"] == "Allow" and not all(a.startswith("s3:") for a in actions):
            st["Resource"] = "*"
    return json.dumps(doc)


class EnforcedCloud(FleetCloud):
    """The harness signs as an admin; every agent signs as the least-privileged user."""

    admin: dict[str, str] = {}
    agent: dict[str, str] = {}

    def client(self, service: str) -> Any:
        c = self._clients.get(service)
        if c is None:
            c = boto3.client(service, region_name="us-east-1", endpoint_url=self.moto.url,
                             **self.admin)
            self._clients[service] = c
        return c

    def agent_env(self, instance_id: str) -> dict[str, str]:
        env = super().agent_env(instance_id)
        for k in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.pop(k, None)
        env["AWS_ACCESS_KEY_ID"] = self.agent["aws_access_key_id"]
        env["AWS_SECRET_ACCESS_KEY"] = self.agent["aws_secret_access_key"]
        return env


def _keys(iam: Any, user: str) -> dict[str, str]:
    k = iam.create_access_key(UserName=user)["AccessKey"]
    return {"aws_access_key_id": k["AccessKeyId"], "aws_secret_access_key": k["SecretAccessKey"]}


@pytest.fixture
def enforced(tmp_path: Path) -> Iterator[EnforcedCloud]:
    setup_calls = 10
    server = MotoServer(extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": str(setup_calls)},
                        log_path=str(tmp_path / "moto-iam.log"))
    server.start()
    try:
        iam = boto3.client("iam", endpoint_url=server.url, region_name="us-east-1")
        iam.create_user(UserName="admin")                                           # 1
        admin_arn = iam.create_policy(PolicyName="admin", PolicyDocument=json.dumps({  # 2
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))["Policy"]["Arn"]
        iam.attach_user_policy(UserName="admin", PolicyArn=admin_arn)               # 3
        admin = _keys(iam, "admin")                                                 # 4
        values = {"Bucket": "ec2-agent-sim", "Prefix": "sim", "Group": "web",
                  "AccountId": "123456789012", "Region": "us-east-1",
                  "InstanceRole": "web-instance"}
        iam.create_user(UserName="agent")                                           # 5
        for n, name in enumerate(("ec2-agent-policy.json", "ec2-agent-launch-policy.json")):
            arn = iam.create_policy(PolicyName=f"agent-{n}",                        # 6, 8
                                    PolicyDocument=_render(name, **values))["Policy"]["Arn"]
            iam.attach_user_policy(UserName="agent", PolicyArn=arn)                 # 7, 9
        agent = _keys(iam, "agent")                                                 # 10
        cloud = EnforcedCloud(tmp_path / "cloud", moto=server)
        cloud.admin, cloud.agent = admin, agent
        cloud.start()
        try:
            yield cloud
        finally:
            cloud.stop()
    finally:
        server.stop()


def test_kill_one_with_only_the_shipped_policy(enforced: EnforcedCloud) -> None:
    agent_ec2 = boto3.client("ec2", endpoint_url=enforced.moto.url, region_name="us-east-1",
                             **enforced.agent)
    agent_iam = boto3.client("iam", endpoint_url=enforced.moto.url, region_name="us-east-1",
                             **enforced.agent)
    for call in (lambda: agent_ec2.delete_vpc(VpcId="vpc-12345678"),
                 lambda: agent_iam.create_user(UserName="escalated")):
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.response["Error"]["Code"] in ("AccessDenied", "UnauthorizedOperation")

    f = Fleet(enforced, config=fast_config(enforced, "web", heal={"action": "launch"}))
    try:
        ids = f.start(N)
        f.calm()
        victim = ids[0]
        f.kill(victim)
        f.terminate_instance(victim)
        f.wait(lambda: f.actions(), 90, "a launch")
        f.wait(lambda: len([m for m in f.ready() if m != victim]) >= N, 120, f"{N} ready again")
        f.hold(3 * f.dead_after())
        acts = f.actions()
        assert len(acts) == 1, f.timeline_text()
        assert acts[0]["member"] == victim and acts[0]["details"]["action"] == "launch"
        denied = [iid for iid in f.agents
                  if "AccessDenied" in f.log_tail(iid, n=400)]
        assert not denied, {iid: f.log_tail(iid) for iid in denied}
    finally:
        print(f"\n--- timeline ---\n{f.timeline_text()}")
        for e in f.events:
            if e.get("kind") == "heal-action-failed":
                print("FAILED-ACTION", json.dumps(e)[:3000])
        f.stop()
