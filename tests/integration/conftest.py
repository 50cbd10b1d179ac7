"""Fixtures for tests against the emulators. Each block is owned by one module's author."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# ---- IMDSv2 emulator (agent/sim/imds.py) ------------------------------------------------
from agent.sim.imds import ImdsServer, InstanceMeta


@pytest.fixture
def imds_meta() -> InstanceMeta:
    """A plain emulated instance; tests mutate it freely (it is theirs alone)."""
    return InstanceMeta(
        instance_id="i-0abc1234def567890",
        ami_id="ami-0fixture",
        instance_type="t3.small",
        region="eu-west-1",
        availability_zone="eu-west-1b",
        local_ipv4="10.1.2.3",
        tags={"Name": "web-1", "group": "web"},
        user_data=b"#cloud-config\nec2_agent: {group: web}\n",
    )


@pytest.fixture
def imds_server(imds_meta: InstanceMeta, monkeypatch: pytest.MonkeyPatch) -> Iterator[ImdsServer]:
    """A running emulator for ``imds_meta`` with EC2_AGENT_IMDS_ENDPOINT pointing at it."""
    server = ImdsServer(imds_meta).start()
    monkeypatch.setenv("EC2_AGENT_IMDS_ENDPOINT", server.url)
    try:
        yield server
    finally:
        server.stop()
# ---- end IMDSv2 emulator ----------------------------------------------------------------
