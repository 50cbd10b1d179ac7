"""The shipping pieces, checked by the tools that will consume them.

systemd units by ``systemd-analyze verify``, the cloud-config by ``cloud-init
schema`` and its multipart user-data by ``cloud-init devel make-mime`` plus our own
parser, the Packer template by ``packer validate`` (offline), the IAM policies by
parliament and by a moto server that enforces IAM. Every check also runs on a
deliberately broken copy, so a tool that silently accepts anything fails the test.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from string import Template

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

from agent.config import model as agent_config
from agent.config.userdata import parse_user_data
from agent.sim.moto import MotoServer

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
UNITS = PACKAGING / "systemd"
CLOUD_INIT = PACKAGING / "cloud-init"
PACKER = PACKAGING / "packer" / "ec2-agent.pkr.hcl"
IAM = PACKAGING / "iam"
INSTALLED_EXE = "/opt/ec2-agent/bin/ec2-agent"


def need(tool: str) -> str:
    """The tool's path. .ci/run installs every one of them, so in CI a missing one fails."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed (.ci/run should have installed it)")
        pytest.skip(f"{tool} is not installed")
    return path


def run(cmd: list[str], *, timeout: float = 60, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd, stdin=subprocess.DEVNULL, check=False)


# --- systemd -----------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values...]}} (keys may repeat, as in systemd)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def stage_units(dest: Path, exe: Path) -> list[Path]:
    """Copy the units to ``dest`` with ExecStart pointing at an executable that exists.

    ``systemd-analyze verify`` fails on an ExecStart binary that does not exist;
    /opt/ec2-agent is only there on a real image.
    """
    dest.mkdir(parents=True, exist_ok=True)
    staged = []
    for unit in sorted(UNITS.iterdir()):
        text = unit.read_text()
        target = dest / unit.name
        target.write_text(text.replace(INSTALLED_EXE, str(exe)))
        staged.append(target)
    return staged


def fake_exe(tmp_path: Path) -> Path:
    exe = tmp_path / "bin" / "ec2-agent"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return exe


def verify(units: list[Path]) -> tuple[int, str]:
    """rc and diagnostics of ``systemd-analyze verify`` on the staged unit files.

    verify exits 0 on unknown keys or bad values (it only warns, "ignoring"), so
    the diagnostics must be empty too. Loading all units at once lets it resolve
    Requires=/After= between them from their directory.
    """
    tool = need("systemd-analyze")
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    res = run([tool, "verify", "--man=no", *[f"./{u.name}" for u in units]],
              env=env, cwd=units[0].parent, timeout=60)
    return res.returncode, (res.stdout + res.stderr).strip()


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = stage_units(tmp_path / "units", fake_exe(tmp_path))
    assert {u.name for u in units} == {
        "ec2-agent-boot.service", "ec2-agent.service", "ec2-agent.target"}
    rc, out = verify(units)
    assert rc == 0 and out == "", out


@pytest.mark.parametrize(
    ("unit", "old", "new"),
    [
        ("ec2-agent.service", "Type=notify", "Type=notifyy"),           # bad value: warning only
        ("ec2-agent.service", "Restart=always", "Restartt=always"),     # unknown key: warning only
        ("ec2-agent-boot.service", "ExecStart=", "ExecStart=/nonexistent/ec2-agent boot\n#"),
        ("ec2-agent.target", "Requires=ec2-agent-boot.service", "Requires=no-such.service"),
    ],
)
def test_verify_catches_a_broken_unit(tmp_path: Path, unit: str, old: str, new: str) -> None:
    units = stage_units(tmp_path / "units", fake_exe(tmp_path))
    target = tmp_path / "units" / unit
    text = target.read_text()
    assert old in text
    target.write_text(text.replace(old, new, 1))
    rc, out = verify(units)
    assert rc != 0 or out != "", "a broken unit passed verification"


