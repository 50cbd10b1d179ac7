"""Referee: botocore's own IMDS fetchers, not ours, must be satisfied by the emulator.

If they read credentials and the region from it, the emulator speaks IMDSv2 the
way real clients expect (token PUT header, trailing-slash paths, credential JSON),
and instances in ``ec2-agent simulate`` get working credentials from it.
"""

from __future__ import annotations

import pytest
from botocore.session import Session
from botocore.utils import (
    METADATA_BASE_URL,
    InstanceMetadataFetcher,
    InstanceMetadataRegionFetcher,
)

from agent.sim.imds import ImdsEmulator, ImdsServer, InstanceMeta
from agent.sim.netutil import LOOPBACK


@pytest.fixture(autouse=True)
def imds_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest disables botocore's IMDS; these tests need it (against loopback only)."""
    monkeypatch.delenv("AWS_EC2_METADATA_DISABLED", raising=False)


def loopback(fetcher: InstanceMetadataFetcher | InstanceMetadataRegionFetcher) -> None:
    assert fetcher.get_base_url().startswith(f"http://{LOOPBACK}:"), fetcher.get_base_url()


def test_credentials_via_base_url(imds_server: ImdsServer) -> None:
    fetcher = InstanceMetadataFetcher(timeout=10, num_attempts=2, base_url=imds_server.url)
    loopback(fetcher)
    creds = fetcher.retrieve_iam_role_credentials()
    assert creds["role_name"] == "ec2-agent-sim"
    assert (creds["access_key"], creds["secret_key"], creds["token"]) == (
        "testing", "testing", "testing")
    assert creds["expiry_time"]
    assert imds_server.faults.count("PUT", "latest/api/token") == 1
    assert all(r.had_token for r in imds_server.faults.requests if r.method == "GET")


def test_credentials_via_config_endpoint(imds_server: ImdsServer) -> None:
    fetcher = InstanceMetadataFetcher(
        timeout=10, num_attempts=2, base_url=METADATA_BASE_URL,
        config={"ec2_metadata_service_endpoint": imds_server.url})
    loopback(fetcher)
    assert fetcher.retrieve_iam_role_credentials()["access_key"] == "testing"


def test_region(imds_server: ImdsServer) -> None:
    fetcher = InstanceMetadataRegionFetcher(timeout=10, num_attempts=2, base_url=imds_server.url)
    loopback(fetcher)
    assert fetcher.retrieve_region() == imds_server.meta.region == "eu-west-1"


def test_botocore_rides_out_one_failure(imds_server: ImdsServer) -> None:
    imds_server.faults.fail_next_n = 1  # the token PUT answers 500 once
    imds_server.faults.error_status = 500
    fetcher = InstanceMetadataFetcher(timeout=10, num_attempts=2, base_url=imds_server.url)
    assert fetcher.retrieve_iam_role_credentials()["access_key"] == "testing"
    assert [(r.method, r.status) for r in imds_server.faults.requests] == [
        ("PUT", 500), ("PUT", 200), ("GET", 200), ("GET", 200)]


def test_prefixed_endpoint_in_multi_instance_mode(imds_meta: InstanceMeta) -> None:
    other = InstanceMeta("i-0other", region="ap-southeast-2",
                         availability_zone="ap-southeast-2b", iam_role="db-role")
    with ImdsEmulator() as emu:
        emu.add(imds_meta)
        url = emu.add(other)
        creds = InstanceMetadataFetcher(timeout=10, num_attempts=2,
                                        base_url=url).retrieve_iam_role_credentials()
        assert creds["role_name"] == "db-role"
        region = InstanceMetadataRegionFetcher(timeout=10, num_attempts=2,
                                               base_url=url).retrieve_region()
        assert region == "ap-southeast-2"


def test_the_whole_credential_chain(imds_server: ImdsServer,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No env credentials: botocore's default chain ends at IMDS (the emulator)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds_server.url)
    # botocore's default is one attempt with a 1 s timeout: too little for a busy machine.
    monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "10")
    creds = Session().get_credentials()
    assert creds is not None and creds.method == "iam-role"
    frozen = creds.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key, frozen.token) == ("testing",) * 3
