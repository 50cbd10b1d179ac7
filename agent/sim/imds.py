"""An IMDSv2 emulator on loopback: token PUT with TTL, 401 without a token, faults.

Why it exists: the agent's first boot phase reads its identity from IMDS, and the
failure modes that matter (IMDS disabled, 5xx storms, dropped connections, answers
slower than the boot deadline, expired tokens) cannot be produced by AWS on demand.
This emulator produces them on 127.0.0.1, with an identity that matches an
instance launched in the moto server, so tests and ``ec2-agent simulate`` exercise
the real client against a real HTTP server, never a mock.

Stdlib only (it ships in the package). Two shapes:

* ``ImdsServer(meta)``: one instance on its own port, ``url`` is the endpoint.
* ``ImdsEmulator()``: many instances on one port, each under a path prefix:
  ``emulator.add(meta)`` returns ``http://127.0.0.1:P/<instance-id>``.

Each hosted instance has its own tokens, its own ``Faults`` and a request log.
Token expiry is judged on the server's own monotonic clock (injectable, so a test
can expire tokens without sleeping). Everything is mutable at runtime: a test sets
``server.meta.spot_action`` or ``server.faults.fail_next_n`` while a client runs.

Notices an instance gets before it goes away: ``spot_action`` (spot/instance-action,
plus spot/termination-time for ``terminate``), ``rebalance_time``
(events/recommendations/rebalance), ``maintenance_events``
(events/maintenance/scheduled, ``[]`` when none), ``target_lifecycle_state``.

Compared with Amazon's own IMDS mock, amazon-ec2-metadata-mock (AEMM; expectations
transcribed in tests/integration/test_imds_notices.py with the file each comes from):

* Same: the JSON keys of spot/instance-action (action, time), of the rebalance
  recommendation (noticeTime) and of scheduled events (Code, Description, State,
  EventId, NotBefore, NotAfter, NotBeforeDeadline) with their time format
  ("2 Jan 2006 15:04:05 GMT"); the spot actions and event codes; the defaults of
  ami-launch-index (0), instance-life-cycle (on-demand), placement/region and
  availability-zone; the 404 page byte for byte, the 400/401 pages' title and
  heading; a token TTL outside 1..21600 is 400; the granted TTL is echoed.
* Different, on purpose: placement/availability-zone-id is derived from the AZ
  (``use1-az1`` for us-east-1a; AEMM's ``use1-az4`` is one account's mapping, which
  is per account). spot/termination-time is served only with a ``terminate`` notice
  (as AWS documents it; AEMM serves it for every action). A GET on the token path is
  405 here; AEMM answers 200 with an empty body (its handler returns without writing
  for a non-PUT), which a client could take for an issued empty token. Error pages
  are ``text/html`` (AEMM's ``http.Error`` sends ``text/plain; charset=utf-8``) and use
  one template (AEMM's 400/401 constants differ from its 404 in indentation and
  encoding declaration). JSON documents are compact for the spot and rebalance
  notices, AEMM's are tab-indented (clients parse them, so the shape is what matters).
  Scheduled events are ``[]`` when there are none (AEMM serves the path only in its
  ``events`` mode). Delays/trigger times are not emulated: tests set and clear
  notices at runtime instead.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Union
from urllib.parse import unquote, urlsplit

from agent.clock import SYSTEM_CLOCK, Clock
from agent.sim.netutil import LOOPBACK

TOKEN_PATH = "latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600
DEFAULT_ROLE = "ec2-agent-sim"
DEFAULT_ACCOUNT = "123456789012"
# The metadata versions EC2 lists at ``GET /`` (all served from the one tree, as EC2 does
# for the paths they share). cloud-init probes 2021-03-23, 2018-09-24, 2016-09-02, then
# its minimum 2009-04-04; botocore and the agent use ``latest``.
API_VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
    "2008-02-01", "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12",
    "2014-02-25", "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02",
    "2018-03-28", "2018-08-17", "2018-09-24", "2019-10-01", "2020-10-27", "2021-01-03",
    "2021-03-23", "2021-07-15", "2022-09-24",
)
# HttpTokens of ModifyInstanceMetadataOptions: "required" (IMDSv2 only, the default here,
# as the agent's images are launched) or "optional" (IMDSv1 reads without a token work
# too; a token that is sent must still be valid).
HTTP_TOKENS = ("required", "optional")

# IMDS's error pages (status -> title); see error_page().
ERROR_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                405: "Method Not Allowed"}


def error_page(status: int) -> bytes:
    """The XHTML page IMDS sends with an error status (the shape AWS serves)."""
    title = f"{status} - {ERROR_TITLES[status]}"
    return (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{title}</title>\n </head>\n"
        f" <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    ).encode("latin-1")


# A metadata tree: directories are dicts, leaves are text or bytes.
Tree = dict[str, Union["Tree", str, bytes]]


def _utc_iso(when: _dt.datetime | None = None) -> str:
    when = when or _dt.datetime.now(_dt.timezone.utc)
    if when.tzinfo is not None:
        when = when.astimezone(_dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _default_mac(instance_id: str) -> str:
    """A stable, locally administered MAC derived from the instance id."""
    digest = hashlib.sha1(instance_id.encode()).digest()[:5]
    return "0e:" + ":".join(f"{b:02x}" for b in digest)


def _default_az_id(region: str, az: str) -> str:
    """An AZ id in AWS's shape (``use1-az4``): region initials + number, then the zone index.

    Real ids map to names per account; only the shape matters here.
    """
    parts = region.split("-")
    middle = "".join(parts[1:-1])
    for word, initial in (("north", "n"), ("south", "s"), ("east", "e"), ("west", "w"),
                          ("central", "c")):
        middle = middle.replace(word, initial)
    letter = az[len(region):] or "a"
    return f"{parts[0]}{middle}{parts[-1]}-az{ord(letter[0]) - ord('a') + 1}"


def maintenance_time(when: _dt.datetime) -> str:
    """A time as IMDS writes it in scheduled events: ``21 Jan 2019 09:00:43 GMT``."""
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    w = when.astimezone(_dt.timezone.utc)
    return f"{w.day} {months[w.month - 1]} {w.year} {w:%H:%M:%S} GMT"


def fake_credentials() -> dict[str, str]:
    """Role credentials as IMDS serves them; fake, and valid for six hours of wall time."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return {
        "Code": "Success",
        "LastUpdated": _utc_iso(now),
        "Type": "AWS-HMAC",
        "AccessKeyId": "testing",
        "SecretAccessKey": "testing",
        "Token": "testing",
        "Expiration": _utc_iso(now + _dt.timedelta(hours=6)),
    }


