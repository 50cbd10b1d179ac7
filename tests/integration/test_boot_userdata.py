"""The boot's user-data phase on real-world user-data, against moto and the IMDS emulator.

Each case is user-data cloud-init accepts; the boot must take the agent's block
(or say there is none) and never fail on what is not the agent's.
"""

from __future__ import annotations

import base64
import json
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import yaml

from agent.boot.run import run_boot
from agent.paths import Paths
from agent.sim.cloud import EmbeddedCloud, SimInstance


def _agent_block(cloud: EmbeddedCloud) -> dict:
    return cloud.agent_config("web")


def _set(cloud: EmbeddedCloud, inst: SimInstance, raw: bytes) -> None:
    cloud.imds.host(inst.instance_id).meta.user_data = raw


def _cloud_config(block: dict, **other: object) -> str:
    return "#cloud-config\n" + yaml.safe_dump({**other, "ec2_agent": block})


def _config_json(inst: SimInstance) -> dict:
    return json.loads((Paths(inst.root).state_dir / "config.json").read_text())


def test_mixed_type_keys_boot(cloud: EmbeddedCloud, instance: SimInstance) -> None:
    """Regression: validated, then the boot failed with TypeError in the layers digest."""
    block = _agent_block(cloud)
    text = _cloud_config(block).replace("ec2_agent:\n", "ec2_agent:\n  vars: {ports: "
                                        "{80: http, admin: 8443}}\n", 1)
    _set(cloud, instance, text.encode())
    st = run_boot(Paths(instance.root))
    assert st["status"] == "done", st["errors"]
    # ... and `run` starts from the same config: int keys survive instance.json.
    from agent.boot.instance import load_context

    ctx = load_context(Paths(instance.root))
    assert ctx.config.vars["ports"] == {80: "http", "admin": 8443}


def test_someone_elses_parts_do_not_fail_the_boot(cloud: EmbeddedCloud,
                                                  instance: SimInstance) -> None:
    outer = MIMEMultipart()
    script = MIMEText("", "x-shellscript")
    script.set_payload(base64.encodebytes("#!/bin/sh\necho café\n".encode("latin-1")).decode())
    script.replace_header("Content-Transfer-Encoding", "base64")
    outer.attach(script)
    outer.attach(MIMEApplication(bytes(range(256)), "octet-stream"))
    outer.attach(MIMEText("#cloud-config\napt: {a: 1}\napt: {b: 2}\n", "cloud-config"))
    outer.attach(MIMEText("#cloud-config\npackages: [nginx\n", "cloud-config"))
    outer.attach(MIMEText(_cloud_config(_agent_block(cloud)), "cloud-config"))
    _set(cloud, instance, b"From nobody Tue Dec  1 00:00:00 2026\n" + outer.as_bytes())
    st = run_boot(Paths(instance.root))
    assert st["status"] == "done", st["errors"]
    assert st["group"] == "web"
    assert any("not valid YAML" in n for n in st["user_data_notes"]), st["user_data_notes"]
    detail = next(p["detail"] for p in st["phases"] if p["name"] == "userdata")
    assert "note" in detail


def test_jinja_is_rendered_with_the_instances_metadata(cloud: EmbeddedCloud,
                                                       instance: SimInstance) -> None:
    block = _agent_block(cloud)
    block["vars"] = {"where": "{{ v1.region }}/{{ v1.availability_zone }}",
                     "me": "{{ v1.instance_id }}"}
    raw = "## Template: Jinja\n" + _cloud_config(block)
    _set(cloud, instance, raw.encode())
    st = run_boot(Paths(instance.root))
    assert st["status"] == "done", st["errors"]
    ident = st["identity"]
    got = _config_json(instance)["config"]["vars"]
    assert got["me"] == instance.instance_id
    assert got["where"].endswith("/" + ident["az"]) and ident["az"].startswith(
        got["where"].split("/")[0])


def test_broken_agent_block_fails_with_line_and_column(cloud: EmbeddedCloud,
                                                       instance: SimInstance) -> None:
    _set(cloud, instance, b"#cloud-config\nruncmd: [ls]\nec2_agent:\n  group: web\n"
                          b"  group: api\n")
    st = run_boot(Paths(instance.root))
    assert st["status"] == "error"
    assert "line 5, column 3" in st["errors"][0], st["errors"]
