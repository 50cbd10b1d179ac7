"""The IMDS emulator's ``HttpTokens: optional`` mode and dated versions (issue #14).

In a container cloud-init cannot prove it is on EC2 (no DMI, no /sys/hypervisor/uuid),
so its Ec2 datasource skips the token and reads IMDSv1 under a dated version
(``/2009-04-04/meta-data/instance-id`` first). Real EC2 serves that when the instance's
``HttpTokens`` is ``optional``; the emulator must too, and keep ``required`` (401 without
a token) as its default.

Referee: cloud-init 22.4's own ``DataSourceEc2`` (the system Python's ``cloudinit``),
pointed at the emulator, told it is on an unknown platform as in a container. It must
find the instance and its user-data with ``optional``, and must not with ``required``.
"""

from __future__ import annotations

import http.client
import json
import subprocess
from pathlib import Path

import pytest

from agent.sim.imds import API_VERSIONS, ImdsEmulator, ImdsServer, InstanceMeta

SYSTEM_PYTHON = "/usr/bin/python3"


def get(url: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    host = url.split("//", 1)[1].split("/", 1)
    conn = http.client.HTTPConnection(host[0], timeout=5)
    prefix = "/" + host[1] if len(host) > 1 else ""
    try:
        conn.request("GET", prefix + path,
                     headers={"X-aws-ec2-metadata-token": token} if token is not None else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def put_token(url: str) -> str:
    host = url.split("//", 1)[1]
    conn = http.client.HTTPConnection(host, timeout=5)
    try:
        conn.request("PUT", "/latest/api/token",
                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.read().decode()
    finally:
        conn.close()


def test_required_is_the_default_and_refuses_imdsv1(imds_meta: InstanceMeta) -> None:
    with ImdsServer(imds_meta) as server:
        assert server.host.http_tokens == "required"
        for path in ("/", "/latest/meta-data/instance-id", "/2009-04-04/meta-data/instance-id",
                     "/2009-04-04/user-data"):
            assert get(server.url, path)[0] == 401, path
        token = put_token(server.url)
        assert get(server.url, "/2009-04-04/meta-data/instance-id", token) == (
            200, imds_meta.instance_id.encode())


def test_optional_serves_imdsv1_under_every_version(imds_meta: InstanceMeta) -> None:
    with ImdsServer(imds_meta, http_tokens="optional") as server:
        status, body = get(server.url, "/")
        assert status == 200
        versions = body.decode().splitlines()
        assert versions[-1] == "latest" and "2009-04-04" in versions
        assert versions[:-1] == sorted(versions[:-1], key=lambda v: (v != "1.0", v))
        for ver in ("2009-04-04", "2016-09-02", "2018-09-24", "2021-03-23", "latest"):
            assert get(server.url, f"/{ver}/meta-data/instance-id") == (
                200, imds_meta.instance_id.encode()), ver
            assert get(server.url, f"/{ver}/user-data") == (200, imds_meta.user_data), ver
            listing = get(server.url, f"/{ver}/meta-data/")[1].decode().splitlines()
            assert {"instance-id", "placement/", "local-ipv4"} <= set(listing), listing
            doc = json.loads(get(server.url, f"/{ver}/dynamic/instance-identity/document")[1])
            assert doc["instanceId"] == imds_meta.instance_id
        assert get(server.url, "/1999-01-01/meta-data/instance-id")[0] == 404
        # A token that is sent must be valid, as on EC2 in optional mode; a valid one works.
        assert get(server.url, "/latest/meta-data/instance-id", "not-a-token")[0] == 401
        token = put_token(server.url)
        assert get(server.url, "/latest/meta-data/instance-id", token)[0] == 200
        assert all(not r.had_token for r in server.faults.requests[:3])


def test_mode_is_checked_and_per_instance(imds_meta: InstanceMeta) -> None:
    with pytest.raises(ValueError, match="http_tokens"):
        ImdsServer(imds_meta, http_tokens="sometimes")
    other = InstanceMeta(instance_id="i-0other000000000000")
    with ImdsEmulator() as emu:
        v1 = emu.add(imds_meta, http_tokens="optional")
        v2 = emu.add(other)
        assert get(v1, "/2009-04-04/meta-data/instance-id")[0] == 200
        assert get(v2, "/2009-04-04/meta-data/instance-id")[0] == 401
        assert get(v1, "/")[0] == 200


# --- referee: cloud-init's own Ec2 datasource -------------------------------------------

CLOUD_INIT_EC2 = r"""
import json, sys, tempfile
from cloudinit import distros, helpers
from cloudinit.sources import DataSourceEc2 as ec2

url = sys.argv[1]
tmp = tempfile.mkdtemp()
paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
distro = distros.fetch("debian")("debian", {}, paths)
sys_cfg = {"datasource": {"Ec2": {"metadata_urls": [url], "max_wait": 2, "timeout": 1}}}
ds = ec2.DataSourceEc2(sys_cfg, distro, paths)
ds._cloud_name = ec2.CloudNames.UNKNOWN  # as in a container: no DMI to say "AWS"
ok = ds.get_data()
print(json.dumps({
    "ok": ok,
    "instance_id": ds.get_instance_id() if ok else None,
    "userdata": (ds.get_userdata_raw() or b"").decode() if ok else None,
    "az": ds.availability_zone if ok else None,
}))
"""


@pytest.fixture
def cloud_init_python() -> str:
    res = subprocess.run([SYSTEM_PYTHON, "-c", "import cloudinit.sources.DataSourceEc2"],
                         capture_output=True, timeout=60, check=False)
    if res.returncode != 0:
        pytest.skip("cloud-init is not installed in the system Python (.ci/run installs it)")
    return SYSTEM_PYTHON


def cloud_init_reads(python: str, url: str, tmp_path: Path) -> dict[str, object]:
    res = subprocess.run([python, "-c", CLOUD_INIT_EC2, url], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cloud_init_ec2_datasource_reads_optional_mode(
        imds_meta: InstanceMeta, cloud_init_python: str, tmp_path: Path) -> None:
    with ImdsServer(imds_meta, http_tokens="optional") as server:
        got = cloud_init_reads(cloud_init_python, server.url, tmp_path)
        tokenless = {r.path for r in server.faults.requests if not r.had_token}
    assert got["ok"] is True, got
    assert got["instance_id"] == imds_meta.instance_id
    assert got["userdata"] == imds_meta.user_data.decode()
    assert got["az"] == imds_meta.availability_zone
    # Its probe (the minimum version), then its crawl under the newest version it knows.
    assert "2009-04-04/meta-data/instance-id" in tokenless, sorted(tokenless)
    crawled = {p.split("/", 1)[0] for p in tokenless if p.endswith("/meta-data")}
    assert crawled and crawled <= set(API_VERSIONS), sorted(tokenless)


def test_cloud_init_ec2_datasource_gives_up_on_required_mode(
        imds_meta: InstanceMeta, cloud_init_python: str, tmp_path: Path) -> None:
    """The defect as cloud-init saw it: token required, no DMI, no data."""
    with ImdsServer(imds_meta) as server:
        got = cloud_init_reads(cloud_init_python, server.url, tmp_path)
        statuses = {r.status for r in server.faults.requests}
    assert got["ok"] is False, got
    assert statuses == {401}, statuses
