"""Fixtures shared by every test.

Safety first: before any test runs, the environment points every AWS client at
loopback with fake credentials, and IMDS at a closed loopback port, so no test
can reach AWS or the real metadata address even by mistake. `make test` additionally runs
the suite in a network namespace with only `lo` up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from agent.sim.cloud import EmbeddedCloud, SimInstance
from agent.sim.moto import FAKE_CREDENTIALS, MotoServer

# Property tests judge properties, not speed: hypothesis' default 200 ms per example and its
# "data generation too slow" check turn a busy machine into red builds (issue #16).
settings.register_profile("ec2-agent", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ec2-agent")

# A closed loopback port: anything that forgets to configure an endpoint fails fast, locally.
CLOSED = "http://127.0.0.1:9"

SAFE_ENV = {
    **FAKE_CREDENTIALS,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ENDPOINT_URL": CLOSED,
    "EC2_AGENT_IMDS_ENDPOINT": CLOSED,
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    "AWS_RETRY_MODE": "standard",
    "AWS_MAX_ATTEMPTS": "2",
    "NO_PROXY": "*",
}
for _k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
           "https_proxy", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
    os.environ.pop(_k, None)
os.environ.update(SAFE_ENV)


@pytest.fixture(autouse=True)
def safe_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test: fake credentials, loopback endpoints, and its own EC2_AGENT_ROOT."""
    for k, v in SAFE_ENV.items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("EC2_AGENT_ROOT", str(root))
    return root


@pytest.fixture(autouse=True)
def no_lean_data_leak() -> Iterator[None]:
    """An in-process boot or daemon attaches the lean botocore data (``agent.aws.botodata``) to
    this process's one boto3 session (``agent.aws.session``); later tests that seed moto through
    ``agent.aws.session`` (``put_parameter``...) then found no such operation, depending on which
    tests an xdist worker happened to run before them. Start the next test afresh."""
    yield
    from agent.aws import session as aws

    if aws._data_path is not None:
        with aws._lock:
            aws._session_obj = None
            aws._data_path = None


@pytest.fixture(scope="session")
def moto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One moto_server per test session (per xdist worker), stopped by its PID."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = MotoServer(log_path=str(log))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moto(moto_session: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    """The session's moto server, reset to empty, with AWS_ENDPOINT_URL pointing at it."""
    moto_session.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_session.url)
    return moto_session


@pytest.fixture
def root(safe_env: Path) -> Path:
    """This test's EC2_AGENT_ROOT."""
    return safe_env


@pytest.fixture
def cloud(moto, tmp_path: Path) -> Iterator[EmbeddedCloud]:
    """The embedded cloud on the session's (reset) moto server, with its own IMDS emulator."""
    c = EmbeddedCloud(tmp_path / "cloud", moto=moto)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def instance(cloud: EmbeddedCloud, monkeypatch: pytest.MonkeyPatch) -> SimInstance:
    """One instance of group 'web' in moto, served by the IMDS emulator, as *this* process.

    EC2_AGENT_ROOT and EC2_AGENT_IMDS_ENDPOINT point at it, so in-process calls
    (run_boot, cli.main) act as that instance.
    """
    iid = cloud.run_standalone("web", 1)[0]
    inst = cloud.instances[iid]
    for k, v in inst.env(cloud).items():
        if k.startswith(("AWS_", "EC2_AGENT_")):
            monkeypatch.setenv(k, v)
    return inst


# ---- realboot (#14): print the real-boot figures in the summary (xdist passes
# user_properties from the workers to this process).
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "realboot":
                terminalreporter.write_line(f"realboot: {value}")