@dataclass
class InstanceMeta:
    """What one emulated instance's IMDS reveals. Mutable: tests flip fields at runtime."""

    instance_id: str
    ami_id: str = "ami-12c6146b"
    instance_type: str = "t3.micro"
    region: str = "us-east-1"
    availability_zone: str = "us-east-1a"
    local_ipv4: str = "10.0.0.10"
    account_id: str = DEFAULT_ACCOUNT
    tags: dict[str, str] = field(default_factory=dict)
    user_data: bytes | None = None
    launch_time: str = field(default_factory=_utc_iso)
    hostname: str = ""
    mac: str = ""
    architecture: str = "x86_64"
    spot_action: dict[str, Any] | None = None
    target_lifecycle_state: str | None = None
    iam_role: str | None = DEFAULT_ROLE
    # False plays an instance launched without InstanceMetadataTags: tags/instance is 404.
    tags_exposed: bool = True
    # -- what an instance is told before it goes away (docs/operations.md) --
    # events/recommendations/rebalance: {"noticeTime": rebalance_time} while set.
    rebalance_time: str | None = None
    # events/maintenance/scheduled: these events (IMDS keys: Code, Description, EventId,
    # NotBefore, NotAfter, NotBeforeDeadline, State); "[]" when there are none.
    maintenance_events: list[dict[str, str]] = field(default_factory=list)
    availability_zone_id: str = ""
    ami_launch_index: int = 0
    instance_life_cycle: str = "on-demand"  # on-demand | spot | scheduled | capacity-block
    # Keys that the identity document says differently from the meta-data paths: plays
    # an IMDS whose sources disagree (the agent must use one, and say so).
    document_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.hostname:
            self.hostname = f"ip-{self.local_ipv4.replace('.', '-')}.ec2.internal"
        if not self.mac:
            self.mac = _default_mac(self.instance_id)
        if not self.availability_zone_id:
            self.availability_zone_id = _default_az_id(self.region, self.availability_zone)

    @classmethod
    def from_ec2(
        cls, instance: dict[str, Any], region: str, user_data: bytes | None = None
    ) -> InstanceMeta:
        """Build from one ``describe_instances`` Instance dict, so identity matches moto's."""
        enis = instance.get("NetworkInterfaces") or []
        eni = enis[0] if enis else {}
        launch = instance.get("LaunchTime")
        launch_time = _utc_iso(launch) if isinstance(launch, _dt.datetime) else str(
            launch or _utc_iso())
        profile = (instance.get("IamInstanceProfile") or {}).get("Arn", "")
        role = profile.rsplit("/", 1)[-1] if profile else DEFAULT_ROLE
        return cls(
            instance_id=instance["InstanceId"],
            ami_id=instance.get("ImageId", ""),
            instance_type=instance.get("InstanceType", ""),
            region=region,
            availability_zone=(instance.get("Placement") or {}).get(
                "AvailabilityZone", f"{region}a"),
            local_ipv4=instance.get("PrivateIpAddress", "") or "10.0.0.10",
            account_id=eni.get("OwnerId") or DEFAULT_ACCOUNT,
            tags={t["Key"]: t["Value"] for t in instance.get("Tags") or []},
            user_data=user_data,
            launch_time=launch_time,
            hostname=instance.get("PrivateDnsName", ""),
            mac=eni.get("MacAddress", ""),
            architecture=instance.get("Architecture") or "x86_64",
            iam_role=role,
            ami_launch_index=int(instance.get("AmiLaunchIndex") or 0),
            instance_life_cycle=str(instance.get("InstanceLifecycle") or "on-demand"),
        )

    def identity_document(self) -> dict[str, Any]:
        """The JSON AWS serves at /latest/dynamic/instance-identity/document."""
        return {
            "accountId": self.account_id,
            "architecture": self.architecture,
            "availabilityZone": self.availability_zone,
            "billingProducts": None,
            "devpayProductCodes": None,
            "marketplaceProductCodes": None,
            "imageId": self.ami_id,
            "instanceId": self.instance_id,
            "instanceType": self.instance_type,
            "kernelId": None,
            "pendingTime": self.launch_time,
            "privateIp": self.local_ipv4,
            "ramdiskId": None,
            "region": self.region,
            "version": "2017-09-30",
        } | dict(self.document_overrides)

    def _events(self) -> Tree:
        events: Tree = {"maintenance": {
            "history": "[]",
            "scheduled": json.dumps(list(self.maintenance_events), indent=2),
        }}
        if self.rebalance_time is not None:
            events["recommendations"] = {
                "rebalance": json.dumps({"noticeTime": self.rebalance_time})}
        return events

    def tree(self) -> Tree:
        """The whole metadata tree as served now (rebuilt per request: meta is mutable)."""
        meta: Tree = {
            "ami-id": self.ami_id,
            "ami-launch-index": str(self.ami_launch_index),
            "hostname": self.hostname,
            "instance-id": self.instance_id,
            "instance-life-cycle": self.instance_life_cycle,
            "instance-type": self.instance_type,
            "local-hostname": self.hostname,
            "local-ipv4": self.local_ipv4,
            "mac": self.mac,
            "placement": {
                "availability-zone": self.availability_zone,
                "availability-zone-id": self.availability_zone_id,
                "region": self.region,
            },
            "events": self._events(),
        }
        if self.tags_exposed:
            meta["tags"] = {"instance": dict(self.tags)}
        if self.spot_action is not None:
            spot: Tree = {"instance-action": json.dumps(self.spot_action)}
            # AWS: termination-time is present only when the instance is marked for
            # termination (a stop or hibernate notice has instance-action alone).
            if self.spot_action.get("action") == "terminate" and self.spot_action.get("time"):
                spot["termination-time"] = str(self.spot_action["time"])
            meta["spot"] = spot
        if self.target_lifecycle_state is not None:
            meta["autoscaling"] = {"target-lifecycle-state": self.target_lifecycle_state}
        if self.iam_role:
            profile = f"arn:aws:iam::{self.account_id}:instance-profile/{self.iam_role}"
            meta["iam"] = {
                "info": json.dumps({"Code": "Success", "LastUpdated": _utc_iso(),
                                    "InstanceProfileArn": profile,
                                    "InstanceProfileId": "AIPAEMULATED"}),
                "security-credentials": {self.iam_role: json.dumps(fake_credentials())},
            }
        latest: Tree = {
            "meta-data": meta,
            "dynamic": {"instance-identity": {
                "document": json.dumps(self.identity_document(), indent=2)}},
        }
        if self.user_data is not None:
            latest["user-data"] = self.user_data
        return {"latest": latest}


