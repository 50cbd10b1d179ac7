"""IMDSv2 client: token with TTL, bounded retries, and a deadline over everything.

Why not botocore's fetcher: it turns every failure into "no credentials" or None,
so a caller cannot tell "IMDS is disabled" from "IMDS is slow" from "not on EC2"
(the cloud-init anti-pattern in STYLE.md). This client says which:

    ImdsDisabled      the token PUT answered 403 (raised at once, one request)
    ImdsUnavailable   5xx / 429 / timeouts / refused or dropped connections after retries
    DeadlineExceeded  the caller's deadline ran out before IMDS answered
    ImdsError         anything else (404 on a required path, bad JSON, bad endpoint)

Every error names the path and chains the last cause with ``from exc``.

Retries: ``urllib3.util.Retry`` is used as a *value* (``is_retry``, ``increment``,
``get_backoff_time``, ``get_retry_after``) while this module owns the loop, so
that each attempt's timeout is capped by the deadline and no backoff sleep (or
``Retry-After``) outlives it; sleeping goes through the injected ``Clock``.

Tokens are cached and refreshed before expiry (when less than min(60 s, 10 % of
the TTL) remains on the injected clock) and once more when a GET answers 401
(IMDS restarted, clocks disagree). The TTL is the one the server returns in
``X-aws-ec2-metadata-token-ttl-seconds`` when it is shorter than the one asked for:
a server that grants less is believed, so the token is refreshed before it expires.

One source per field (docs/operations.md, "Where each identity field comes from"):
the identity document is authoritative for instance id, image, type, region, AZ,
account and private IP (one signed, self-consistent snapshot); ``local-ipv4`` and
``placement/availability-zone`` are read as cross-checks only, and a disagreement
is reported in ``Identity.disagreements`` (the boot shows it as degraded).

urllib3 only: no boto3 (import cost matters on the boot path), no requests, and
no proxies (IMDS must never go through one).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationParseError, MaxRetryError
from urllib3.util import Retry, parse_url

from agent import __version__
from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.errors import DeadlineExceeded, ImdsDisabled, ImdsError, ImdsUnavailable

log = logging.getLogger(__name__)

ENDPOINT_ENV = "EC2_AGENT_IMDS_ENDPOINT"
DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_PATH = "latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
IDENTITY_DOCUMENT = "latest/dynamic/instance-identity/document"


@dataclass(frozen=True)
class Identity:
    """Who this instance is, as IMDS tells it; the ``instance`` of the template context."""

    instance_id: str
    ami_id: str
    instance_type: str
    region: str
    availability_zone: str
    local_ipv4: str
    account_id: str
    pending_time: str = ""
    architecture: str = ""
    tags: dict[str, str] = field(default_factory=dict, hash=False)
    # Cross-checks that disagreed with the identity document (which is what is used).
    disagreements: tuple[str, ...] = field(default=(), compare=False)

    def as_context(self) -> dict[str, Any]:
        """The template context's ``instance`` mapping (names fixed by DESIGN.md)."""
        return {
            "id": self.instance_id,
            "ami": self.ami_id,
            "type": self.instance_type,
            "region": self.region,
            "az": self.availability_zone,
            "ip": self.local_ipv4,
            "tags": dict(self.tags),
        }


def _make_retry(total: int, backoff_factor: float, backoff_max: float,
                backoff_jitter: float) -> tuple[Retry, bool]:
    """The retry policy value; returns (retry, urllib3 applies jitter itself)."""
    common: dict[str, Any] = {
        "total": total,
        "redirect": 0,
        "allowed_methods": frozenset({"GET", "PUT"}),
        "status_forcelist": RETRY_STATUSES,
        "backoff_factor": backoff_factor,
        "respect_retry_after_header": True,
        "raise_on_status": True,
    }
    try:  # urllib3 >= 2
        return Retry(**common, backoff_max=backoff_max, backoff_jitter=backoff_jitter), True
    except TypeError:  # urllib3 1.26: no backoff_max/backoff_jitter kwargs; we cap and jitter
        return Retry(**common), False


