"""The image boots for real: systemd as PID 1, real cloud-init, the shipped units and install.

A Debian 12 root filesystem (``make image-cache``: mmdebstrap, cached outside the repo),
a fresh copy-on-write copy per run (an overlay over the cache), is booted with
``systemd-nspawn --boot`` inside the test's network namespace, which has only ``lo``.
The moto server and the project's IMDS emulator listen on 127.0.0.1 in that namespace,
so the container reaches them and nothing else.

1. Bake: boot the bare image, run ``packaging/install.sh --enable`` inside from an offline
   wheelhouse (the wheel is built on the host), check ``ec2-agent`` is on the PATH and the
   units are enabled; then ``systemctl disable`` them, so the image under test is the
   harder case (units installed, not enabled, as ``install.sh`` without ``--enable``
   leaves them): only the shipped cloud-config can make every boot start the agent.
   Clean the agent's and cloud-init's state (as the packer template does), power off.
2. First boot of the instance: cloud-init's Ec2 datasource (a test-only cloud.cfg.d
   snippet points it at the emulator, which serves IMDSv1 as EC2 does with
   ``HttpTokens: optional``) reads the user-data built from ``packaging/cloud-init/``;
   its runcmd enables and starts the units. Checks: cloud-init done with Ec2, the boot
   unit succeeded, the notify daemon active, ``ec2-agent status --json`` typed in a login
   shell says done/first, the member record is in S3, and every command of the
   operator's block in docs/operations.md works.
3. The systemd watchdog: SIGSTOP the daemon; systemd kills and restarts it.
4. Reboot: the agent is back (enabled by the cloud-config), reports a reboot, heartbeats.
5. ``systemctl stop ec2-agent`` removes the member record.

Boot-to-ready (nspawn started -> ec2-agent.service active, i.e. READY=1 after the first
heartbeat) is printed, and written as JSON to ``$EC2_AGENT_REALBOOT_REPORT`` when set, for
docs/benchmarks.md (``python -m bench realboot``); a figure, never asserted.
``EC2_AGENT_REALBOOT_KEEP=1`` keeps the container's disk (the overlay's upper layer, in
/dev/shm when that is a tmpfs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path
from typing import TypeVar

import boto3
import pytest
from botocore.client import BaseClient
from botocore.exceptions import ClientError

from agent.sim.imds import ImdsServer, meta_for_instance
from agent.sim.moto import MotoServer
from tests.integration.test_install import build_wheel
from tests.realboot import image
from tests.realboot.container import Container, cannot_boot_reason, only_loopback_reason

pytestmark = [pytest.mark.realboot, pytest.mark.slow, pytest.mark.timeout(420)]

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
CLOUD_INIT = REPO / "packaging" / "cloud-init"
OPERATIONS = REPO / "docs" / "operations.md"
DOC_MARK = "<!-- verified by tests/realboot/test_realboot.py -->"
GROUP, BUCKET, PREFIX = "web", "my-fleet", "prod"  # as in agent-cloud-config.yaml
STAGE = "/var/tmp/ec2-agent"  # inside the container: wheel, wheelhouse, packaging/
UNITS = ("ec2-agent-boot.service", "ec2-agent.service", "ec2-agent.target")
# Test-only overrides in a text/x-ec2-agent part next to the shipped cloud-config:
# heartbeat every 2 s so "it heartbeats" is seen in seconds.
TEST_PART = "heartbeat: {interval_s: 2, dead_after_s: 6}\n"


def _skip_or_fail(reason: str) -> None:
    # In CI (.ci/run installs everything and runs as root) a missing piece is a failure.
    if os.environ.get("CI") and cannot_boot_reason() is None:
        pytest.fail(reason)
    pytest.skip(reason)


def user_data() -> bytes:
    """MIME multipart as ``cloud-init devel make-mime`` builds it: the shipped cloud-config
    verbatim, plus the test's x-ec2-agent part."""
    msg = MIMEMultipart()
    for name, text, subtype in (
        ("agent-cloud-config.yaml", (CLOUD_INIT / "agent-cloud-config.yaml").read_text(),
         "cloud-config"),
        ("realboot-test.yaml", TEST_PART, "x-ec2-agent"),
    ):
        part = MIMEText(text, subtype, "utf-8")
        part.add_header("Content-Disposition", "attachment", filename=name)
        msg.attach(part)
    return msg.as_bytes()