def meta_for_instance(
    ec2_client: Any, instance_id: str, user_data: bytes | None = None
) -> InstanceMeta:
    """``InstanceMeta`` for an instance in the (moto) EC2 API behind ``ec2_client``.

    When ``user_data`` is None it is read from the instance's ``userData`` attribute,
    so the emulated instance sees what it was launched with.
    """
    import base64

    reservations = ec2_client.describe_instances(InstanceIds=[instance_id])["Reservations"]
    instance = reservations[0]["Instances"][0]
    if user_data is None:
        attr = ec2_client.describe_instance_attribute(InstanceId=instance_id,
                                                      Attribute="userData")
        raw = (attr.get("UserData") or {}).get("Value")
        user_data = base64.b64decode(raw) if raw else None
    return InstanceMeta.from_ec2(instance, ec2_client.meta.region_name, user_data)


@dataclass
class RequestRecord:
    """One request as the emulator saw it; ``status`` None means the connection was dropped."""

    method: str
    path: str
    status: int | None
    had_token: bool


@dataclass
class Faults:
    """Injected misbehaviour, changeable while clients run; also the request log.

    Order per request: ``delay_s`` sleep, then a drop (``drop_next_n``), then a
    failure (``fail_next_n`` with ``error_status``, plus ``Retry-After`` when
    ``retry_after`` is set), then ``token_403`` on token PUTs, then normal service.
    """

    delay_s: float = 0.0
    fail_next_n: int = 0
    error_status: int = 503
    retry_after: str | None = None
    drop_next_n: int = 0
    token_403: bool = False
    # Grant at most this TTL (and say so in the TTL header), as a server may.
    token_ttl_max: int | None = None
    requests: list[RequestRecord] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def take_drop(self) -> bool:
        with self._lock:
            if self.drop_next_n > 0:
                self.drop_next_n -= 1
                return True
            return False

    def take_failure(self) -> bool:
        with self._lock:
            if self.fail_next_n > 0:
                self.fail_next_n -= 1
                return True
            return False

    def record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.requests.append(rec)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """How many requests matched (path relative to the instance, e.g. ``latest/api/token``)."""
        with self._lock:
            return sum(1 for r in self.requests
                       if (method is None or r.method == method)
                       and (path is None or r.path.strip("/") == path.strip("/")))

    def reset(self) -> None:
        with self._lock:
            self.delay_s = 0.0
            self.fail_next_n = 0
            self.error_status = 503
            self.retry_after = None
            self.drop_next_n = 0
            self.token_403 = False
            self.token_ttl_max = None
            self.requests.clear()


