"""agent/sim/https.py: moto behind real TLS with keep-alive, for measurements over TLS."""

from __future__ import annotations

import logging
from pathlib import Path

import boto3
import botocore.exceptions
import certifi
import pytest
from botocore.config import Config

from agent.aws.store import NotModified, Store
from agent.sim.https import HttpsFront


@pytest.fixture
def front(moto):
    with HttpsFront(moto.url) as f:
        yield f


def _client(front: HttpsFront, verify: str | bool | None = None):
    return boto3.client("s3", region_name="us-east-1", endpoint_url=front.url,
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        verify=front.ca_bundle if verify is None else verify,
                        config=Config(retries={"total_max_attempts": 1}))


def test_s3_through_the_front_keeps_one_connection(front: HttpsFront,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
    c = _client(front)
    c.create_bucket(Bucket="front")
    store = Store("front", "p", client=c)
    big = bytes(range(256)) * 400  # botocore streams it chunked, with a checksum trailer
    for i in range(20):
        etag = store.put(f"k{i}", big)
        obj = store.get(f"k{i}")
        assert obj.body == big and obj.etag == etag and obj.store_now > 0  # moto's Date
        assert isinstance(store.get(f"k{i}", if_none_match=etag), NotModified)  # 304
        assert store.head(f"k{i}").size == len(big)                         # HEAD
    assert store.get_or_none("missing") is None                             # 404 + body
    with pytest.raises(Exception, match="precondition"):
        store.put("k0", b"x", if_match='"not-the-etag"')                   # 412
    assert len(store.list("").entries) == 20
    new = [r for r in caplog.records if "Starting new HTTPS connection" in r.getMessage()]
    assert len(new) == 1, [r.getMessage() for r in new]


def test_the_tls_is_real(front: HttpsFront) -> None:
    with pytest.raises(botocore.exceptions.SSLError):
        _client(front, verify=certifi.where()).list_buckets()  # self-signed: not trusted
    bundle = Path(front.ca_bundle).read_text()
    assert bundle.count("BEGIN CERTIFICATE") == \
        Path(certifi.where()).read_text().count("BEGIN CERTIFICATE") + 1
    assert "Buckets" in _client(front).list_buckets()
