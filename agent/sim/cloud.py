"""The embedded emulated cloud: a moto server, an IMDSv2 emulator, and instances to boot.

``EmbeddedCloud`` is what ``ec2-agent simulate`` runs on and what the fleet
tests use: it creates a bucket, a launch template whose user-data carries the
agent's config, and an Auto Scaling group (or standalone instances); for every
instance it serves an IMDS identity that matches moto's, and it boots an agent
process per instance, each in its own ``EC2_AGENT_ROOT``. Everything listens on
127.0.0.1 and everything it starts it stops, by PID.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.sim.https import HttpsFront
from agent.sim.imds import ImdsEmulator, meta_for_instance
from agent.sim.moto import FAKE_CREDENTIALS, MotoServer
from agent.sim.netutil import stop_process

REGION = "us-east-1"
_IMAGE_CACHE: dict[str, str] = {}
_AWS_DATA: list[Path] = []


def _bake_aws_data(root: Path) -> None:
    """Give an instance root the lean botocore data a real one has after its first start.

    A real daemon builds it once (``agent.aws.botodata.ensure``, a child process); here it
    is built once per process and hard-linked into each root, so a simulated fleet
    does not pay a build per daemon. ``lean_aws_data=False`` leaves roots without it
    (the daemon then builds its own, as on a fresh image).
    """
    import atexit

    from agent.aws import botodata as awsdata
    from agent.paths import Paths

    if not _AWS_DATA:
        tmp = Path(tempfile.mkdtemp(prefix="ec2-agent-aws-data-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        _AWS_DATA.append(awsdata.build(tmp))
    src = _AWS_DATA[0]

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, Paths(root).aws_data_dir / src.name, copy_function=link,
                    dirs_exist_ok=True)


def cloud_config(agent_config: dict[str, Any]) -> bytes:
    """User-data as operators write it: a #cloud-config with the agent's mapping."""
    return b"#cloud-config\n" + yaml.safe_dump({"ec2_agent": agent_config}).encode()


@dataclass
class SimInstance:
    instance_id: str
    root: Path
    imds_url: str
    boot_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self, cloud: EmbeddedCloud) -> dict[str, str]:
        env = dict(os.environ)
        env.update(FAKE_CREDENTIALS)
        env.update(
            {
                "AWS_ENDPOINT_URL": cloud.endpoint_url,
                "AWS_EC2_METADATA_DISABLED": "true",
                "EC2_AGENT_ROOT": str(self.root),
                "EC2_AGENT_IMDS_ENDPOINT": self.imds_url,
                "EC2_AGENT_BOOT_ID": self.boot_id,
                "AWS_CONFIG_FILE": "/dev/null",
                "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                "NO_PROXY": "*",
            }
        )
        env.pop("AWS_PROFILE", None)
        if cloud.front is not None:  # over TLS: trust the front's certificate (and certifi's)
            env["AWS_CA_BUNDLE"] = cloud.front.ca_bundle
        return env

    def state(self) -> dict[str, Any] | None:
        p = self.root / "var/lib/ec2-agent/state.json"
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, ValueError):
            return None