@dataclass
class InstanceHost:
    """One emulated instance's IMDS state: metadata, tokens and faults."""

    meta: InstanceMeta
    clock: Clock = SYSTEM_CLOCK
    faults: Faults = field(default_factory=Faults)
    http_tokens: str = "required"
    _tokens: dict[str, float] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.http_tokens not in HTTP_TOKENS:
            raise ValueError(f"http_tokens must be one of {HTTP_TOKENS}, not {self.http_tokens!r}")

    def authorized(self, token: str | None) -> bool:
        """May a GET with this token (None: no token header) read metadata?"""
        if token is None and self.http_tokens == "optional":
            return True  # IMDSv1
        return self.token_valid(token)

    def issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(40)
        with self._lock:
            now = self.clock.monotonic()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token

    def token_valid(self, token: str | None) -> bool:
        if not token:
            return False
        with self._lock:
            expires = self._tokens.get(token)
        return expires is not None and self.clock.monotonic() < expires

    def revoke_tokens(self) -> None:
        """Forget every token, as a (simulated) IMDS restart would."""
        with self._lock:
            self._tokens.clear()


def _resolve(tree: Tree, segments: list[str]) -> Tree | str | bytes | None:
    node: Tree | str | bytes = tree
    for seg in segments:
        if not isinstance(node, dict) or seg not in node:
            return None
        node = node[seg]
    return node