def test_unit_contract() -> None:
    """The settings the rest of the agent relies on, so an edit can't drop one silently."""
    boot = parse_unit(UNITS / "ec2-agent-boot.service")
    svc = parse_unit(UNITS / "ec2-agent.service")
    target = parse_unit(UNITS / "ec2-agent.target")

    s = boot["Service"]
    assert s["Type"] == ["oneshot"] and s["RemainAfterExit"] == ["yes"]
    assert s["ExecStart"] == [f"{INSTALLED_EXE} boot"]
    assert "2" in s["SuccessExitStatus"][0].split()  # degraded boot still lets services run
    # systemd's backstop sits above the agent's own boot deadline (schema default).
    deadline = agent_config.schema()["properties"]["boot"]["properties"]["deadline_s"]["default"]
    timeout = int(s["TimeoutStartSec"][0])
    assert deadline < timeout <= deadline * 2
    u = boot["Unit"]
    assert "network-online.target" in " ".join(u["After"]).split()
    assert u["Wants"] == ["network-online.target"]
    assert u["Before"] == ["ec2-agent.target"]
    assert "cloud-final.service" not in " ".join(u["After"])  # runcmd may start us: deadlock

    s = svc["Service"]
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"]
    assert s["Restart"] == ["always"] and s["RestartSec"] == ["5"]
    assert s["ExecStart"] == [f"{INSTALLED_EXE} run"]
    assert s["KillMode"] == ["mixed"] and s["TimeoutStopSec"] == ["120"]
    # Stopping relies on the daemon's SIGTERM handler (leave, then final backup).
    assert "ExecStop" not in s
    for forbidden in ("ProtectSystem", "ProtectHome", "ReadOnlyPaths", "ProtectKernelTunables"):
        assert forbidden not in s, f"{forbidden} would stop the agent writing rendered files"
    u = svc["Unit"]
    assert u["Requires"] == ["ec2-agent-boot.service"]
    assert "ec2-agent-boot.service" in " ".join(u["After"]).split()

    u = target["Unit"]
    assert u["Requires"] == ["ec2-agent-boot.service"]
    assert u["After"] == ["ec2-agent-boot.service"]
    for unit in (boot, svc, target):
        assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# --- cloud-init --------------------------------------------------------------


def cloud_init_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return run([need("cloud-init"), "schema", "--config-file", str(path)], timeout=120)


def test_cloud_config_is_valid_for_cloud_init() -> None:
    res = cloud_init_schema(CLOUD_INIT / "agent-cloud-config.yaml")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "Valid cloud-config" in out
    # The unknown top-level `ec2_agent` key is accepted silently by 22.4:
    # no error, no warning, no deprecation naming it.
    assert "ec2_agent" not in out


def test_cloud_init_schema_rejects_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    text = (CLOUD_INIT / "agent-cloud-config.yaml").read_text()
    broken.write_text(text.replace("  - path: /etc/default/ec2-agent\n", "  - owner: root\n", 1)
                      + "bootcmd: 5\n")
    res = cloud_init_schema(broken)
    assert res.returncode != 0
    assert "bootcmd" in res.stdout + res.stderr


def test_cloud_config_agent_section_is_a_valid_config_layer() -> None:
    assert agent_config.validate_file(CLOUD_INIT / "agent-cloud-config.yaml") == []
    assert agent_config.validate_file(CLOUD_INIT / "example-config.yaml") == []
    assert agent_config.validate_file(PACKAGING / "config" / "agent.yaml") == []


def make_mime(*parts: tuple[Path, str]) -> bytes:
    cmd = [need("cloud-init"), "devel", "make-mime", "--force"]
    for path, ctype in parts:
        cmd += ["-a", f"{path}:{ctype}"]
    res = subprocess.run(cmd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                         check=False)
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout


def test_make_mime_user_data_parses(tmp_path: Path) -> None:
    cloud_config = CLOUD_INIT / "agent-cloud-config.yaml"
    example = CLOUD_INIT / "example-config.yaml"
    baked = yaml.safe_load((PACKAGING / "config" / "agent.yaml").read_text())

    # 1. The #cloud-config alone, plain and gzipped.
    plain = parse_user_data(cloud_config.read_bytes())
    assert plain is not None and plain["group"] == "web"
    assert plain["store"] == {"bucket": "my-fleet", "prefix": "prod"}
    assert parse_user_data(gzip.compress(cloud_config.read_bytes())) == plain

    # 2. make-mime with only the x-ec2-agent part.
    only_agent = parse_user_data(make_mime((example, "x-ec2-agent")))
    assert only_agent == yaml.safe_load(example.read_text())

    # 3. Both parts: x-ec2-agent wins key by key over the cloud-config's ec2_agent.
    mime = make_mime((cloud_config, "cloud-config"), (example, "x-ec2-agent"))
    assert b"text/x-ec2-agent" in mime and b"text/cloud-config" in mime
    both = parse_user_data(mime)
    assert both is not None
    assert both["heal"]["mode"] == "armed"                # from example-config.yaml
    assert both["heal"]["action"] == "asg-terminate"
    assert both["heartbeat"]["dead_after_s"] == 30         # only in the cloud-config
    assert both["vars"] == {"listen_port": 8080}

    # 4. make-mime has no --gzip in 22.4: gzip the whole message, as the README says.
    assert parse_user_data(gzip.compress(mime, mtime=0)) == both
    assert len(gzip.compress(mime)) < 16384  # EC2's user-data limit

    # And the result is a valid user-data layer over the baked defaults.
    cfg = agent_config.load_layers(baked, both)
    assert cfg.group == "web" and cfg.store.bucket == "my-fleet"


# --- packer ------------------------------------------------------------------


