"""The IMDSv2 client against the real emulator on loopback: tokens, retries, deadlines."""

from __future__ import annotations

import threading
import time
from typing import Any

import boto3
import pytest
from urllib3.exceptions import ProtocolError, ReadTimeoutError

from agent.aws.imds import DEFAULT_ENDPOINT, Identity, ImdsClient
from agent.clock import Deadline, FakeClock
from agent.errors import DeadlineExceeded, ImdsDisabled, ImdsError, ImdsUnavailable
from agent.sim.imds import ImdsEmulator, ImdsServer, InstanceMeta, meta_for_instance
from agent.sim.moto import MotoServer
from agent.sim.netutil import free_port

TOKEN = "latest/api/token"


def fast(url: str, **kw: Any) -> ImdsClient:
    """A client whose backoff is short, so retry tests stay quick."""
    kw.setdefault("backoff_factor", 0.01)
    kw.setdefault("backoff_jitter", 0.0)
    return ImdsClient(url, **kw)


def statuses(server: ImdsServer) -> list[tuple[str, int | None]]:
    return [(r.method, r.status) for r in server.faults.requests]


# -- reading ------------------------------------------------------------------------------

def test_identity_from_the_environment_endpoint(imds_server: ImdsServer) -> None:
    client = ImdsClient()
    assert client.endpoint == imds_server.url
    ident = client.identity()
    assert ident == Identity(
        instance_id="i-0abc1234def567890", ami_id="ami-0fixture", instance_type="t3.small",
        region="eu-west-1", availability_zone="eu-west-1b", local_ipv4="10.1.2.3",
        account_id="123456789012", pending_time=imds_server.meta.launch_time,
        architecture="x86_64", tags={"Name": "web-1", "group": "web"})
    assert ident.as_context() == {
        "id": "i-0abc1234def567890", "ami": "ami-0fixture", "type": "t3.small",
        "region": "eu-west-1", "az": "eu-west-1b", "ip": "10.1.2.3",
        "tags": {"Name": "web-1", "group": "web"}}
    # one token for everything
    assert imds_server.faults.count("PUT", TOKEN) == 1


def test_default_endpoint_is_the_link_local_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EC2_AGENT_IMDS_ENDPOINT")
    assert ImdsClient().endpoint == DEFAULT_ENDPOINT  # constructed only; nothing is sent


@pytest.mark.parametrize("bad", ["ftp://127.0.0.1/", "not a url", "http://"])
def test_bad_endpoint_is_refused(bad: str) -> None:
    with pytest.raises(ImdsError):
        ImdsClient(bad)


def test_paths_user_data_and_optional_404(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url)
    assert client.get("instance-id") == "i-0abc1234def567890"
    assert client.get("/latest/meta-data/placement/region") == "eu-west-1"
    assert client.user_data() == b"#cloud-config\nec2_agent: {group: web}\n"
    assert client.get("no/such/path", optional=True) is None
    with pytest.raises(ImdsError, match="latest/meta-data/no/such/path"):
        client.get("no/such/path")
    assert client.spot_action() is None
    assert client.target_lifecycle_state() is None
    imds_server.meta.user_data = None
    assert client.user_data() is None
    assert imds_server.faults.count("GET", "latest/meta-data/no/such/path") == 2, "404 not retried"


def test_runtime_flips_are_seen(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url)
    assert client.spot_action() is None
    imds_server.meta.spot_action = {"action": "stop", "time": "2030-01-01T00:00:00Z"}
    imds_server.meta.target_lifecycle_state = "Terminated"
    assert client.spot_action() == {"action": "stop", "time": "2030-01-01T00:00:00Z"}
    assert client.target_lifecycle_state() == "Terminated"


def test_tags_not_exposed_means_no_tags(imds_server: ImdsServer) -> None:
    imds_server.meta.tags_exposed = False
    assert ImdsClient(imds_server.url).identity().tags == {}


def test_tag_keys_needing_quoting(imds_server: ImdsServer) -> None:
    imds_server.meta.tags = {"Cost Center": "a b", "k:v=1": "x", "ünï": "ç"}
    assert ImdsClient(imds_server.url).tags() == imds_server.meta.tags


# -- tokens -------------------------------------------------------------------------------

def test_token_is_refreshed_before_expiry_on_the_client_clock(imds_meta: InstanceMeta) -> None:
    clock = FakeClock()  # shared: the server expires tokens on the same (fake) time
    with ImdsServer(imds_meta, clock=clock) as server:
        client = ImdsClient(server.url, token_ttl=100, clock=clock)
        client.get("instance-id")
        clock.advance(89)  # 11 s left > min(60, 10 % of 100): still good
        client.get("instance-id")
        assert server.faults.count("PUT", TOKEN) == 1
        clock.advance(2)  # 9 s left: refresh before use
        client.get("instance-id")
        assert server.faults.count("PUT", TOKEN) == 2
        clock.advance(95)  # the first token is long dead, the second about to be
        client.get("instance-id")
        assert server.faults.count("PUT", TOKEN) == 3
        assert 401 not in [r.status for r in server.faults.requests]


