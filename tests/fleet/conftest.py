"""Fixtures for the chaos suite: a ``FleetCloud`` on the session's moto server, and fleets.

Every fleet a test makes is stopped by the fixture (processes by PID, threads,
proxies), and its timeline is printed, so a failing scenario shows what happened.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sim.fleet import Fleet, FleetCloud
from agent.sim.moto import MotoServer


@pytest.fixture
def fleet_cloud(moto: MotoServer, tmp_path: Path) -> Iterator[FleetCloud]:
    c = FleetCloud(tmp_path / "cloud", moto=moto)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_fleet(fleet_cloud: FleetCloud) -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(**kwargs: Any) -> Fleet:
        f = Fleet(fleet_cloud, **kwargs)
        fleets.append(f)
        return f

    try:
        yield make
    finally:
        for f in fleets:
            try:
                print(f"\n--- timeline ({f.group}) ---\n{f.timeline_text()}")
            finally:
                f.stop()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Print a scenario's numbers (and keep them on the test report)."""

    def emit(**numbers: Any) -> None:
        line = json.dumps(numbers, sort_keys=True, default=str)
        print(f"\nCHAOS {request.node.name}: {line}")
        request.node.user_properties.append(("chaos", line))

    return emit
