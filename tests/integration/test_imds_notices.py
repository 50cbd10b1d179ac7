"""What IMDS tells an instance before it goes away, through the emulator and the real client.

Also the emulator against Amazon's own IMDS mock, amazon-ec2-metadata-mock (AEMM,
github.com/aws/amazon-ec2-metadata-mock at bdf3096a6413e4e5ba90ea5890224f847f676faa):
its default values and response shapes are transcribed below as expectations, each
with the file it comes from. agent/sim/imds.py's docstring lists what matched, what
differs and why.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.aws.imds import ImdsClient
from agent.clock import FakeClock
from agent.daemon.notices import observe
from agent.departure import parse_maintenance_time
from agent.sim.imds import TTL_HEADER, ImdsServer, InstanceMeta, maintenance_time

from .test_imds_emulator import call, get, token

# -- AEMM, transcribed (values and shapes only) ---------------------------------------------
# pkg/server/httpserver.go: notFoundResponse (http.Error adds the final newline)
AEMM_404 = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n'
    '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
    '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
    '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
    " <head>\n  <title>404 - Not Found</title>\n </head>\n"
    " <body>\n  <h1>404 - Not Found</h1>\n </body>\n</html>\n")
# pkg/server/httpserver.go: BadRequestResponse / UnauthorizedResponse: same page, its
# title and h1 "400 - Bad Request" / "401 - Unauthorized" (indentation differs there).
AEMM_TITLES = {400: "400 - Bad Request", 401: "401 - Unauthorized", 404: "404 - Not Found"}
# pkg/mock/spot/internal/types/types.go: InstanceActionResponse, RebalanceRecommendationResponse
AEMM_SPOT_KEYS = {"action", "time"}
AEMM_REBALANCE_KEYS = {"noticeTime"}
# pkg/mock/events/internal/types/types.go: Event (json names: Go field names, EventId)
AEMM_EVENT_KEYS = {"Code", "Description", "State", "EventId", "NotBefore", "NotAfter",
                   "NotBeforeDeadline"}
# pkg/mock/events/events.go: timeLayout "2 Jan 2006 15:04:05 GMT"; descriptionPrefix
AEMM_EVENT_DESCRIPTION = "The instance is scheduled for "
# pkg/config/defaults/aemm-metadata-default-values.json
AEMM_DEFAULTS = {
    "ami-launch-index": "0",
    "instance-life-cycle": "on-demand",
    "placement/availability-zone": "us-east-1a",
    "placement/availability-zone-id": "use1-az4",
    "placement/region": "us-east-1",
}
# pkg/cmd/spot/spot.go: instance actions; pkg/cmd/events/events.go: codes and states
AEMM_SPOT_ACTIONS = ("terminate", "hibernate", "stop")
AEMM_EVENT_CODES = ("instance-reboot", "system-reboot", "system-maintenance",
                    "instance-retirement", "instance-stop")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server(clock: FakeClock) -> Iterator[ImdsServer]:
    s = ImdsServer(InstanceMeta("i-0notice"), clock=clock).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(server: ImdsServer, clock: FakeClock) -> Iterator[ImdsClient]:
    c = ImdsClient(server.url, clock=clock, retries=0)
    try:
        yield c
    finally:
        c.close()


def aemm_event(code: str, when: dt.datetime) -> dict[str, str]:
    """A scheduled event as AEMM builds one (events.go getMetadata)."""
    return {"Code": code, "Description": AEMM_EVENT_DESCRIPTION + code, "State": "active",
            "EventId": "instance-event-1234567890abcdef0",
            "NotBefore": maintenance_time(when),
            "NotAfter": maintenance_time(when + dt.timedelta(days=7)),
            "NotBeforeDeadline": maintenance_time(when + dt.timedelta(days=9))}


# -- each signal through the emulator and the client -----------------------------------------

def test_quiet_instance_observes_nothing(client: ImdsClient) -> None:
    o = observe(client)
    assert (o.spot_action, o.termination_time, o.lifecycle_state, o.rebalance_time,
            o.maintenance, o.failed) == (None, None, None, None, (), frozenset())
    assert o.notices() == {}


@pytest.mark.parametrize("action", AEMM_SPOT_ACTIONS)
def test_spot_notice_shapes(server: ImdsServer, client: ImdsClient, action: str) -> None:
    server.meta.spot_action = {"action": action, "time": "2026-12-01T12:02:00Z"}
    raw = client.get("spot/instance-action")
    assert set(json.loads(raw)) == AEMM_SPOT_KEYS
    o = observe(client)
    assert (o.spot_action, o.spot_time) == (action, "2026-12-01T12:02:00Z")
    # AWS: termination-time only when the instance is marked for termination
    expect = "2026-12-01T12:02:00Z" if action == "terminate" else None
    assert client.termination_time() == expect == o.termination_time


def test_rebalance_shape(server: ImdsServer, client: ImdsClient) -> None:
    assert client.rebalance() is None
    server.meta.rebalance_time = "2026-12-01T11:58:00Z"
    raw = client.get("events/recommendations/rebalance")
    assert set(json.loads(raw)) == AEMM_REBALANCE_KEYS
    assert observe(client).rebalance_time == "2026-12-01T11:58:00Z"


def test_maintenance_shape(server: ImdsServer, client: ImdsClient) -> None:
    assert client.get("events/maintenance/scheduled") == "[]"
    assert client.get("events/maintenance/") == "history\nscheduled"
    when = dt.datetime(2026, 12, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
    server.meta.maintenance_events = [aemm_event(c, when) for c in AEMM_EVENT_CODES]
    events = client.maintenance_events()
    assert [set(e) for e in events] == [AEMM_EVENT_KEYS] * len(AEMM_EVENT_CODES)
    o = observe(client)
    assert [e.code for e in o.maintenance] == list(AEMM_EVENT_CODES)
    assert o.maintenance[0].not_before == "1 Dec 2026 12:00:00 GMT"
    assert o.maintenance[0].starts_at == when.timestamp()
    # the format AEMM writes with Go's layout parses the same way
    assert parse_maintenance_time("2 Jan 2006 15:04:05 GMT") == dt.datetime(
        2006, 1, 2, 15, 4, 5, tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize("state", ["InService", "Warmed:Running", "Standby", "Detached",
                                   "Terminated"])
def test_lifecycle_state(server: ImdsServer, client: ImdsClient, state: str) -> None:
    server.meta.target_lifecycle_state = state
    assert observe(client).lifecycle_state == state


def test_bad_json_is_a_failed_source_not_a_notice(server: ImdsServer,
                                                  client: ImdsClient) -> None:
    server.meta.rebalance_time = "x"
    server.meta.maintenance_events = [{"Code": "instance-stop"}]
    orig = server.meta.tree

    def broken() -> dict:
        t = orig()
        t["latest"]["meta-data"]["events"]["maintenance"]["scheduled"] = "{not json"
        return t

    server.meta.tree = broken  # type: ignore[method-assign]
    o = observe(client)
    assert "maintenance" in o.failed and o.maintenance == ()
    assert o.rebalance_time == "x"


def test_imds_down_fails_every_source_and_never_raises() -> None:
    c = ImdsClient("http://127.0.0.1:9", retries=0, timeout=0.5)
    o = observe(c)
    assert o.failed == {"spot", "termination-time", "lifecycle", "rebalance", "maintenance"}
    assert len(o.errors) == 5


# -- the rest of the paths named in the issue: defaults against AEMM's ----------------------

def test_new_paths_and_aemm_defaults(client: ImdsClient) -> None:
    got = {p: client.get(p) for p in AEMM_DEFAULTS}
    # Same values, except the AZ id: AZ name -> id is a per-account mapping (AEMM's
    # use1-az4 is one account's); the emulator derives one of the same shape.
    assert {k: v for k, v in got.items() if k != "placement/availability-zone-id"} == {
        k: v for k, v in AEMM_DEFAULTS.items() if k != "placement/availability-zone-id"}
    assert got["placement/availability-zone-id"] == "use1-az1"
    listing = client.get("").split("\n")
    assert {"ami-launch-index", "instance-life-cycle", "events/", "placement/"} <= set(listing)


def test_from_ec2_carries_launch_index_and_life_cycle() -> None:
    meta = InstanceMeta.from_ec2({"InstanceId": "i-1", "AmiLaunchIndex": 2,
                                  "InstanceLifecycle": "spot",
                                  "Placement": {"AvailabilityZone": "eu-west-1b"}}, "eu-west-1")
    tree = meta.tree()["latest"]["meta-data"]
    assert (tree["ami-launch-index"], tree["instance-life-cycle"]) == ("2", "spot")
    assert tree["placement"]["availability-zone-id"] == "euw1-az2"


# -- error bodies and the token path ---------------------------------------------------------

def test_error_bodies_match_aemm(server: ImdsServer) -> None:
    status, body, headers = call(server.url, "GET", "/latest/meta-data/nope",
                                 {"X-aws-ec2-metadata-token": token(server.url)})
    assert status == 404 and body.decode("latin-1") == AEMM_404
    assert headers["Content-Type"] == "text/html"
    status, body = get(server.url, "/latest/meta-data/instance-id", None)
    assert status == 401 and f"<title>{AEMM_TITLES[401]}</title>" in body.decode()
    assert f"<h1>{AEMM_TITLES[401]}</h1>" in body.decode()
    status, body, _ = call(server.url, "PUT", "/latest/api/token", {TTL_HEADER: "0"})
    assert status == 400 and f"<h1>{AEMM_TITLES[400]}</h1>" in body.decode()
    # the same page for every error: only the title and heading change
    assert body.decode().replace("400 - Bad Request", "404 - Not Found") == AEMM_404


def test_get_on_the_token_path(server: ImdsServer) -> None:
    """AEMM answers 200 with an empty body (tokengenerator.go returns without writing for
    a non-PUT); the emulator answers 405, so a GET can never look like an issued token."""
    status, body, _ = call(server.url, "GET", "/latest/api/token", {TTL_HEADER: "60"})
    assert status == 405 and b"405 - Method Not Allowed" in body


# -- the token TTL the server grants ---------------------------------------------------------

def test_client_honours_the_granted_ttl(server: ImdsServer, client: ImdsClient,
                                        clock: FakeClock) -> None:
    server.faults.token_ttl_max = 30  # asked 21600, granted 30 (and said so)
    assert client.get("instance-id") == "i-0notice"
    clock.advance(28)  # 2 s left: less than 10 % of 30 s: refresh before the GET
    assert client.get("instance-id") == "i-0notice"
    assert server.faults.count("PUT", "latest/api/token") == 2
    assert [r.status for r in server.faults.requests if r.method == "GET"] == [200, 200]
    clock.advance(20)  # the new token has 10 s left: still used
    client.get("instance-id")
    assert server.faults.count("PUT", "latest/api/token") == 2
    assert all(r.status == 200 for r in server.faults.requests)


def test_client_without_a_ttl_header_keeps_the_asked_ttl(server: ImdsServer,
                                                         clock: FakeClock) -> None:
    c = ImdsClient(server.url, clock=clock, retries=0, token_ttl=100)
    c.get("instance-id")
    clock.advance(80)
    c.get("instance-id")
    assert server.faults.count("PUT", "latest/api/token") == 1


# -- disagreeing sources ---------------------------------------------------------------------

def test_identity_document_is_authoritative(server: ImdsServer, client: ImdsClient) -> None:
    ident = client.identity()
    assert ident.disagreements == ()
    server.meta.document_overrides = {"availabilityZone": "us-east-1b",
                                      "privateIp": "10.9.9.9"}
    ident = client.identity()
    assert (ident.availability_zone, ident.local_ipv4) == ("us-east-1b", "10.9.9.9")
    assert len(ident.disagreements) == 2
    assert "placement/availability-zone says 'us-east-1a'" in ident.disagreements[1]
    assert "local-ipv4 says '10.0.0.10'" in ident.disagreements[0]


def test_document_without_private_ip_falls_back_to_local_ipv4(server: ImdsServer,
                                                              client: ImdsClient) -> None:
    server.meta.document_overrides = {"privateIp": None}
    ident = client.identity()
    assert ident.local_ipv4 == "10.0.0.10" and ident.disagreements == ()


def test_boot_uses_the_document_and_degrades_on_disagreement(imds_server: ImdsServer,
                                                             root: Path) -> None:
    from agent.boot.run import phase_identity, run_boot
    from agent.bootctx import Phase
    from agent.paths import Paths

    only_identity = [Phase("identity", phase_identity)]
    imds_server.meta.document_overrides = {"availabilityZone": "eu-west-1c"}
    st = run_boot(Paths.from_env(), phases=only_identity)
    assert st["status"] == "degraded"
    assert st["identity"]["az"] == "eu-west-1c"
    assert st["phases"][0]["status"] == "degraded"
    assert "placement/availability-zone says 'eu-west-1b'" in st["phases"][0]["detail"]
    imds_server.meta.document_overrides = {}
    assert run_boot(Paths.from_env(), phases=only_identity)["status"] == "done"