def cloud_cfg_snippet(imds_url: str) -> str:
    """Test-only: cloud-init's Ec2 datasource on the emulator, and nothing to configure on
    a network the container shares with the test (only lo). ``datasource_list`` on one line:
    ds-identify (the systemd generator that decides whether cloud-init runs) greps for it."""
    return f"""# realboot test only
datasource_list: [ Ec2 ]
datasource:
  Ec2:
    metadata_urls: ["{imds_url}"]
    max_wait: 60
    timeout: 5
    strict_id: false
network: {{config: disabled}}
"""


def unit_dropin(imds_url: str, moto_url: str) -> str:
    """Test-only environment for both units: the emulators' endpoints, fake credentials."""
    env = {
        "EC2_AGENT_IMDS_ENDPOINT": imds_url,
        "AWS_ENDPOINT_URL": moto_url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_RETRY_MODE": "standard",
        "NO_PROXY": "*",
    }
    lines = "\n".join(f'Environment="{k}={v}"' for k, v in env.items())
    return f"# realboot test only: endpoints on 127.0.0.1, fake credentials\n[Service]\n{lines}\n"


def operator_commands() -> list[str]:
    """The fenced sh block after DOC_MARK in docs/operations.md, one command a line."""
    text = OPERATIONS.read_text()
    assert DOC_MARK in text, f"{OPERATIONS} lost the block marked {DOC_MARK}"
    block = text.split(DOC_MARK, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    cmds = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    return [c for c in cmds if c and not c.startswith("#")]


def member_record(s3: BaseClient, iid: str) -> dict[str, object] | None:
    try:
        body = s3.get_object(
            Bucket=BUCKET, Key=f"{PREFIX}/groups/{GROUP}/members/{iid}.json")["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return json.loads(body)


def wait_for(pred: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def mono(box: Container, unit: str, prop: str) -> float:
    """A unit's CLOCK_MONOTONIC timestamp in seconds: the host's clock too (no time namespace),
    so it compares with ``time.monotonic()`` taken when nspawn started."""
    return int(unit_props(box, unit, prop)[prop]) / 1e6


def unit_props(box: Container, unit: str, *props: str) -> dict[str, str]:
    out = box.sh(f"systemctl show {unit} -p {','.join(props)}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status_json(box: Container) -> dict[str, object]:
    res = box.sh("ec2-agent status --json", check=False)  # exactly as an operator types it
    assert res.returncode == 0, f"exit {res.returncode}: {res.stdout}{res.stderr}"
    return json.loads(res.stdout)


@pytest.fixture
def preconditions() -> tuple[Path, Path]:
    reason = cannot_boot_reason()
    if reason:
        pytest.skip(reason)
    reason = only_loopback_reason()
    if reason:
        pytest.skip(reason)
    rootfs, wheelhouse = image.rootfs_dir(), image.wheelhouse()
    for path in (rootfs, wheelhouse):
        if not path.exists():
            _skip_or_fail(f"{path} is missing: run `make image-cache` first (outside the "
                          "network namespace: it needs the Debian mirror and PyPI)")
    return rootfs, wheelhouse


@pytest.fixture
def box(tmp_path: Path, preconditions: tuple[Path, Path]) -> Iterator[Container]:
    rootfs, _ = preconditions
    # The container's disk (the overlay's upper layer: the venv, journals, ~100 MB) in RAM
    # when /dev/shm is a tmpfs: writing and removing 6000 files there takes no disk time.
    shm = Path("/dev/shm")
    disk = Path(tempfile.mkdtemp(prefix="ec2-agent-realboot-", dir=shm)) if (
        shm.is_dir() and os.access(shm, os.W_OK)) else tmp_path / "box"
    c = Container(rootfs, tmp_path / "box", f"ec2-agent-test-{os.getpid()}", disk=disk)
    try:
        yield c
    finally:
        c.poweroff()
        print(f"realboot: console log {c.log}")
        if c.proc is None and not os.environ.get("EC2_AGENT_REALBOOT_KEEP"):
            # Unmounted: the overlay's mount lived in nspawn's own mount namespace.
            subprocess.run(["rm", "-rf", "--one-file-system", str(c.upper), str(c.work)],
                           check=False, timeout=120, stdin=subprocess.DEVNULL)
            if disk != tmp_path / "box":
                disk.rmdir()


def test_image_boots_for_real(box: Container, preconditions: tuple[Path, Path],
                              moto: MotoServer, tmp_path: Path,
                              record_property: Callable[[str, object], None]) -> None:
    t_start = time.monotonic()
    _, wheelhouse = preconditions

    # --- the cloud: a bucket, an instance in moto, its IMDS on loopback -----------------
    s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    ec2 = boto3.client("ec2", endpoint_url=moto.url, region_name="us-east-1")
    ud = user_data()
    iid = ec2.run_instances(
        ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=1, MaxCount=1,
        UserData=ud.decode(),  # boto3 base64-encodes it
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": "ec2-agent:group", "Value": GROUP}]}],
    )["Instances"][0]["InstanceId"]
    meta = meta_for_instance(ec2, iid)
    assert meta.user_data == ud
    # HttpTokens optional, as a default EC2 launch: cloud-init in a container cannot tell it
    # is on EC2 and reads IMDSv1; the agent itself still uses tokens.
    imds = ImdsServer(meta, http_tokens="optional").start()
    try:
        _run(box, wheelhouse, imds, moto, s3, iid, tmp_path, t_start, record_property)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- diagnostics ---\n{diagnose(box)}") from exc
    finally:
        box.poweroff()
        imds.stop()


def _run(box: Container, wheelhouse: Path, imds: ImdsServer, moto: MotoServer,
         s3: BaseClient, iid: str, tmp_path: Path, t_start: float,
         record_property: Callable[[str, object], None]) -> None:
    # --- 1. bake: what packer does, from a directory bound read-only into the container --
    (tmp_path / "wheel").mkdir()
    t0 = time.monotonic()
    wheel = build_wheel(tmp_path / "wheel")
    print(f"realboot: wheel built in {time.monotonic() - t0:.1f} s")
    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copy2(wheel, stage / wheel.name)
    shutil.copytree(REPO / "packaging", stage / "packaging",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # The test-only wiring, in files the shipped ones do not own.
    (stage / "cloud.cfg").write_text(cloud_cfg_snippet(imds.url))
    (stage / "dropin.conf").write_text(unit_dropin(imds.url, moto.url))
    (stage / "wheelhouse").mkdir()  # the mount point of the wheelhouse bound below
    box.boot(f"--bind-ro={stage}:{STAGE}", f"--bind-ro={wheelhouse}:{STAGE}/wheelhouse")
    box.wait_for_boot()  # as packer provisions once the instance is up
    t0 = time.monotonic()
    res = box.sh(f"sh {STAGE}/packaging/install.sh --enable --wheel {STAGE}/{wheel.name} /",
                 env={"EC2_AGENT_PIP_ARGS": f"--no-index --find-links {STAGE}/wheelhouse"},
                 timeout=240, check=False)
    if res.returncode != 0:
        # venv hides ensurepip's own error: show it.
        pip = box.sh("python3 -m venv --without-pip /tmp/diag && "
                     "/tmp/diag/bin/python3 -m ensurepip --default-pip 2>&1 | tail -n 30",
                     check=False)
        raise AssertionError(f"install.sh exited {res.returncode}\n{res.stdout}{res.stderr}\n"
                             f"ensurepip by hand:\n{pip.stdout}{pip.stderr}")
    print(f"realboot: install.sh took {time.monotonic() - t0:.1f} s:\n{res.stdout}")
    assert box.sh("command -v ec2-agent").stdout.strip() == "/usr/local/bin/ec2-agent"
    assert "usage: ec2-agent" in box.sh("ec2-agent --help").stdout
    enabled = box.sh("systemctl is-enabled " + " ".join(UNITS), check=False).stdout.split()
    assert enabled == ["enabled"] * 3, f"install.sh --enable: {enabled}"
    # The image under test: units installed but not enabled (see the module docstring),
    # the test-only wiring, and no agent or cloud-init state (as packer leaves it).
    box.sh(" && ".join([
        "systemctl disable -q " + " ".join(UNITS),
        f"install -D -m 0644 {STAGE}/cloud.cfg "
        "/etc/cloud/cloud.cfg.d/99-ec2-agent-realboot-test.cfg",
        *(f"install -D -m 0644 {STAGE}/dropin.conf /etc/systemd/system/{u}.d/realboot-test.conf"
          for u in ("ec2-agent-boot.service", "ec2-agent.service")),
        "rm -rf /var/lib/ec2-agent",
        "cloud-init clean --logs",
    ]))
    assert box.poweroff() == 0
    t_baked = time.monotonic()

    # --- 2. first boot of the instance -------------------------------------------------
    box.boot()
    started = box.started_at
    box.wait_until("systemctl is-active -q ec2-agent.service", timeout=120)
    boot_to_ready = mono(box, "ec2-agent.service", "ActiveEnterTimestampMonotonic") - started
    box.sh("cloud-init status --wait", timeout=120)
    cloud_init_done = mono(box, "cloud-final.service", "ActiveEnterTimestampMonotonic") - started
    agent_boot = (mono(box, "ec2-agent-boot.service", "ExecMainExitTimestampMonotonic")
                  - mono(box, "ec2-agent-boot.service", "ExecMainStartTimestampMonotonic"))
    cloud_init = box.sh("cloud-init status --long").stdout
    assert re.search(r"^status: done$", cloud_init, re.M), cloud_init
    result = json.loads(box.sh("cat /run/cloud-init/result.json").stdout)["v1"]
    assert result["datasource"].startswith("DataSourceEc2"), result
    assert result["errors"] == [], result
    reqs = list(imds.faults.requests)
    imdsv1 = sorted({r.path for r in reqs if not r.had_token and r.method == "GET"})
    assert imdsv1, "cloud-init made no IMDSv1 read"  # the mode it needs in a container
    # The agent itself (paths under latest/; cloud-init uses dated versions) used IMDSv2.
    agent_reads = [r for r in reqs if r.method == "GET" and r.path.startswith("latest/")]
    assert agent_reads and all(r.had_token for r in agent_reads), sorted(
        {(r.path, r.had_token) for r in agent_reads})

    boot = unit_props(box, "ec2-agent-boot.service", "ActiveState", "Result",
                      "ExecMainStatus")
    assert boot == {"ActiveState": "active", "Result": "success", "ExecMainStatus": "0"}, boot
    daemon = unit_props(box, "ec2-agent.service", "Type", "ActiveState", "SubState",
                        "MainPID", "NRestarts")
    assert daemon["Type"] == "notify" and daemon["ActiveState"] == "active", daemon
    st = status_json(box)
    assert (st["status"], st["boot_kind"], st["instance_id"]) == ("done", "first", iid), st
    rec = member_record(s3, iid)
    assert rec is not None, "no member record in S3 after the first boot"
    enabled = box.sh("systemctl is-enabled " + " ".join(UNITS), check=False).stdout.split()
    assert enabled == ["enabled"] * 3, f"the cloud-config did not enable the units: {enabled}"
    for cmd in operator_commands():
        res = box.sh(cmd, check=False)
        assert res.returncode == 0, f"docs/operations.md: `{cmd}` exited {res.returncode}\n" \
                                    f"{res.stdout}{res.stderr}"
    t_first = time.monotonic()

    # --- 3. the watchdog: a stopped daemon is killed and restarted ----------------------
    pid = int(daemon["MainPID"])
    box.sh(f"kill -STOP {pid}")
    restarted = wait_for(lambda: _restarted(box, pid), 75, "the watchdog to restart the daemon",
                         interval=1.0)
    assert int(restarted["NRestarts"]) >= int(daemon["NRestarts"]) + 1, restarted
    journal = box.sh("journalctl -b -u ec2-agent.service --no-pager -o cat").stdout
    assert "Watchdog timeout" in journal, journal[-3000:]
    assert box.sh(f"test -e /proc/{pid}", check=False).returncode == 1, "the old daemon lives"
    t_watchdog = time.monotonic()

    # --- 4. reboot: back by itself, reports a reboot, heartbeats ------------------------
    box.reboot()
    box.wait_until("systemctl is-active -q ec2-agent.service", timeout=120)
    reboot_to_ready = (mono(box, "ec2-agent.service", "ActiveEnterTimestampMonotonic")
                       - box.started_at)
    st = status_json(box)
    assert (st["status"], st["boot_kind"]) == ("done", "reboot"), st
    first = wait_for(lambda: member_record(s3, iid), 20, "the member record after reboot")
    second = wait_for(lambda: _changed(member_record(s3, iid), first), 20,
                      "a second heartbeat after the reboot")
    assert second["boot_id"] != rec["boot_id"], (rec, second)
    if "seq" in first and "seq" in second:
        assert int(second["seq"]) > int(first["seq"]), (first, second)
    t_reboot = time.monotonic()

    # --- 5. a planned stop leaves the group --------------------------------------------
    box.sh("systemctl stop ec2-agent", timeout=150)
    wait_for(lambda: member_record(s3, iid) is None, 20, "the record to be deleted on stop")
    assert box.poweroff() == 0
    t_end = time.monotonic()

    timings = {
        "boot_to_ready_s": round(boot_to_ready, 2),
        "agent_boot_s": round(agent_boot, 2),
        "cloud_init_done_s": round(cloud_init_done, 2),
        "reboot_to_ready_s": round(reboot_to_ready, 2),
        "bake_s": round(t_baked - t_start, 1),
        "first_boot_checks_s": round(t_first - t_baked, 1),
        "watchdog_s": round(t_watchdog - t_first, 1),
        "reboot_s": round(t_reboot - t_watchdog, 1),
        "total_s": round(t_end - t_start, 1),
    }
    print(f"realboot: boot-to-ready {boot_to_ready:.2f} s (nspawn start -> ec2-agent.service "
          f"active); {json.dumps(timings)}")
    record_property("realboot", timings)  # shown in make test's summary (tests/conftest.py)
    report = os.environ.get("EC2_AGENT_REALBOOT_REPORT")
    if report:
        Path(report).write_text(json.dumps(timings) + "\n")


def diagnose(box: Container) -> str:
    """What a human would look at first, from inside the (still running) container."""
    if not box.pid1:
        return box.tail()
    res = box.sh("cloud-init status --long; cat /run/cloud-init/result.json; "
                 "tail -n 30 /run/cloud-init/cloud-init-generator.log "
                 "/run/cloud-init/ds-identify.log; "
                 "systemctl --failed --no-pager; "
                 "systemctl status --no-pager -n 30 ec2-agent-boot ec2-agent; "
                 "tail -n 60 /var/log/cloud-init.log", check=False, timeout=30)
    return res.stdout + res.stderr


def _restarted(box: Container, old_pid: int) -> dict[str, str] | None:
    p = unit_props(box, "ec2-agent.service", "ActiveState", "MainPID", "NRestarts")
    if p["ActiveState"] == "active" and p["MainPID"] not in ("0", str(old_pid)):
        return p
    return None


def _changed(now: dict[str, object] | None, before: dict[str, object]) -> dict[str, object] | None:
    return now if now is not None and now != before else None