def _listing(node: Tree) -> str:
    return "\n".join(f"{k}/" if isinstance(v, dict) else k for k, v in node.items())


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    _record: Callable[[int | None], None] | None = None
    timeout = 10  # a silent client never pins a handler thread for long
    # Keep-alive, as the real IMDS does: a client's pooled connection is reused.
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        owner = self.server.owner
        raw_path = urlsplit(self.path).path
        segments = [unquote(s) for s in raw_path.split("/") if s]
        host, rest = owner._route(segments)
        if host is None:
            self._send(404, b"Not Found")
            return
        rel = "/".join(rest)
        faults = host.faults
        token = self.headers.get(TOKEN_HEADER)
        # Logged before the answer is written, so a client that has its answer can
        # already see its request in the log.
        self._record = lambda status: faults.record(
            RequestRecord(method, rel, status, bool(token)))
        if faults.delay_s > 0 and owner._stopping.wait(faults.delay_s):
            self._record(None)  # server stopping: give up without answering
            return
        if faults.take_drop():
            self._record(None)
            self.close_connection = True
            return
        if faults.take_failure():
            extra = {"Retry-After": faults.retry_after} if faults.retry_after else {}
            self._send(faults.error_status, b"Service Unavailable", extra)
            return
        self._answer(host, method, rel, rest, token)

    def _answer(self, host: InstanceHost, method: str, rel: str, rest: list[str],
                token: str | None) -> int:
        if rel == TOKEN_PATH:
            if method != "PUT":
                return self._send(405, b"Method Not Allowed")
            if host.faults.token_403 or self.headers.get("X-Forwarded-For"):
                return self._send(403, b"Forbidden")
            ttl_raw = self.headers.get(TTL_HEADER, "")
            try:
                ttl = int(ttl_raw)
            except ValueError:
                ttl = 0
            if not 1 <= ttl <= MAX_TTL:
                return self._send(400, b"Bad Request")
            if host.faults.token_ttl_max is not None:
                ttl = max(1, min(ttl, host.faults.token_ttl_max))
            return self._send(200, host.issue_token(ttl).encode(), {TTL_HEADER: str(ttl)})
        if method != "GET":
            return self._send(405, b"Method Not Allowed")
        if not host.authorized(token):
            return self._send(401, b"Unauthorized")
        if not rest:
            return self._send(200, "\n".join((*API_VERSIONS, "latest")).encode())
        if rest[0] in API_VERSIONS:
            rest = ["latest", *rest[1:]]  # a dated version: the same tree as latest
        node = _resolve(host.meta.tree(), rest)
        if node is None:
            return self._send(404, b"Not Found")
        if isinstance(node, dict):
            return self._send(200, _listing(node).encode())
        body = node if isinstance(node, bytes) else node.encode()
        ctype = "application/octet-stream" if isinstance(node, bytes) else "text/plain"
        return self._send(200, body, {"Content-Type": ctype})

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> int:
        record = self._record
        if record is not None:
            record(status)
        self.send_response(status)
        merged = {"Content-Type": "text/plain", "Server": "EC2ws"}
        if status in ERROR_TITLES:  # IMDS answers its errors with a small XHTML page
            body = error_page(status)
            merged["Content-Type"] = "text/html"
        merged.update(headers or {})
        for k, v in merged.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        return status