def test_token_refreshed_once_after_a_401(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url)
    client.get("instance-id")
    imds_server.revoke_tokens()  # as if IMDS restarted: the cached token is now unknown
    assert client.get("ami-id") == "ami-0fixture"
    assert statuses(imds_server) == [("PUT", 200), ("GET", 200), ("GET", 401), ("PUT", 200),
                                     ("GET", 200)]


def test_expired_token_in_real_time_is_replaced(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url, token_ttl=1)
    client.get("instance-id")
    time.sleep(1.05)
    assert client.get("instance-id") == "i-0abc1234def567890"
    assert 401 not in [r.status for r in imds_server.faults.requests]
    assert imds_server.faults.count("PUT", TOKEN) == 2


def test_threads_share_one_token(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url)
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda: results.append(client.get("instance-id")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["i-0abc1234def567890"] * 8
    assert imds_server.faults.count("PUT", TOKEN) == 1


def test_403_on_token_is_disabled_at_once(imds_server: ImdsServer) -> None:
    imds_server.faults.token_403 = True
    with pytest.raises(ImdsDisabled, match="403"):
        ImdsClient(imds_server.url).get("instance-id")
    assert statuses(imds_server) == [("PUT", 403)]  # at once: no retry, whatever the clock


@pytest.mark.parametrize("ttl", [0, 21601])
def test_client_refuses_an_invalid_ttl(ttl: int) -> None:
    with pytest.raises(ImdsError, match="TTL"):
        ImdsClient("http://127.0.0.1:9", token_ttl=ttl)


# -- retries ------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_server_errors_then_success(imds_server: ImdsServer, status: int) -> None:
    imds_server.faults.fail_next_n = 3
    imds_server.faults.error_status = status
    assert fast(imds_server.url).get("instance-id") == "i-0abc1234def567890"
    assert statuses(imds_server) == [("PUT", status)] * 3 + [("PUT", 200), ("GET", 200)]


def test_backoff_is_exponential_on_the_injected_clock(imds_server: ImdsServer) -> None:
    clock = FakeClock()
    imds_server.faults.fail_next_n = 4
    client = ImdsClient(imds_server.url, clock=clock, backoff_factor=0.5, backoff_jitter=0.0)
    client.get("instance-id")
    # urllib3's Retry: no wait before the first retry, then factor * 2**(n-1), capped at 2 s
    assert clock.slept == [0.0, 1.0, 2.0, 2.0]


def test_retry_after_is_respected(imds_server: ImdsServer) -> None:
    clock = FakeClock()
    imds_server.faults.fail_next_n = 1
    imds_server.faults.error_status = 503
    imds_server.faults.retry_after = "3"
    ImdsClient(imds_server.url, clock=clock).get("instance-id")
    assert clock.slept == [3.0]


def test_retry_after_beyond_the_deadline_fails_now(imds_server: ImdsServer) -> None:
    imds_server.faults.fail_next_n = 1
    imds_server.faults.retry_after = "30"
    # A fake clock: "fails now" is "never sleeps", not "within a second of wall time",
    # which a busy machine may not give (issue #16).
    clock = FakeClock()
    client = ImdsClient(imds_server.url, deadline=Deadline.after(2.0, "identity", clock),
                        retry_after_max=60, clock=clock)
    with pytest.raises(DeadlineExceeded, match="identity deadline exceeded.*latest/api/token"):
        client.get("instance-id")
    assert clock.slept == []
    assert imds_server.faults.count("PUT", TOKEN) == 1


def test_retries_exhausted_is_unavailable_with_cause(imds_server: ImdsServer) -> None:
    imds_server.faults.fail_next_n = 100
    with pytest.raises(ImdsUnavailable, match="latest/api/token") as info:
        fast(imds_server.url, retries=2).get("instance-id")
    assert isinstance(info.value.__cause__, ImdsUnavailable)
    assert "503" in str(info.value.__cause__)
    assert imds_server.faults.count() == 3


def test_get_retries_too_not_only_the_token(imds_server: ImdsServer) -> None:
    client = fast(imds_server.url)
    client.get("instance-id")
    imds_server.faults.fail_next_n = 2
    imds_server.faults.error_status = 500
    assert client.get("ami-id") == "ami-0fixture"
    assert statuses(imds_server)[1:] == [("GET", 200), ("GET", 500), ("GET", 500), ("GET", 200)]


def test_dropped_connections_then_success(imds_server: ImdsServer) -> None:
    imds_server.faults.drop_next_n = 3
    assert fast(imds_server.url).get("instance-id") == "i-0abc1234def567890"
    assert statuses(imds_server) == [("PUT", None)] * 3 + [("PUT", 200), ("GET", 200)]


def test_dropped_forever_is_unavailable(imds_server: ImdsServer) -> None:
    imds_server.faults.drop_next_n = 100
    with pytest.raises(ImdsUnavailable) as info:
        fast(imds_server.url, retries=1).get("instance-id")
    assert isinstance(info.value.__cause__, ProtocolError)


def test_nothing_listening_is_unavailable_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    clock = FakeClock()
    with pytest.raises(ImdsUnavailable, match="no answer") as info:
        fast(url, retries=2, clock=clock).get("instance-id")
    # Quickly: two short backoff sleeps and nothing else (counted, not timed: issue #16).
    assert len(clock.slept) == 2 and sum(clock.slept) < 1.0, clock.slept
    assert info.value.__cause__ is not None


# -- deadlines ----------------------------------------------------------------------------

def test_slow_answers_fail_within_the_deadline(imds_server: ImdsServer) -> None:
    # The answer (60 s) and the per-call timeout (120 s) are far beyond the 1 s deadline, so
    # "gave up at the deadline" is told apart from "waited" with room for a busy machine.
    imds_server.faults.delay_s = 60.0
    client = ImdsClient(imds_server.url, timeout=120.0, deadline=Deadline.after(1.0, "boot"))
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="boot deadline exceeded") as info:
        client.get("instance-id")
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"took {elapsed:.2f}s with a 1 s deadline"
    assert isinstance(info.value.__cause__, ReadTimeoutError)