def packer_env(tmp_path: Path) -> dict[str, str]:
    """No phoning home (checkpoint), no plugin downloads, a private home."""
    home = tmp_path / "packer-home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "CHECKPOINT_DISABLE": "1", "PACKER_CONFIG_DIR": str(home),
            "HOME": str(home), "PACKER_LOG": "0", "PACKER_NO_COLOR": "1"}


def packer_validate(template: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """Full ``packer validate`` (not -syntax-only).

    Checked: with amazon-ebs in Packer 1.6.6 full validation contacts nothing
    (no credentials lookup, no AMI query); it runs in well under a second with the
    fake credentials from conftest and no network. It does stat the file
    provisioner's sources, hence a fake wheel.
    """
    wheel = tmp_path / "ec2_agent-0.0.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    return run([need("packer"), "validate", "-var", f"wheel={wheel}", *extra, str(template)],
               env=packer_env(tmp_path), timeout=60)


def test_packer_template_validates(tmp_path: Path) -> None:
    res = packer_validate(PACKER, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("most_recent = true\n  }", "most_recent = true\n"),          # HCL syntax error
        ("instance_type = var.instance_type", "instance_typo = var.instance_type"),
        ("source      = var.wheel", "source      = var.no_such_variable"),
    ],
)
def test_packer_validate_catches_a_broken_template(tmp_path: Path, old: str, new: str) -> None:
    text = PACKER.read_text()
    assert old in text
    broken_dir = tmp_path / "packaging" / "packer"
    broken_dir.mkdir(parents=True)
    broken = broken_dir / PACKER.name
    broken.write_text(text.replace(old, new, 1))
    res = packer_validate(broken, tmp_path)
    assert res.returncode != 0, res.stdout


def test_packer_bakes_a_valid_agent_config(tmp_path: Path) -> None:
    """The baked agent.yaml the template writes is a valid config layer."""
    # packer console reads expressions from stdin
    res = subprocess.run(
        [need("packer"), "console", "-var", "agent_group=web", "-var", "store_bucket=my-fleet",
         "-var", "store_prefix=prod", str(PACKER)],
        input="local.agent_yaml\n", capture_output=True, text=True, timeout=60,
        env=packer_env(tmp_path), check=False)
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)
    assert doc == {"group": "web", "store": {"bucket": "my-fleet", "prefix": "prod"},
                   "boot": {"deadline_s": 120}, "heal": {"mode": "dry-run"}}
    baked = tmp_path / "agent.yaml"
    baked.write_text(res.stdout)
    assert agent_config.validate_file(baked) == []


# --- IAM ---------------------------------------------------------------------

VALUES = {
    "Bucket": "my-fleet", "Prefix": "prod", "Group": "web", "AccountId": "123456789012",
    "Region": "us-east-1", "InstanceRole": "web-instance",
}


def render_policy(name: str, **overrides: str) -> str:
    """Substitute the placeholders as envsubst would; Template raises on a missing one."""
    text = Template((IAM / name).read_text()).substitute({**VALUES, **overrides})
    assert "${" not in text
    return text


def findings(policy: str) -> list[tuple[str, str]]:
    from parliament import analyze_policy_string

    result = analyze_policy_string(policy, include_community_auditors=True)
    return sorted((f.issue, str(f.detail)) for f in result.findings)


def test_base_policy_has_no_parliament_findings() -> None:
    assert findings(render_policy("ec2-agent-policy.json")) == []


def test_launch_policy_has_only_the_justified_findings() -> None:
    issues = [issue for issue, _ in findings(render_policy("ec2-agent-launch-policy.json"))]
    # Both are inherent to `heal.action: launch`: launching an instance with the
    # group's role requires iam:PassRole, and PassRole + RunInstances is by nature
    # a way to act with that role's permissions. Bounded: one role ARN, and only
    # to ec2.amazonaws.com. Groups that heal through Auto Scaling don't attach it.
    assert sorted(issues) == ["PERMISSIONS_MANAGEMENT_ACTIONS", "PRIVILEGE_ESCALATION"]


def test_parliament_catches_a_broken_policy() -> None:
    policy = json.loads(render_policy("ec2-agent-policy.json"))
    policy["Statement"][0]["Action"].append("s3:GetObjekt")            # unknown action
    policy["Statement"][1]["Resource"] = "arn:aws:s3:::my-fleet/prod/*"  # ListBucket on objects
    issues = {issue for issue, _ in findings(json.dumps(policy))}
    assert "UNKNOWN_ACTION" in issues
    assert "RESOURCE_MISMATCH" in issues