class _HttpServer(ThreadingHTTPServer):
    # Handler threads are joined on close (block_on_close) so stop() leaves none behind.
    daemon_threads = False
    block_on_close = True

    def __init__(self, addr: tuple[str, int], owner: _Base) -> None:
        self.owner = owner
        self.active: set[socket.socket] = set()
        self.active_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.active_lock:
            self.active.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.active_lock:
            self.active.discard(request)
        super().shutdown_request(request)

    def abort_connections(self) -> None:
        with self.active_lock:
            socks = list(self.active)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Base:
    """Owns the HTTP server and its serving thread; subclasses decide routing."""

    def __init__(self, port: int = 0, clock: Clock = SYSTEM_CLOCK) -> None:
        self.port = port
        self.clock = clock
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _route(self, segments: list[str]) -> tuple[InstanceHost | None, list[str]]:
        raise NotImplementedError

    def start(self) -> _Base:
        if self._httpd is not None:
            return self
        self._stopping.clear()
        self._httpd = _HttpServer((LOOPBACK, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"imds-emulator-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.abort_connections()
        httpd.server_close()  # joins handler threads
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ImdsServer(_Base):
    """One emulated instance on its own loopback port; ``url`` is the IMDS endpoint."""

    def __init__(self, meta: InstanceMeta, port: int = 0, clock: Clock = SYSTEM_CLOCK,
                 faults: Faults | None = None, http_tokens: str = "required") -> None:
        super().__init__(port, clock)
        self.host = InstanceHost(meta, clock, faults or Faults(), http_tokens)

    @property
    def url(self) -> str:
        return self.base_url

    @property
    def meta(self) -> InstanceMeta:
        return self.host.meta

    @meta.setter
    def meta(self, value: InstanceMeta) -> None:
        self.host.meta = value

    @property
    def faults(self) -> Faults:
        return self.host.faults

    def revoke_tokens(self) -> None:
        self.host.revoke_tokens()

    def _route(self, segments: list[str]) -> tuple[InstanceHost | None, list[str]]:
        return self.host, segments

    def __enter__(self) -> ImdsServer:
        self.start()
        return self


class ImdsEmulator(_Base):
    """Many emulated instances on one port, each under ``/<instance-id>/``."""

    def __init__(self, port: int = 0, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(port, clock)
        self._hosts: dict[str, InstanceHost] = {}
        self._hosts_lock = threading.Lock()

    def add(self, meta: InstanceMeta, faults: Faults | None = None,
            http_tokens: str = "required") -> str:
        """Host ``meta`` and return its endpoint URL (with the path prefix)."""
        with self._hosts_lock:
            self._hosts[meta.instance_id] = InstanceHost(meta, self.clock, faults or Faults(),
                                                         http_tokens)
        return self.endpoint(meta.instance_id)

    def remove(self, instance_id: str) -> None:
        """Stop serving an instance: its endpoint then answers 404, as if it vanished."""
        with self._hosts_lock:
            self._hosts.pop(instance_id, None)

    def endpoint(self, instance_id: str) -> str:
        return f"{self.base_url}/{instance_id}"

    def host(self, instance_id: str) -> InstanceHost:
        with self._hosts_lock:
            return self._hosts[instance_id]

    def instance_ids(self) -> list[str]:
        with self._hosts_lock:
            return list(self._hosts)

    def _route(self, segments: list[str]) -> tuple[InstanceHost | None, list[str]]:
        if not segments:
            return None, []
        with self._hosts_lock:
            host = self._hosts.get(segments[0])
        return host, segments[1:]

    def __enter__(self) -> ImdsEmulator:
        self.start()
        return self
