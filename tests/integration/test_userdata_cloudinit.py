"""Referee: the real cloud-init 22.4 builds and reads the user-data we parse.

- ``cloud-init devel make-mime`` builds the multipart (``--force`` for our
  non-standard ``x-ec2-agent`` type; without it make-mime exits 1 with "Invalid
  content-types, override with --force"); plain and gzipped, parse_user_data must
  return the expected mapping.
- cloud-init's own decoder (``cloudinit.user_data.convert_string``, run in the
  system Python that ships cloud-init) splits the same bytes into parts; the
  ``ec2_agent`` it sees must be what we return.
- ``cloud-init schema --config-file`` accepts a ``#cloud-config`` carrying
  ``ec2_agent:``. Observed with 22.4: exit 0, "Valid cloud-config: <file>", no
  warning about the unknown top-level key (cloud-init ignores it).

Nothing here enables or runs cloud-init's boot stages.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.config.userdata import parse_user_data
from agent.errors import UserDataError

CLOUD_INIT = shutil.which("cloud-init")
pytestmark = pytest.mark.skipif(
    CLOUD_INIT is None, reason="cloud-init is not installed (the referee for user-data)"
)
SYSTEM_PYTHON = "/usr/bin/python3"

CLOUD_CONFIG = """#cloud-config
packages: [nginx]
runcmd: [[echo, hello]]
ec2_agent:
  group: web
  store: {bucket: my-fleet, prefix: prod}
  heal: {mode: armed, grace_s: 60}
"""
AGENT_PART = """heal: {mode: dry-run}
health:
  - {type: http, url: "http://127.0.0.1:8080/healthz"}
"""
SCRIPT = "#!/bin/sh\necho 'shell part: not for the agent'\n"


def make_mime(tmp_path: Path, *parts: tuple[str, str, str], force: bool = True) -> bytes:
    args = [CLOUD_INIT, "devel", "make-mime"]
    if force:
        args.append("--force")
    for name, content, ctype in parts:
        f = tmp_path / name
        f.write_text(content)
        args += ["-a", f"{f}:{ctype}"]
    proc = subprocess.run(args, capture_output=True, timeout=60, check=True)
    return proc.stdout


def cloud_init_parts(raw: bytes, tmp_path: Path) -> list[tuple[str, str]]:
    """(content type, text) of every leaf part, as cloud-init itself decodes ``raw``."""
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip("no system python3 with the cloudinit package")
    src = tmp_path / "ud.bin"
    src.write_bytes(raw)
    code = (
        "import json, sys\n"
        "from cloudinit import user_data\n"
        "msg = user_data.convert_string(open(sys.argv[1], 'rb').read())\n"
        "out = [(p.get_content_type(), p.get_payload(decode=True).decode())\n"
        "       for p in msg.walk() if not p.is_multipart()]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [SYSTEM_PYTHON, "-c", code, str(src)], capture_output=True, timeout=60, text=True
    )
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip("system python3 cannot import cloudinit")
    assert proc.returncode == 0, proc.stderr
    return [tuple(p) for p in json.loads(proc.stdout)]


EXPECTED_MERGED = {
    "group": "web",
    "store": {"bucket": "my-fleet", "prefix": "prod"},
    "heal": {"mode": "dry-run", "grace_s": 60},
    "health": [{"type": "http", "url": "http://127.0.0.1:8080/healthz"}],
}


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_make_mime_cloud_config_and_agent_part(tmp_path: Path, gzipped: bool) -> None:
    raw = make_mime(
        tmp_path,
        ("script.sh", SCRIPT, "x-shellscript"),
        ("cc.yaml", CLOUD_CONFIG, "cloud-config"),
        ("agent.yaml", AGENT_PART, "x-ec2-agent"),
    )
    assert b"text/x-ec2-agent" in raw and b"Content-Transfer-Encoding" in raw
    if gzipped:
        raw = gzip.compress(raw)
    assert parse_user_data(raw) == EXPECTED_MERGED

    # cloud-init's own decoder sees the same parts and the same ec2_agent.
    parts = dict(cloud_init_parts(raw, tmp_path))
    assert set(parts) == {"text/x-shellscript", "text/cloud-config", "text/x-ec2-agent"}
    cc_agent = yaml.safe_load(parts["text/cloud-config"])["ec2_agent"]
    agent_part = yaml.safe_load(parts["text/x-ec2-agent"])
    assert parse_user_data(raw) == {
        **cc_agent,
        **agent_part,
        "heal": {**cc_agent["heal"], **agent_part["heal"]},
    }


def test_make_mime_refuses_our_type_without_force(tmp_path: Path) -> None:
    """Document the flag: make-mime rejects x-ec2-agent unless --force is given."""
    with pytest.raises(subprocess.CalledProcessError) as info:
        make_mime(tmp_path, ("agent.yaml", AGENT_PART, "x-ec2-agent"), force=False)
    assert b"--force" in info.value.stderr


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_make_mime_cloud_config_only(tmp_path: Path, gzipped: bool) -> None:
    raw = make_mime(tmp_path, ("cc.yaml", CLOUD_CONFIG, "cloud-config"), force=False)
    if gzipped:
        raw = gzip.compress(raw)
    expected = yaml.safe_load(CLOUD_CONFIG)["ec2_agent"]
    assert parse_user_data(raw) == expected
    ((ctype, text),) = cloud_init_parts(raw, tmp_path)
    assert ctype == "text/cloud-config"
    assert yaml.safe_load(text)["ec2_agent"] == expected


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
def test_make_mime_agent_part_only(tmp_path: Path, gzipped: bool) -> None:
    wrapped = yaml.safe_dump({"ec2_agent": {"group": "api", "store": {"bucket": "b-1"}}})
    raw = make_mime(tmp_path, ("agent.yaml", wrapped, "x-ec2-agent"))
    if gzipped:
        raw = gzip.compress(raw)
    assert parse_user_data(raw) == {"group": "api", "store": {"bucket": "b-1"}}


def test_make_mime_shell_only_has_no_agent_part(tmp_path: Path) -> None:
    raw = make_mime(tmp_path, ("script.sh", SCRIPT, "x-shellscript"), force=False)
    assert parse_user_data(raw) is None


def test_cloud_init_schema_accepts_ec2_agent_key(tmp_path: Path) -> None:
    f = tmp_path / "user-data.yaml"
    f.write_text(CLOUD_CONFIG)
    proc = subprocess.run(
        [CLOUD_INIT, "schema", "--config-file", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    # 22.4 says "Valid cloud-config: <file>" and exits 0; it does not flag ec2_agent.
    assert proc.returncode == 0, out
    assert "Valid cloud-config" in out
    assert "not valid yaml" not in out.lower()
    assert parse_user_data(CLOUD_CONFIG.encode()) == yaml.safe_load(CLOUD_CONFIG)["ec2_agent"]


def test_cloud_init_schema_and_we_both_reject_broken_yaml(tmp_path: Path) -> None:
    text = "#cloud-config\nec2_agent: {group: web\n"
    f = tmp_path / "broken.yaml"
    f.write_text(text)
    proc = subprocess.run(
        [CLOUD_INIT, "schema", "--config-file", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "not valid yaml" in (proc.stdout + proc.stderr).lower()
    with pytest.raises(UserDataError, match="line 3, column 1"):
        parse_user_data(text.encode())