def test_policies_are_scoped() -> None:
    """What parliament does not judge: every grant is under the prefix or the group tag."""
    base = json.loads(render_policy("ec2-agent-policy.json"))
    launch = json.loads(render_policy("ec2-agent-launch-policy.json"))
    wildcard_ok = {"ec2:DescribeInstances", "ec2:DescribeInstanceStatus",
                   "autoscaling:DescribeAutoScalingGroups",
                   "autoscaling:DescribeAutoScalingInstances"}
    for st in base["Statement"] + launch["Statement"]:
        actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert not any(a == "*" or a.endswith(":*") for a in actions), st["Sid"]
        if "*" in resources:
            assert set(actions) <= wildcard_ok, st["Sid"]
        for a in actions:
            if a.startswith("s3:") and a != "s3:ListBucket":
                assert resources == ["arn:aws:s3:::my-fleet/prod/*"], st["Sid"]
        if "s3:ListBucket" in actions:
            assert st["Condition"] == {"StringLike": {"s3:prefix": ["prod/*"]}}
        if set(actions) & {"ec2:TerminateInstances", "ec2:DescribeInstanceAttribute",
                           "autoscaling:SetInstanceHealth"}:
            cond = json.dumps(st["Condition"])
            assert re.search(r'ResourceTag/ec2-agent:group": "web"', cond), st["Sid"]
        if "iam:PassRole" in actions:
            assert resources == ["arn:aws:iam::123456789012:role/web-instance"]
            assert st["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}
    deny = [st for st in launch["Statement"] if st["Effect"] == "Deny"]
    assert deny and deny[0]["Action"] == "ec2:RunInstances"
    assert deny[0]["Condition"] == {
        "StringNotEquals": {"aws:RequestTag/ec2-agent:group": "web"}}


def test_moto_enforces_the_base_policy() -> None:
    """A user holding only the base policy: store writes under the prefix, nothing else.

    A separate moto server with IAM enforcement: its first SETUP_CALLS requests
    are free (to create the bucket, user, policy and key), every later one must
    be signed by an IAM user and allowed by its policies. Moto evaluates actions
    and resources but not Condition blocks (test_policies_are_scoped covers those).
    """
    setup_calls = 6
    server = MotoServer(extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": str(setup_calls)})
    server.start()
    try:
        admin = {"endpoint_url": server.url, "region_name": "us-east-1"}
        s3 = boto3.client("s3", **admin)
        iam = boto3.client("iam", **admin)
        s3.create_bucket(Bucket="my-fleet")                                      # 1
        s3.create_bucket(Bucket="other-bucket")                                  # 2
        iam.create_user(UserName="agent")                                        # 3
        arn = iam.create_policy(PolicyName="ec2-agent", PolicyDocument=render_policy(
            "ec2-agent-policy.json", AccountId="123456789012"))["Policy"]["Arn"]  # 4
        iam.attach_user_policy(UserName="agent", PolicyArn=arn)                  # 5
        key = iam.create_access_key(UserName="agent")["AccessKey"]               # 6
        creds = {"aws_access_key_id": key["AccessKeyId"],
                 "aws_secret_access_key": key["SecretAccessKey"],
                 "aws_session_token": None, **admin}
        agent_s3 = boto3.client("s3", **creds)
        agent_iam = boto3.client("iam", **creds)
        agent_ec2 = boto3.client("ec2", **creds)

        def denied(call: object, *args: object, **kwargs: object) -> str:
            with pytest.raises(ClientError) as err:
                call(*args, **kwargs)  # type: ignore[operator]
            return err.value.response["Error"]["Code"]

        # Allowed: the store's own objects.
        key_name = "prod/groups/web/members/i-0123456789abcdef0.json"
        agent_s3.put_object(Bucket="my-fleet", Key=key_name, Body=b"{}")
        assert agent_s3.get_object(Bucket="my-fleet", Key=key_name)["Body"].read() == b"{}"
        agent_s3.delete_object(Bucket="my-fleet", Key=key_name)

        # Denied: outside the prefix, another bucket, actions the policy does not grant.
        assert denied(agent_s3.put_object, Bucket="my-fleet", Key="other/x", Body=b"") \
            == "AccessDenied"
        assert denied(agent_s3.put_object, Bucket="other-bucket", Key="prod/x", Body=b"") \
            == "AccessDenied"
        assert denied(agent_s3.delete_bucket, Bucket="my-fleet") == "AccessDenied"
        assert denied(agent_iam.create_user, UserName="escalated") == "AccessDenied"
        assert denied(agent_ec2.delete_vpc, VpcId="vpc-12345678") in (
            "AccessDenied", "UnauthorizedOperation")
        # And the enforcement is real: the fake admin credentials are not an IAM user now.
        assert denied(s3.put_object, Bucket="my-fleet", Key="prod/x", Body=b"") in (
            "InvalidAccessKeyId", "AccessDenied")
    finally:
        server.stop()
    assert server.proc is None