class _TokenCache:
    """Shared between a client and its ``with_deadline`` copies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: str | None = None
        self.expires_at = 0.0  # on the client's monotonic clock
        self.ttl = 0.0  # as granted by the server


class ImdsClient:
    """An IMDSv2 client for one endpoint (which may carry a path prefix).

    ``endpoint`` defaults to ``$EC2_AGENT_IMDS_ENDPOINT`` then ``http://169.254.169.254``.
    ``timeout`` bounds each attempt; ``deadline`` (if given) bounds every attempt and
    the whole retry loop. ``retries`` counts retries after the first attempt.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        deadline: Deadline | None = None,
        token_ttl: int = MAX_TTL,
        timeout: float = 2.0,
        clock: Clock = SYSTEM_CLOCK,
        *,
        retries: int = 5,
        backoff_factor: float = 0.1,
        backoff_max: float = 2.0,
        backoff_jitter: float = 0.1,
        retry_after_max: float = 10.0,
    ) -> None:
        raw = endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT
        try:
            parsed = parse_url(raw)
        except LocationParseError as exc:
            raise ImdsError(f"IMDS endpoint {raw!r} is not a URL") from exc
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ImdsError(f"IMDS endpoint {raw!r} must be an http(s) URL with a host")
        if not 1 <= int(token_ttl) <= MAX_TTL:
            raise ImdsError(f"IMDS token TTL must be 1..{MAX_TTL} seconds, not {token_ttl}")
        if timeout <= 0:
            raise ImdsError(f"IMDS timeout must be positive, not {timeout}")
        self.endpoint = raw.rstrip("/")
        self.deadline = deadline
        self.token_ttl = int(token_ttl)
        self.timeout = float(timeout)
        self.clock = clock
        self.retry_after_max = retry_after_max
        self.backoff_max = backoff_max
        self.backoff_jitter = backoff_jitter
        self._retry, self._urllib3_jitters = _make_retry(
            retries, backoff_factor, backoff_max, backoff_jitter)
        self._tokens = _TokenCache()
        self._pool = urllib3.PoolManager(
            num_pools=4, maxsize=4, retries=False,
            headers={"User-Agent": f"ec2-agent/{__version__}"})

    # -- lifecycle -------------------------------------------------------------------

    def with_deadline(self, deadline: Deadline | None) -> ImdsClient:
        """The same client (pool and token shared) under another deadline, e.g. a phase's."""
        other = copy.copy(self)
        other.deadline = deadline
        return other

    def close(self) -> None:
        self._pool.clear()

    def __enter__(self) -> ImdsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public reads ----------------------------------------------------------------

    def get_bytes(self, path: str, optional: bool = False) -> bytes | None:
        """The raw body at ``path``; None on 404 when ``optional``.

        ``path`` is relative to ``latest/meta-data/`` unless it starts with ``latest/``
        (``get("instance-id")`` == ``get("/latest/meta-data/instance-id")``).
        """
        rel = _normalize(path)
        resp = None
        for attempt in (1, 2):
            token = self._token()
            resp = self._send("GET", rel, {TOKEN_HEADER: token})
            if resp.status != 401 or attempt == 2:
                break
            log.debug("IMDS answered 401 for %s: refreshing the token once", rel)
            self._forget_token(token)
        assert resp is not None
        if resp.status == 200:
            return bytes(resp.data)
        if resp.status == 404:
            if optional:
                return None
            raise ImdsError(f"IMDS has no {rel} (404)")
        if resp.status == 401:
            raise ImdsError(f"IMDS refused a freshly issued token for {rel} (401)")
        raise ImdsError(f"IMDS answered {resp.status} for {rel}")

    def get(self, path: str, optional: bool = False) -> str | None:
        """The body at ``path`` as text; None on 404 when ``optional``."""
        data = self.get_bytes(path, optional)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ImdsError(f"IMDS {_normalize(path)} is not UTF-8 text") from exc

    def identity(self) -> Identity:
        """The identity document, the primary private IP and the instance tags."""
        doc = self._json(IDENTITY_DOCUMENT, self.get(IDENTITY_DOCUMENT))
        if not isinstance(doc, dict):
            raise ImdsError(f"IMDS {IDENTITY_DOCUMENT} is not a JSON object")
        missing = [k for k in ("instanceId", "imageId", "instanceType", "region",
                               "availabilityZone") if not doc.get(k)]
        if missing:
            raise ImdsError(f"IMDS {IDENTITY_DOCUMENT} lacks {', '.join(missing)}")
        az = str(doc["availabilityZone"])
        ip = str(doc.get("privateIp") or "")
        seen_ip = (self.get("local-ipv4", optional=True) or "").strip()
        seen_az = (self.get("placement/availability-zone", optional=True) or "").strip()
        ip = ip or seen_ip  # a document without privateIp: the only source there is
        disagreements = tuple(
            f"IMDS {path} says {seen!r} but the identity document's {key} says {used!r}; "
            "using the document"
            for path, key, seen, used in (("local-ipv4", "privateIp", seen_ip, ip),
                                          ("placement/availability-zone", "availabilityZone",
                                           seen_az, az))
            if seen and seen != used)
        return Identity(
            instance_id=str(doc["instanceId"]),
            ami_id=str(doc["imageId"]),
            instance_type=str(doc["instanceType"]),
            region=str(doc["region"]),
            availability_zone=az,
            local_ipv4=ip,
            account_id=str(doc.get("accountId") or ""),
            pending_time=str(doc.get("pendingTime") or ""),
            architecture=str(doc.get("architecture") or ""),
            tags=self.tags(),
            disagreements=disagreements,
        )

    def tags(self) -> dict[str, str]:
        """Instance tags; {} when the instance does not expose tags in metadata (404)."""
        listing = self.get("tags/instance", optional=True)
        if listing is None:
            return {}
        tags: dict[str, str] = {}
        for key in (k.strip() for k in listing.splitlines()):
            if not key:
                continue
            value = self.get(f"tags/instance/{quote(key, safe='')}", optional=True)
            if value is not None:  # removed between the listing and the read
                tags[key] = value
        return tags

    def user_data(self) -> bytes | None:
        """The raw user-data, or None when the instance was launched without any."""
        return self.get_bytes("latest/user-data", optional=True)

    def spot_action(self) -> dict[str, Any] | None:
        """The spot interruption notice ({"action": ..., "time": ...}) or None."""
        return self._optional_object("spot/instance-action")

    def target_lifecycle_state(self) -> str | None:
        """The Auto Scaling target lifecycle state (InService, Terminated...) or None."""
        raw = self.get("autoscaling/target-lifecycle-state", optional=True)
        return raw.strip() if raw is not None else None

    def termination_time(self) -> str | None:
        """``spot/termination-time`` (the older spot notice: a time, terminate implied)."""
        raw = self.get("spot/termination-time", optional=True)
        return raw.strip() if raw is not None else None

    def rebalance(self) -> dict[str, Any] | None:
        """The rebalance recommendation ({"noticeTime": ...}) or None."""
        return self._optional_object("events/recommendations/rebalance")

    def maintenance_events(self) -> list[dict[str, Any]]:
        """Scheduled maintenance events (a JSON list; [] when none or the path is absent)."""
        path = "events/maintenance/scheduled"
        raw = self.get(path, optional=True)
        if raw is None or not raw.strip():
            return []
        value = self._json(path, raw)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ImdsError(f"IMDS {path} is not a JSON list of objects")
        return value

    def _optional_object(self, path: str) -> dict[str, Any] | None:
        """The JSON object at ``path``; None when absent (404)."""
        raw = self.get(path, optional=True)
        if raw is None:
            return None
        value = self._json(path, raw)
        if not isinstance(value, dict):
            raise ImdsError(f"IMDS {path} is not a JSON object")
        return value

    # -- token -----------------------------------------------------------------------

    def _token(self) -> str:
        cache = self._tokens
        with cache.lock:  # one PUT at a time; other threads wait and reuse it
            now = self.clock.monotonic()
            if cache.value and now < cache.expires_at - self._refresh_margin(cache):
                return cache.value
            resp = self._send("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)})
            if resp.status == 403:
                raise ImdsDisabled(
                    f"IMDS at {self.endpoint} answered 403 to the token request: "
                    "the metadata service is disabled for this instance "
                    "(HttpEndpoint=disabled) or refused the request")
            if resp.status != 200:
                raise ImdsError(f"IMDS token request ({TOKEN_PATH}) answered {resp.status}")
            token = bytes(resp.data).decode("ascii", "replace").strip()
            if not token:
                raise ImdsError(f"IMDS token request ({TOKEN_PATH}) returned an empty token")
            # Counted from before the PUT was sent: never believe a token lives longer,
            # and never longer than the server says it granted.
            cache.ttl = self._granted_ttl(resp)
            cache.value, cache.expires_at = token, now + cache.ttl
            return token

    def _granted_ttl(self, resp: Any) -> float:
        """The TTL the server granted (its TTL header), capped by the one asked for."""
        raw = resp.headers.get(TTL_HEADER)
        try:
            granted = int(str(raw).strip()) if raw is not None else self.token_ttl
        except ValueError:
            log.debug("IMDS token TTL header %r is not a number; using %s", raw, self.token_ttl)
            return float(self.token_ttl)
        return float(max(1, min(granted, self.token_ttl)))

    @staticmethod
    def _refresh_margin(cache: _TokenCache) -> float:
        """Refresh when less than min(60 s, 10 % of the granted TTL) remains."""
        return min(60.0, cache.ttl / 10)

    def _forget_token(self, token: str) -> None:
        with self._tokens.lock:
            if self._tokens.value == token:
                self._tokens.value = None

    # -- transport -------------------------------------------------------------------

    def _send(self, method: str, rel: str, headers: dict[str, str]) -> Any:
        """One logical request with retries; returns the first non-retryable response."""
        url = f"{self.endpoint}/{rel}"
        retry = self._retry
        last: BaseException | None = None
        while True:
            timeout = self._attempt_timeout(method, rel, last)
            resp = None
            try:
                resp = self._pool.request(
                    method, url, headers=headers, retries=False, redirect=False,
                    timeout=urllib3.Timeout(connect=timeout, read=timeout),
                    preload_content=True)
            except (Urllib3Error, OSError) as exc:
                last = exc
                try:
                    retry = retry.increment(method, url, error=exc)
                except Exception:  # MaxRetryError, or exc re-raised as not retryable
                    raise ImdsUnavailable(
                        f"IMDS {method} {rel}: no answer from {self.endpoint} after "
                        f"{len(retry.history) + 1} attempt(s): {exc}") from exc
                log.debug("IMDS %s %s failed (%s); retrying", method, rel, exc)
            else:
                has_after = bool(resp.headers.get("Retry-After"))
                if not retry.is_retry(method, resp.status, has_after):
                    return resp
                last = ImdsUnavailable(f"IMDS answered {resp.status} to {method} {rel}")
                try:
                    retry = retry.increment(method, url, response=resp)
                except MaxRetryError:
                    raise ImdsUnavailable(
                        f"IMDS {method} {rel}: still {resp.status} after "
                        f"{len(retry.history) + 1} attempts") from last
                log.debug("IMDS answered %s to %s %s; retrying", resp.status, method, rel)
            self._pause(retry, resp, method, rel, last)

    def _attempt_timeout(self, method: str, rel: str, last: BaseException | None) -> float:
        if self.deadline is None:
            return self.timeout
        try:
            return self.deadline.cap(self.timeout)
        except DeadlineExceeded as exc:
            raise self._deadline_error(method, rel, last) from (last or exc)

    def _pause(self, retry: Retry, resp: Any, method: str, rel: str,
               last: BaseException | None) -> None:
        delay = None
        if resp is not None and resp.status in Retry.RETRY_AFTER_STATUS_CODES:
            try:
                delay = retry.get_retry_after(resp)
            except Exception:  # an unparsable Retry-After: fall back to backoff
                delay = None
            if delay is not None:
                delay = min(delay, self.retry_after_max)
        if delay is None:
            delay = retry.get_backoff_time()
            if delay > 0 and not self._urllib3_jitters:
                delay += random.random() * self.backoff_jitter
            delay = min(delay, self.backoff_max)
        if self.deadline is not None and delay >= self.deadline.remaining():
            raise self._deadline_error(method, rel, last) from last
        self.clock.sleep(delay)

    def _deadline_error(self, method: str, rel: str, last: BaseException | None) -> Exception:
        what = self.deadline.what if self.deadline is not None else "IMDS"
        cause = f"; last error: {last}" if last is not None else ""
        return DeadlineExceeded(f"{what} deadline exceeded during IMDS {method} {rel}{cause}")

    @staticmethod
    def _json(path: str, raw: str | None) -> Any:
        try:
            return json.loads(raw or "")
        except ValueError as exc:
            raise ImdsError(f"IMDS {path} is not valid JSON") from exc


def _normalize(path: str) -> str:
    rel = path.lstrip("/")
    if rel == "latest" or rel.startswith("latest/"):
        return rel
    return f"latest/meta-data/{rel}"


class ImdsMetadata:
    """What user-data may need from IMDS (``agent.config.userdata.Metadata``), asked lazily:
    the launch index only for user-data with ``Launch-Index`` parts, the instance
    data only for ``## template: jinja`` parts."""

    def __init__(self, imds: ImdsClient, identity: Identity | None = None) -> None:
        self.imds, self.identity = imds, identity

    def launch_index(self) -> int | None:
        raw = self.imds.get("ami-launch-index", optional=True)
        try:
            return int(raw.strip()) if raw is not None else None
        except ValueError:
            return None

    def instance_data(self) -> dict[str, Any]:
        from agent.config.udtemplate import instance_data_from_identity

        if self.identity is None:
            self.identity = self.imds.identity()
        hostname = self.imds.get("local-hostname", optional=True)
        return instance_data_from_identity(self.identity, hostname.strip() if hostname else None)
