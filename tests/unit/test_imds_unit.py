"""Pure parts of the IMDS client: path rules, the Identity value, the retry policy value."""

from __future__ import annotations

import pytest

from agent.aws.imds import RETRY_STATUSES, Identity, _make_retry, _normalize
from agent.sim.imds import InstanceMeta


@pytest.mark.parametrize(("given", "expected"), [
    ("instance-id", "latest/meta-data/instance-id"),
    ("/placement/region", "latest/meta-data/placement/region"),
    ("latest/user-data", "latest/user-data"),
    ("/latest/dynamic/instance-identity/document", "latest/dynamic/instance-identity/document"),
    ("latest", "latest"),
    ("latestish", "latest/meta-data/latestish"),
])
def test_path_normalization(given: str, expected: str) -> None:
    assert _normalize(given) == expected


def test_identity_is_a_hashable_value_with_the_template_names() -> None:
    ident = Identity("i-1", "ami-1", "t3.micro", "us-east-1", "us-east-1a", "10.0.0.1",
                     "123456789012", tags={"Name": "a"})
    assert hash(ident) == hash(Identity("i-1", "ami-1", "t3.micro", "us-east-1", "us-east-1a",
                                        "10.0.0.1", "123456789012", tags={"Name": "b"}))
    ctx = ident.as_context()
    assert set(ctx) == {"id", "ami", "type", "region", "az", "ip", "tags"}
    ctx["tags"]["Name"] = "changed"
    assert ident.tags == {"Name": "a"}, "the context is a copy"


def test_retry_policy_value() -> None:
    retry, jitters = _make_retry(3, 0.5, 2.0, 0.0)
    assert retry.total == 3 and jitters  # urllib3 >= 2 in the venv
    assert set(retry.status_forcelist) == RETRY_STATUSES == {429, 500, 502, 503, 504}
    assert retry.is_retry("PUT", 503) and retry.is_retry("GET", 429)
    assert not retry.is_retry("GET", 404) and not retry.is_retry("PUT", 403)
    assert not retry.is_retry("POST", 503)
    delays = []
    for _ in range(3):
        retry = retry.increment("GET", "/x", error=ConnectionResetError())
        delays.append(retry.get_backoff_time())
    assert delays == [0.0, 1.0, 2.0]


def test_meta_defaults_are_consistent() -> None:
    meta = InstanceMeta("i-0abc", local_ipv4="10.2.3.4")
    assert meta.hostname == "ip-10-2-3-4.ec2.internal"
    assert meta.mac == InstanceMeta("i-0abc").mac and meta.mac != InstanceMeta("i-0abd").mac
    doc = meta.identity_document()
    assert (doc["instanceId"], doc["privateIp"], doc["pendingTime"]) == (
        "i-0abc", "10.2.3.4", meta.launch_time)
