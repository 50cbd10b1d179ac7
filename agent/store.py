"""S3 as the coordination store: ETag reads, conditional writes, listings with the store's clock.

S3 is strongly consistent and supports ``If-None-Match: *`` (create-only) and
``If-Match: <etag>`` (compare-and-swap) on PUT and DELETE; that is the whole
coordination engine (leases, budgets, manifests). Every response carries the
store's own ``Date``: liveness is judged on that clock, never on ours, so each
read returns it as ``store_now``.

Errors are mapped at this boundary: a lost race is ``PreconditionFailed``, a
missing key ``NotFound``, anything else ``StoreError`` (chained), so callers can
tell "someone else won" from "the store is sick".
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

from agent.errors import NotFound, PreconditionFailed, StoreError


@dataclass(frozen=True)
class Obj:
    key: str
    body: bytes
    etag: str
    last_modified: float  # epoch seconds, store clock
    store_now: float  # the store's Date header for this response


@dataclass(frozen=True)
class Entry:
    key: str
    etag: str
    last_modified: float
    size: int


@dataclass(frozen=True)
class Listing:
    entries: tuple[Entry, ...]
    store_now: float
    pages: int = 1


class _NotModified:
    def __repr__(self) -> str:
        return "NOT_MODIFIED"


NOT_MODIFIED = _NotModified()


@dataclass
class Usage:
    """Requests and bytes by operation: the cost model is measured, not guessed."""

    requests: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    last_mono: float = 0.0  # when the last request finished, ok or not: progress, for watchdogs
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, op: str, bytes_in: int = 0, bytes_out: int = 0) -> None:
        with self._lock:
            self.last_mono = time.monotonic()
            self.requests[op] += 1
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out


@functools.lru_cache(maxsize=32)
def http_date_seconds(date: str) -> float:
    """An HTTP ``Date`` header as epoch seconds. Memoised: it changes once a second, and
    every response carries one (parsing it was ~8 % of a member's interval)."""
    return parsedate_to_datetime(date).timestamp()


def _http_date(meta: dict[str, Any]) -> float:
    headers = meta.get("HTTPHeaders", {}) if meta else {}
    date = headers.get("date")
    if not date:
        raise StoreError("store response carries no Date header; cannot judge age on its clock")
    return http_date_seconds(date)


def _code(exc: Exception) -> tuple[str, int]:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class Store:
    """One deployment's bucket and prefix. Keys passed in are relative to the prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 region: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            from agent import aws

            client = aws.client("s3", region)
        self.client = client
        self.usage = Usage()

    # -- keys ---------------------------------------------------------------
    def key(self, rel: str) -> str:
        rel = rel.lstrip("/")
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        if self.prefix and key.startswith(self.prefix + "/"):
            return key[len(self.prefix) + 1:]
        return key

    # -- error mapping --------------------------------------------------------
    def _fail(self, op: str, rel: str, exc: Exception) -> Exception:
        code, status = _code(exc)
        where = f"s3://{self.bucket}/{self.key(rel)}"
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return PreconditionFailed(f"{op} {where}: precondition failed ({code or status})")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(f"{op} {where}: not found")
        return StoreError(f"{op} {where}: {code or type(exc).__name__}: {exc}")

    # -- operations -------------------------------------------------------------
    def get(self, rel: str, *, if_none_match: str | None = None) -> Obj | _NotModified:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(rel)}
        if if_none_match:
            kwargs["IfNoneMatch"] = if_none_match
        try:
            resp = self.client.get_object(**kwargs)
            body = resp["Body"].read()
        except Exception as exc:  # botocore errors are mapped at this boundary
            code, status = _code(exc)
            if status == 304 or code == "304":
                self.usage.add("get")
                return NOT_MODIFIED
            self.usage.add("get")
            raise self._fail("get", rel, exc) from exc
        self.usage.add("get", bytes_in=len(body))
        return Obj(
            key=rel,
            body=body,
            etag=resp["ETag"],
            last_modified=resp["LastModified"].timestamp(),
            store_now=_http_date(resp.get("ResponseMetadata", {})),
        )

    def get_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object (a ranged GET); fewer if the object is shorter."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(rel),
                                          Range=f"bytes={start}-{end - 1}")
            body = resp["Body"].read()
        except Exception as exc:  # botocore errors are mapped at this boundary
            code, status = _code(exc)
            self.usage.add("get")
            if code == "InvalidRange" or status == 416:
                return b""
            raise self._fail("get", rel, exc) from exc
        self.usage.add("get", bytes_in=len(body))
        return body

    def get_or_none(self, rel: str) -> Obj | None:
        try:
            obj = self.get(rel)
        except NotFound:
            return None
        assert isinstance(obj, Obj)
        return obj

    def put(self, rel: str, body: bytes, *, if_match: str | None = None,
            if_none_match: bool = False, content_type: str = "application/octet-stream") -> str:
        """Write ``body``: create-only with ``if_none_match``, CAS with ``if_match``; the ETag."""
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket, "Key": self.key(rel), "Body": body, "ContentType": content_type,
        }
        if if_match:
            kwargs["IfMatch"] = if_match
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        try:
            resp = self.client.put_object(**kwargs)
        except Exception as exc:
            self.usage.add("put", bytes_out=len(body))
            raise self._fail("put", rel, exc) from exc
        self.usage.add("put", bytes_out=len(body))
        return resp["ETag"]

    def create(self, rel: str, body: bytes, **kw: Any) -> str:
        return self.put(rel, body, if_none_match=True, **kw)

    def delete(self, rel: str, *, if_match: str | None = None) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(rel)}
        if if_match:
            kwargs["IfMatch"] = if_match
        try:
            self.client.delete_object(**kwargs)
        except Exception as exc:
            self.usage.add("delete")
            raise self._fail("delete", rel, exc) from exc
        self.usage.add("delete")

    def head(self, rel: str) -> Entry | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
        except Exception as exc:
            self.usage.add("head")
            err = self._fail("head", rel, exc)
            if isinstance(err, NotFound):
                return None
            raise err from exc
        self.usage.add("head")
        return Entry(rel, resp["ETag"], resp["LastModified"].timestamp(), resp["ContentLength"])

    def list(self, rel_prefix: str, *, max_pages: int | None = None) -> Listing:
        """All keys under a prefix (relative keys), with the store's clock of the last page."""
        entries: list[Entry] = []
        token: str | None = None
        pages = 0
        store_now = 0.0
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.key(rel_prefix)}
            if token:
                kwargs["ContinuationToken"] = token
            try:
                resp = self.client.list_objects_v2(**kwargs)
            except Exception as exc:
                self.usage.add("list")
                raise self._fail("list", rel_prefix, exc) from exc
            pages += 1
            contents = resp.get("Contents", [])
            # ~100 bytes of XML per entry besides the key: a model, for the cost measurements
            self.usage.add("list", bytes_in=sum(len(o["Key"]) + 100 for o in contents))
            store_now = _http_date(resp.get("ResponseMetadata", {}))
            for o in contents:
                entries.append(Entry(self.rel(o["Key"]), o["ETag"], o["LastModified"].timestamp(),
                                     o["Size"]))
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token or (max_pages and pages >= max_pages):
                break
        return Listing(tuple(entries), store_now, pages)

    def exists(self, rel: str) -> bool:
        return self.head(rel) is not None

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (simulator and tests; real deployments pre-create it)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except Exception:
            pass
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except Exception as exc:
            code, _ = _code(exc)
            if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"create bucket {self.bucket}: {exc}") from exc