class EmbeddedCloud:
    """Moto + IMDS emulator + per-instance roots under one temp dir."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        moto: MotoServer | None = None,
        bucket: str = "ec2-agent-sim",
        prefix: str = "sim",
        lean_aws_data: bool = True,
        tls: bool = False,
    ) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="ec2-agent-sim-"))
        self._own_moto = moto is None
        self.moto = moto or MotoServer(log_path=str(self.workdir / "moto.log"))
        # tls: agents reach moto through an HTTPS front (agent/sim/https.py), as AWS.
        self.tls = tls
        self.front: HttpsFront | None = None
        self.imds = ImdsEmulator()
        self.bucket = bucket
        self.prefix = prefix
        self.instances: dict[str, SimInstance] = {}
        self._clients: dict[str, Any] = {}
        self.lean_aws_data = lean_aws_data

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> EmbeddedCloud:
        if self._own_moto:
            self.moto.start()
        if self.tls:
            self.front = HttpsFront(self.moto.url).start()
        self.imds.start()
        return self

    @property
    def endpoint_url(self) -> str:
        """Where agents send AWS calls: moto, or its HTTPS front."""
        return self.front.url if self.front is not None else self.moto.url

    def stop(self, keep_dir: bool = False) -> None:
        for inst in self.instances.values():
            for p in inst.procs:
                stop_process(p)
            inst.procs.clear()
        self.imds.stop()
        if self.front is not None:
            self.front.stop()
            self.front = None
        if self._own_moto:
            self.moto.stop()
        if self._own_dir and not keep_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- AWS ----------------------------------------------------------------------------------
    def client(self, service: str) -> Any:
        c = self._clients.get(service)
        if c is None:
            import boto3

            c = boto3.client(
                service,
                region_name=REGION,
                endpoint_url=self.endpoint_url,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
                verify=self.front.ca_bundle if self.front is not None else None,
            )
            self._clients[service] = c
        return c

    def ensure_bucket(self) -> None:
        s3 = self.client("s3")
        try:
            s3.head_bucket(Bucket=self.bucket)
        except Exception:
            s3.create_bucket(Bucket=self.bucket)

    def image_id(self) -> str:
        """An AMI from moto's built-in catalogue (listing it is slow: cached, then checked)."""
        ec2 = self.client("ec2")
        cached = _IMAGE_CACHE.get("ami")
        if cached:
            try:
                if ec2.describe_images(ImageIds=[cached])["Images"]:
                    return cached
            except Exception:
                pass
        images = ec2.describe_images(Owners=["amazon"])["Images"]
        _IMAGE_CACHE["ami"] = sorted(i["ImageId"] for i in images)[0]
        return _IMAGE_CACHE["ami"]

    def subnets(self) -> list[str]:
        subs = self.client("ec2").describe_subnets()["Subnets"]
        return [s["SubnetId"] for s in sorted(subs, key=lambda s: s["AvailabilityZone"])]

    def agent_config(self, group: str, **extra: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "group": group,
            "store": {"bucket": self.bucket, "prefix": self.prefix},
            # Many agents on one host: each takes an ephemeral port, not the fixed default.
            "http": {"port": 0},
        }
        cfg.update(extra)
        return cfg

    def create_asg(
        self,
        group: str,
        n: int,
        agent_config: dict[str, Any] | None = None,
        instance_type: str = "t3.micro",
    ) -> list[str]:
        """A launch template carrying the agent's user-data and an ASG of ``n`` instances."""
        self.ensure_bucket()
        ud = cloud_config(agent_config or self.agent_config(group))
        ec2 = self.client("ec2")
        lt_name = f"ec2-agent-{group}"
        ec2.create_launch_template(
            LaunchTemplateName=lt_name,
            LaunchTemplateData={
                "ImageId": self.image_id(),
                "InstanceType": instance_type,
                "UserData": base64.b64encode(ud).decode(),
                "MetadataOptions": {"HttpTokens": "required", "InstanceMetadataTags": "enabled"},
                "TagSpecifications": [
                    {
                        "ResourceType": "instance",
                        "Tags": [{"Key": "ec2-agent:group", "Value": group}],
                    }
                ],
            },
        )
        asg = self.client("autoscaling")
        asg.create_auto_scaling_group(
            AutoScalingGroupName=group,
            MinSize=n,
            MaxSize=n * 2,
            DesiredCapacity=n,
            LaunchTemplate={"LaunchTemplateName": lt_name, "Version": "$Latest"},
            VPCZoneIdentifier=",".join(self.subnets()[:3]),
            HealthCheckGracePeriod=0,
            Tags=[
                {
                    "Key": "ec2-agent:group",
                    "Value": group,
                    "PropagateAtLaunch": True,
                    "ResourceId": group,
                    "ResourceType": "auto-scaling-group",
                }
            ],
        )
        # moto's create reads HealthCheckGracePeriod=0 as "absent" (its default is 300);
        # its update honours 0. The heal controller checks the grace before asg-mark.
        asg.update_auto_scaling_group(AutoScalingGroupName=group, HealthCheckGracePeriod=0)
        ids = self.asg_instance_ids(group)
        for iid in ids:
            self.add_instance(iid, ud)
        return ids

    def asg_instance_ids(self, group: str) -> list[str]:
        groups = self.client("autoscaling").describe_auto_scaling_groups(
            AutoScalingGroupNames=[group]
        )["AutoScalingGroups"]
        return sorted(i["InstanceId"] for g in groups for i in g["Instances"])

    def run_standalone(
        self,
        group: str,
        n: int,
        agent_config: dict[str, Any] | None = None,
        instance_type: str = "t3.micro",
    ) -> list[str]:
        """``n`` plain instances (no ASG), tagged with the group."""
        self.ensure_bucket()
        ud = cloud_config(agent_config or self.agent_config(group))
        subnets = self.subnets()
        image = self.image_id()
        ids: list[str] = []
        for i in range(n):
            resp = self.client("ec2").run_instances(
                ImageId=image,
                InstanceType=instance_type,
                MinCount=1,
                MaxCount=1,
                SubnetId=subnets[i % len(subnets)],
                UserData=ud.decode(),
                TagSpecifications=[
                    {
                        "ResourceType": "instance",
                        "Tags": [{"Key": "ec2-agent:group", "Value": group}],
                    }
                ],
            )
            iid = resp["Instances"][0]["InstanceId"]
            self.add_instance(iid, ud)
            ids.append(iid)
        return ids

    def add_instance(self, instance_id: str, user_data: bytes | None = None) -> SimInstance:
        """Serve an IMDS identity matching moto's instance, and give it a root dir."""
        meta = meta_for_instance(self.client("ec2"), instance_id, user_data)
        url = self.imds.add(meta)
        inst = SimInstance(instance_id, self.workdir / instance_id, url)
        inst.root.mkdir(parents=True, exist_ok=True)
        if self.lean_aws_data:
            _bake_aws_data(inst.root)
        self.instances[instance_id] = inst
        return inst

    def push_bundle(self, group: str, files: dict[str, str]) -> int:
        """Publish a config bundle (path -> text) as ``ec2-agent bundle push`` would."""
        from agent.aws.store import Store
        from agent.bundle.publish import push

        self.workdir.mkdir(parents=True, exist_ok=True)
        src = Path(tempfile.mkdtemp(prefix="bundle-", dir=self.workdir))
        for rel, text in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text(text)
        store = Store(self.bucket, self.prefix, client=self.client("s3"))
        return push(store, group, src).version

    # -- agents ---------------------------------------------------------------------------------
    def spawn(self, instance_id: str, *args: str, log: str | None = None) -> subprocess.Popen:
        inst = self.instances[instance_id]
        logf = open(inst.root / (log or f"{args[0]}.log"), "ab")  # noqa: SIM115
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", *args],
                env=inst.env(self),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            logf.close()
        inst.procs.append(p)
        return p

    def boot_all(self, ids: list[str] | None = None, timeout: float = 300.0) -> dict[str, int]:
        """Boot every (given) instance in parallel; returns exit codes.

        ``timeout`` is the harness's ceiling, above the agent's default boot deadline
        (120 s): a slow boot's verdict is the agent's exit code, not this kill.
        """
        ids = list(self.instances) if ids is None else ids
        procs = {iid: self.spawn(iid, "boot", "-q") for iid in ids}
        codes: dict[str, int] = {}
        end = time.monotonic() + timeout
        for iid, p in procs.items():
            try:
                codes[iid] = p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                stop_process(p)
                codes[iid] = -1
            self.instances[iid].procs.remove(p)
        return codes
