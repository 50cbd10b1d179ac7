"""The operator's commands end to end, in-process (`cli.main`) as one emulated instance.

The `instance` fixture points EC2_AGENT_ROOT, EC2_AGENT_IMDS_ENDPOINT and
AWS_ENDPOINT_URL at an instance of group `web` in the real moto server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from agent.aws.store import Store
from agent.cli import main
from agent.paths import Paths
from agent.sim.cloud import EmbeddedCloud, SimInstance


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_config_validate_good_and_bad(tmp_path: Path, capsys) -> None:
    good = tmp_path / "agent.yaml"
    good.write_text("group: web\nstore: {bucket: my-fleet}\nheartbeat: {interval_s: 5}\n")
    code, out, _ = _run(capsys, "config", "validate", str(good))
    assert code == 0 and "valid" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("group: web\nheal:\n  freeze_fraction: 2\n  mode: sometimes\n")
    code, _, err = _run(capsys, "config", "validate", str(bad))
    assert code == 1
    assert "heal.freeze_fraction" in err and "heal.mode" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("group: [web\n")
    code, _, err = _run(capsys, "config", "validate", str(broken))
    assert code == 1 and "line" in err


def test_config_validate_user_data_file(tmp_path: Path, capsys) -> None:
    ud = tmp_path / "user-data"
    ud.write_bytes(b"#cloud-config\nec2_agent:\n  group: web\n  store: {bucket: my-fleet}\n")
    code, out, err = _run(capsys, "config", "validate", str(ud))
    assert code == 0, err


def test_config_show_merges_layers_and_redacts(root: Path, tmp_path: Path, capsys) -> None:
    baked = Paths(root).config_file
    baked.parent.mkdir(parents=True)
    baked.write_text("heartbeat: {interval_s: 4, dead_after_s: 12}\n")
    ud = tmp_path / "ud"
    ud.write_bytes(b"#cloud-config\nec2_agent:\n  group: web\n  store: {bucket: my-fleet}\n"
                   b"  vars: {db_password: hunter2, region_name: eu}\n")
    code, out, err = _run(capsys, "config", "show", "--user-data", str(ud))
    assert code == 0, err
    shown = yaml.safe_load(out)
    assert shown["group"] == "web" and shown["heartbeat"]["interval_s"] == 4
    assert shown["vars"]["region_name"] == "eu"
    assert "hunter2" not in out


def test_boot_status_peers_events_pause_resume(cloud: EmbeddedCloud, instance: SimInstance,
                                               capsys) -> None:
    code, out, _ = _run(capsys, "boot")
    assert code == 0 and "status: done" in out
    code, out, _ = _run(capsys, "status", "--json")
    assert code == 0 and json.loads(out)["instance_id"] == instance.instance_id
    code, out, _ = _run(capsys, "peers", "--json")
    assert code == 0
    assert instance.instance_id in {p["id"] for p in json.loads(out)}
    code, out, _ = _run(capsys, "pause", "--reason", "maintenance")
    assert code == 0
    store = Store(cloud.bucket, cloud.prefix)
    assert store.exists("groups/web/control/pause")
    code, out, _ = _run(capsys, "resume")
    assert code == 0 and not store.exists("groups/web/control/pause")
    code, out, _ = _run(capsys, "events", "--json")
    kinds = [e["kind"] for e in json.loads(out)]
    assert "pause" in kinds and "resume" in kinds
    code, out, _ = _run(capsys, "leave")
    assert code == 0
    code, out, _ = _run(capsys, "peers", "--json")
    assert instance.instance_id not in {p["id"] for p in json.loads(out)}


def test_bundle_push_then_boot_renders(cloud: EmbeddedCloud, instance: SimInstance,
                                       tmp_path: Path, capsys) -> None:
    src = tmp_path / "bundle"
    src.mkdir()
    (src / "agent.yaml").write_text(
        "vars: {greeting: hello}\ntemplates:\n"
        "  - {src: motd.j2, dest: /etc/motd, mode: '0644'}\n")
    (src / "motd.j2").write_text("{{ vars.greeting }} from {{ instance.id }} in {{ group }}\n")
    code, out, err = _run(capsys, "bundle", "push", str(src), "--group", "web", "--bucket",
                          cloud.bucket, "--prefix", cloud.prefix)
    assert code == 0, err
    code, out, err = _run(capsys, "boot")
    assert code == 0, out + err
    assert (instance.root / "etc/motd").read_text() == (
        f"hello from {instance.instance_id} in web\n")


def test_backup_and_restore_commands(cloud: EmbeddedCloud, instance: SimInstance,
                                     capsys) -> None:
    ud = (b"#cloud-config\nec2_agent:\n  group: web\n  store: {bucket: " + cloud.bucket.encode()
          + b", prefix: " + cloud.prefix.encode() + b"}\n"
          b"  data: [{name: app, path: /var/lib/app, required: false}]\n")
    cloud.imds.host(instance.instance_id).meta.user_data = ud
    data = instance.root / "var/lib/app"
    data.mkdir(parents=True)
    (data / "db.bin").write_bytes(b"x" * 100_000)
    code, out, err = _run(capsys, "boot")
    assert code == 0, out + err
    code, out, err = _run(capsys, "backup")
    assert code == 0, err
    (data / "db.bin").write_bytes(b"corrupted by a human")
    code, out, err = _run(capsys, "restore")
    assert code != 0  # a non-empty data dir is never overwritten without --force
    assert (data / "db.bin").read_bytes() == b"corrupted by a human"
    code, out, err = _run(capsys, "restore", "--force")
    assert code == 0, err
    assert (data / "db.bin").read_bytes() == b"x" * 100_000