def test_slow_then_fast_recovers_within_the_deadline(imds_server: ImdsServer) -> None:
    imds_server.faults.delay_s = 3.0
    # Per-attempt timeout and deadline with room for a busy machine (issue #16): an attempt
    # against the healed emulator must not time out, and the deadline must outlast the heal.
    client = ImdsClient(imds_server.url, timeout=1.0, deadline=Deadline.after(60.0))

    def heal() -> None:
        time.sleep(0.5)
        imds_server.faults.delay_s = 0.0

    t = threading.Thread(target=heal)
    t.start()
    try:
        assert client.get("instance-id") == "i-0abc1234def567890"
    finally:
        t.join()


def test_expired_deadline_sends_nothing(imds_server: ImdsServer) -> None:
    clock = FakeClock()
    deadline = Deadline.after(1.0, "identity", clock=clock)
    clock.advance(2)
    with pytest.raises(DeadlineExceeded, match="identity"):
        ImdsClient(imds_server.url, deadline=deadline).get("instance-id")
    assert imds_server.faults.count() == 0


def test_with_deadline_shares_the_token(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url)
    client.get("instance-id")
    phase = client.with_deadline(Deadline.after(5.0, "userdata"))
    assert phase.deadline is not None and client.deadline is None
    assert phase.user_data() is not None
    assert imds_server.faults.count("PUT", TOKEN) == 1


# -- several instances on one port ---------------------------------------------------------

def test_path_prefix_multi_instance(imds_meta: InstanceMeta) -> None:
    other = InstanceMeta("i-0other", ami_id="ami-other", region="us-west-2",
                         availability_zone="us-west-2a", local_ipv4="10.9.9.9",
                         tags={"Name": "db"})
    with ImdsEmulator() as emu:
        a = ImdsClient(emu.add(imds_meta))
        b = ImdsClient(emu.add(other) + "/")  # a trailing slash is fine too
        assert a.identity().instance_id == "i-0abc1234def567890"
        ib = b.identity()
        assert (ib.instance_id, ib.region, ib.local_ipv4, ib.tags) == (
            "i-0other", "us-west-2", "10.9.9.9", {"Name": "db"})
        emu.host("i-0other").faults.token_403 = True
        assert a.get("ami-id") == "ami-0fixture"
        emu.remove("i-0other")
        with pytest.raises(ImdsError, match="404"):
            b.get("ami-id")


# -- identity matches an instance launched in moto -----------------------------------------

def test_identity_matches_a_moto_instance(moto: MotoServer) -> None:
    region = "us-east-1"
    ec2 = boto3.client("ec2", region_name=region, endpoint_url=moto.url)
    image_id = ec2.describe_images()["Images"][0]["ImageId"]
    user_data = "#cloud-config\nec2_agent:\n  group: web\n"
    run = ec2.run_instances(
        ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.micro",
        UserData=user_data,
        TagSpecifications=[{"ResourceType": "instance",
                            "Tags": [{"Key": "Name", "Value": "web-1"},
                                     {"Key": "group", "Value": "web"}]}])
    instance_id = run["Instances"][0]["InstanceId"]
    described = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0][
        "Instances"][0]

    meta = meta_for_instance(ec2, instance_id)
    assert meta == InstanceMeta.from_ec2(described, region, user_data.encode())
    with ImdsServer(meta) as server:
        client = ImdsClient(server.url)
        ident = client.identity()
        assert ident.instance_id == described["InstanceId"]
        assert ident.ami_id == described["ImageId"] == image_id
        assert ident.instance_type == described["InstanceType"]
        assert ident.availability_zone == described["Placement"]["AvailabilityZone"]
        assert ident.region == region
        assert ident.local_ipv4 == described["PrivateIpAddress"]
        assert ident.tags == {t["Key"]: t["Value"] for t in described["Tags"]}
        assert client.get("local-hostname") == described["PrivateDnsName"]
        assert client.user_data() == user_data.encode()
