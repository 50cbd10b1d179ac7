"""The IMDSv2 emulator speaks the protocol the way AWS documents it (raw HTTP, no client)."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from agent.clock import FakeClock
from agent.sim.imds import (
    TOKEN_HEADER,
    TTL_HEADER,
    ImdsEmulator,
    ImdsServer,
    InstanceMeta,
)
from agent.sim.netutil import LOOPBACK


def call(url: str, method: str, path: str, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes, http.client.HTTPMessage]:
    host_port = url.split("://", 1)[1]
    hostport, _, prefix = host_port.partition("/")
    host, port = hostport.split(":")
    assert host == LOOPBACK
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        full = f"/{prefix}{path}" if prefix else path
        conn.request(method, full, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.headers
    finally:
        conn.close()


def token(url: str, ttl: int = 60) -> str:
    status, body, _ = call(url, "PUT", "/latest/api/token", {TTL_HEADER: str(ttl)})
    assert status == 200
    return body.decode()


def get(url: str, path: str, tok: str | None) -> tuple[int, bytes]:
    status, body, _ = call(url, "GET", path, {TOKEN_HEADER: tok} if tok else {})
    return status, body


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-5", "abc", ""])
def test_token_ttl_out_of_range_is_400(imds_server: ImdsServer, ttl: str | None) -> None:
    headers = {} if ttl is None else {TTL_HEADER: ttl}
    status, _, _ = call(imds_server.url, "PUT", "/latest/api/token", headers)
    assert status == 400


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_token_ttl_bounds_are_accepted(imds_server: ImdsServer, ttl: str) -> None:
    status, body, headers = call(imds_server.url, "PUT", "/latest/api/token", {TTL_HEADER: ttl})
    assert status == 200 and body
    assert headers[TTL_HEADER] == ttl


def test_token_path_wants_put_and_forwarded_requests_are_refused(
        imds_server: ImdsServer) -> None:
    assert call(imds_server.url, "GET", "/latest/api/token")[0] == 405
    status, _, _ = call(imds_server.url, "PUT", "/latest/api/token",
                        {TTL_HEADER: "60", "X-Forwarded-For": "10.0.0.1"})
    assert status == 403


def test_get_needs_a_valid_token(imds_server: ImdsServer) -> None:
    path = "/latest/meta-data/instance-id"
    assert get(imds_server.url, path, None)[0] == 401
    assert get(imds_server.url, path, "not-a-token")[0] == 401
    assert get(imds_server.url, path, token(imds_server.url)) == (200, b"i-0abc1234def567890")


def test_token_expires_after_its_ttl_on_the_server_clock(imds_meta: InstanceMeta) -> None:
    clock = FakeClock()
    with ImdsServer(imds_meta, clock=clock) as server:
        tok = token(server.url, ttl=5)
        assert get(server.url, "/latest/meta-data/ami-id", tok)[0] == 200
        clock.advance(4.9)
        assert get(server.url, "/latest/meta-data/ami-id", tok)[0] == 200
        clock.advance(0.2)
        assert get(server.url, "/latest/meta-data/ami-id", tok)[0] == 401


def test_token_expires_in_real_time_with_a_short_ttl(imds_server: ImdsServer) -> None:
    tok = token(imds_server.url, ttl=1)
    assert get(imds_server.url, "/latest/meta-data/ami-id", tok)[0] == 200
    time.sleep(1.1)
    assert get(imds_server.url, "/latest/meta-data/ami-id", tok)[0] == 401


def test_metadata_paths(imds_server: ImdsServer) -> None:
    url, tok = imds_server.url, token(imds_server.url)
    expect = {
        "/latest/meta-data/instance-id": b"i-0abc1234def567890",
        "/latest/meta-data/ami-id": b"ami-0fixture",
        "/latest/meta-data/instance-type": b"t3.small",
        "/latest/meta-data/local-ipv4": b"10.1.2.3",
        "/latest/meta-data/hostname": b"ip-10-1-2-3.ec2.internal",
        "/latest/meta-data/local-hostname": b"ip-10-1-2-3.ec2.internal",
        "/latest/meta-data/placement/availability-zone": b"eu-west-1b",
        "/latest/meta-data/placement/availability-zone/": b"eu-west-1b",  # botocore's form
        "/latest/meta-data/placement/region": b"eu-west-1",
        "/latest/meta-data/tags/instance/Name": b"web-1",
        "/latest/user-data": b"#cloud-config\nec2_agent: {group: web}\n",
        "/latest/meta-data/iam/security-credentials/": b"ec2-agent-sim",
    }
    for path, body in expect.items():
        assert get(url, path, tok) == (200, body), path
    status, mac = get(url, "/latest/meta-data/mac", tok)
    assert status == 200 and len(mac.split(b":")) == 6
    status, listing = get(url, "/latest/meta-data/", tok)
    assert status == 200
    entries = listing.decode().splitlines()
    assert {"instance-id", "ami-id", "placement/", "tags/", "iam/"} <= set(entries)
    assert get(url, "/latest/meta-data/tags/instance", tok)[1].decode().splitlines() == [
        "Name", "group"]
    for missing in ("/latest/meta-data/nope", "/latest/meta-data/tags/instance/nope",
                    "/latest/meta-data/spot/instance-action",
                    "/latest/meta-data/autoscaling/target-lifecycle-state", "/nothing"):
        assert get(url, missing, tok)[0] == 404, missing


def test_identity_document_and_credentials(imds_server: ImdsServer) -> None:
    url, tok = imds_server.url, token(imds_server.url)
    status, body = get(url, "/latest/dynamic/instance-identity/document", tok)
    assert status == 200
    doc = json.loads(body)
    assert doc["instanceId"] == "i-0abc1234def567890"
    assert doc["imageId"] == "ami-0fixture"
    assert doc["instanceType"] == "t3.small"
    assert doc["availabilityZone"] == "eu-west-1b"
    assert doc["region"] == "eu-west-1"
    assert doc["privateIp"] == "10.1.2.3"
    assert doc["accountId"] == "123456789012"
    assert {"architecture", "pendingTime", "version"} <= set(doc)
    status, body = get(url, "/latest/meta-data/iam/security-credentials/ec2-agent-sim", tok)
    creds = json.loads(body)
    assert creds["AccessKeyId"] == "testing" and creds["Code"] == "Success"
    assert {"SecretAccessKey", "Token", "Expiration"} <= set(creds)


def test_runtime_changes_are_served(imds_server: ImdsServer) -> None:
    url, tok = imds_server.url, token(imds_server.url)
    imds_server.meta.spot_action = {"action": "terminate", "time": "2030-01-01T00:00:00Z"}
    imds_server.meta.target_lifecycle_state = "Terminated"
    imds_server.meta.user_data = None
    imds_server.meta.tags["new"] = "tag"
    status, body = get(url, "/latest/meta-data/spot/instance-action", tok)
    assert status == 200 and json.loads(body)["action"] == "terminate"
    assert get(url, "/latest/meta-data/autoscaling/target-lifecycle-state", tok) == (
        200, b"Terminated")
    assert get(url, "/latest/user-data", tok)[0] == 404
    assert get(url, "/latest/meta-data/tags/instance/new", tok) == (200, b"tag")
    imds_server.meta.tags_exposed = False
    assert get(url, "/latest/meta-data/tags/instance", tok)[0] == 404


def test_fail_and_retry_after_then_recover(imds_server: ImdsServer) -> None:
    imds_server.faults.fail_next_n = 2
    imds_server.faults.error_status = 503
    imds_server.faults.retry_after = "1"
    for _ in range(2):
        status, _, headers = call(imds_server.url, "PUT", "/latest/api/token",
                                  {TTL_HEADER: "60"})
        assert status == 503 and headers["Retry-After"] == "1"
    token(imds_server.url)
    assert [r.status for r in imds_server.faults.requests] == [503, 503, 200]


def test_drop_closes_without_answer(imds_server: ImdsServer) -> None:
    imds_server.faults.drop_next_n = 1
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        call(imds_server.url, "PUT", "/latest/api/token", {TTL_HEADER: "60"})
    token(imds_server.url)
    assert [r.status for r in imds_server.faults.requests] == [None, 200]
    assert imds_server.faults.count("PUT", "latest/api/token") == 2


def test_token_403_plays_a_disabled_imds(imds_server: ImdsServer) -> None:
    imds_server.faults.token_403 = True
    assert call(imds_server.url, "PUT", "/latest/api/token", {TTL_HEADER: "60"})[0] == 403


def test_delay_and_stop_while_a_request_waits(imds_meta: InstanceMeta) -> None:
    server = ImdsServer(imds_meta).start()
    server.faults.delay_s = 0.3
    started = time.monotonic()
    token(server.url)
    assert time.monotonic() - started >= 0.3
    server.faults.delay_s = 300  # far beyond the bound below, which has room for a busy machine
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            call(server.url, "PUT", "/latest/api/token", {TTL_HEADER: "60"}, timeout=200)
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.2)
    started = time.monotonic()
    server.stop()
    t.join(60)
    assert time.monotonic() - started < 60, "stop() must not wait for a delayed answer"
    assert not t.is_alive() and errors
    assert not [th for th in threading.enumerate() if th.name.startswith("imds-emulator")]


def test_many_instances_on_one_port(imds_meta: InstanceMeta) -> None:
    other = InstanceMeta("i-0second", region="us-west-2", availability_zone="us-west-2c")
    with ImdsEmulator() as emu:
        a, b = emu.add(imds_meta), emu.add(other)
        assert a.endswith("/i-0abc1234def567890") and b.endswith("/i-0second")
        ta, tb = token(a), token(b)
        assert get(a, "/latest/meta-data/instance-id", ta) == (200, b"i-0abc1234def567890")
        assert get(b, "/latest/meta-data/placement/region", tb) == (200, b"us-west-2")
        assert get(b, "/latest/meta-data/instance-id", ta)[0] == 401, "tokens are per instance"
        emu.host("i-0second").faults.fail_next_n = 1
        assert get(b, "/latest/meta-data/instance-id", tb)[0] == 503
        assert get(a, "/latest/meta-data/instance-id", ta)[0] == 200
        assert emu.host("i-0second").faults.count() == 4  # PUT, 200, 401, 503
        assert call(emu.base_url, "PUT", "/i-0nobody/latest/api/token",
                    {TTL_HEADER: "60"})[0] == 404
        emu.remove("i-0second")
        assert get(b, "/latest/meta-data/instance-id", tb)[0] == 404
        assert emu.instance_ids() == ["i-0abc1234def567890"]
