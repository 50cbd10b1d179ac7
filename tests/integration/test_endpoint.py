"""The agent's HTTP endpoint on loopback: /health codes, /metrics, its advertised address."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from agent.host.endpoint import Endpoint, advertised_url


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - loopback
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_health_follows_summary_and_metrics() -> None:
    summary: dict[str, Any] = {"status": "passing", "checks": {}}
    with Endpoint("127.0.0.1", 0, health_fn=lambda: summary) as ep:
        assert ep.port > 0 and ep.url == f"http://127.0.0.1:{ep.port}"
        code, body = get(f"{ep.url}/health")
        assert code == 200 and json.loads(body)["status"] == "passing"
        summary["status"] = "warning"
        assert get(f"{ep.url}/health")[0] == 200
        summary["status"] = "critical"
        assert get(f"{ep.url}/health")[0] == 503
        code, body = get(f"{ep.url}/metrics")
        assert code == 200 and (b"# HELP" in body or b"# TYPE" in body)
        assert get(f"{ep.url}/other")[0] == 404


def test_broken_health_fn_reads_critical() -> None:
    def boom() -> dict:
        raise RuntimeError("bug")

    with Endpoint("127.0.0.1", 0, health_fn=boom, metrics_fn=None) as ep:
        assert get(f"{ep.url}/health")[0] == 503
        assert get(f"{ep.url}/metrics")[0] == 404


def test_stop_frees_the_port() -> None:
    ep = Endpoint("127.0.0.1", 0).start()
    port = ep.port
    ep.stop()
    with Endpoint("127.0.0.1", port) as again:
        assert again.port == port


@pytest.mark.parametrize("bind,ip,expect", [
    ("0.0.0.0", "10.0.0.7", "http://10.0.0.7:8700"),
    ("127.0.0.1", "10.0.0.7", "http://127.0.0.1:8700"),
    ("0.0.0.0", "", "http://127.0.0.1:8700"),
    ("::1", "", "http://[::1]:8700"),
])
def test_advertised_url(bind: str, ip: str, expect: str) -> None:
    assert advertised_url(bind, 8700, ip) == expect
