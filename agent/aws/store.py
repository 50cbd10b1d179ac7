"""S3 as the coordination store: ETag reads, conditional writes, listings with the store's clock.

S3 is strongly consistent and supports ``If-None-Match: *`` (create-only) and
``If-Match: <etag>`` (compare-and-swap) on PUT and DELETE; that is the whole
coordination engine (leases, budgets, manifests). Every response carries the
store's own ``Date``: liveness is judged on that clock, never on ours, so each
read returns it as ``store_now`` (a 304 and a 404 too).

This is the S3 implementation of ``agent.interfaces.StoreAPI``. Errors are mapped
at this boundary (``agent.aws.errors`` reads botocore's): a lost race is
``PreconditionFailed``, a missing key ``NotFound``, any other AWS failure
``StoreError`` (chained), so callers can tell "someone else won" from "the store
is sick"; anything else is a bug and propagates.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.aws import errors as awserrors
from agent.errors import DeadlineExceeded, NotFound, PreconditionFailed, StoreError
from agent.interfaces import Entry, Listing, NotModified, Obj, StoreAPI, Usage

__all__ = ["Entry", "Listing", "NotModified", "Obj", "Store", "StoreAPI", "Usage"]


def _http_date(meta: Mapping[str, Any] | None) -> float:
    date = awserrors.date_of(meta)
    if date is None:
        raise StoreError("store response carries no Date header; cannot judge age on its clock")
    return date


def _entries(contents: Sequence[Mapping[str, Any]],
             rel: Callable[[str], str] | None) -> Iterator[Entry]:
    """A LIST page's ``Contents`` as entries (keys through ``rel``, if any).

    ``Entry`` is a frozen dataclass: its ``__init__`` sets each field through
    ``object.__setattr__``, which was half the cost of a long listing (a member's
    every step lists the group's leases, one per death ever; issue #11). The fields
    are written to the new instance's ``__dict__`` instead: the same value."""
    new = object.__new__
    for o in contents:
        e = new(Entry)
        e.__dict__.update(key=rel(o["Key"]) if rel else o["Key"], etag=o["ETag"],
                          last_modified=o["LastModified"].timestamp(), size=o["Size"])
        yield e


class Store:
    """One deployment's bucket and prefix. Keys passed in are relative to the prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 region: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if client is None:
            from agent.aws import session as aws

            client = aws.client("s3", region)
        self.client = client  # a botocore S3 client: only this module calls it
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
    def _fail(self, op: str, rel: str, exc: BaseException) -> StoreError:
        code, status = awserrors.error_code(exc), awserrors.http_status(exc)
        where = f"s3://{self.bucket}/{self.key(rel)}"
        if awserrors.is_precondition(exc):
            return PreconditionFailed(f"{op} {where}: precondition failed ({code or status})")
        if awserrors.is_not_found(exc):
            return NotFound(f"{op} {where}: not found", store_now=awserrors.error_date(exc))
        return StoreError(f"{op} {where}: {awserrors.describe(exc)}: {exc}")

    # -- operations -------------------------------------------------------------
    def get(self, rel: str, *, if_none_match: str | None = None) -> Obj | NotModified:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(rel)}
        if if_none_match:
            kwargs["IfNoneMatch"] = if_none_match
        try:
            resp = self.client.get_object(**kwargs)
            body = resp["Body"].read()
        except awserrors.AWS_ERRORS as exc:
            self.usage.add("get")
            if awserrors.is_not_modified(exc):
                now = awserrors.error_date(exc)
                if now is None:
                    raise StoreError("store 304 carries no Date header") from exc
                return NotModified(now)
            raise self._fail("get", rel, exc) from exc
        self.usage.add("get", bytes_in=len(body))
        return Obj(
            key=rel,
            body=body,
            etag=resp["ETag"],
            last_modified=resp["LastModified"].timestamp(),
            store_now=_http_date(resp.get("ResponseMetadata")),
        )

    def read_range(self, rel: str, start: int, end: int,
                   sizes: Sequence[int]) -> Iterator[bytes]:
        """Bytes [start, end) of an object (one ranged GET), handed over in consecutive pieces
        of ``sizes`` as they arrive: the caller holds one piece at a time, never the range.
        A piece is short (and the last) where the object is; a range past its end is none."""
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self.key(rel),
                                          Range=f"bytes={start}-{end - 1}")
        except awserrors.AWS_ERRORS as exc:
            self.usage.add("get")
            if awserrors.error_code(exc) == "InvalidRange" or awserrors.http_status(exc) == 416:
                return
            raise self._fail("get", rel, exc) from exc
        body = resp["Body"]
        got = 0
        try:
            for size in sizes:
                try:
                    piece = body.read(size)
                except awserrors.AWS_ERRORS as exc:
                    raise self._fail("get", rel, exc) from exc
                got += len(piece)
                yield piece
                if len(piece) < size:
                    return
        finally:
            body.close()  # a body not read to its end closes the connection, never reused
            self.usage.add("get", bytes_in=got)

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
        except awserrors.AWS_ERRORS as exc:
            self.usage.add("put", bytes_out=len(body))
            raise self._fail("put", rel, exc) from exc
        self.usage.add("put", bytes_out=len(body))
        return str(resp["ETag"])

    def create(self, rel: str, body: bytes, *,
               content_type: str = "application/octet-stream") -> str:
        return self.put(rel, body, if_none_match=True, content_type=content_type)

    def delete(self, rel: str, *, if_match: str | None = None) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(rel)}
        if if_match:
            kwargs["IfMatch"] = if_match
        try:
            self.client.delete_object(**kwargs)
        except awserrors.AWS_ERRORS as exc:
            self.usage.add("delete")
            raise self._fail("delete", rel, exc) from exc
        self.usage.add("delete")

    def delete_many(self, rels: Sequence[str]) -> None:
        for i in range(0, len(rels), 1000):
            batch = rels[i:i + 1000]
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self.key(r)} for r in batch], "Quiet": True})
            except awserrors.AWS_ERRORS as exc:
                self.usage.add("delete")
                raise self._fail(f"delete {len(batch)} keys from", batch[0], exc) from exc
            self.usage.add("delete")
            if resp.get("Errors"):
                e = resp["Errors"][0]
                raise StoreError(f"delete {e.get('Key')}: {e.get('Code')} {e.get('Message')}")

    def head(self, rel: str) -> Entry | None:
        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
        except awserrors.AWS_ERRORS as exc:
            self.usage.add("head")
            err = self._fail("head", rel, exc)
            if isinstance(err, NotFound):
                return None
            try:
                raise err from exc
            finally:
                # ``err`` would hold its own traceback, whose frames are this one and every
                # caller's: a cycle that keeps all their locals (a heal step's listings) until
                # the cyclic collector runs
                del err
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
            except awserrors.AWS_ERRORS as exc:
                self.usage.add("list")
                raise self._fail("list", rel_prefix, exc) from exc
            pages += 1
            contents = resp.get("Contents", [])
            # ~100 bytes of XML per entry besides the key: a model, for the cost measurements
            self.usage.add("list", bytes_in=sum(len(o["Key"]) + 100 for o in contents))
            store_now = _http_date(resp.get("ResponseMetadata"))
            entries.extend(_entries(contents, self.rel if self.prefix else None))
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token or (max_pages and pages >= max_pages):
                break
        return Listing(tuple(entries), store_now, pages)

    def exists(self, rel: str) -> bool:
        return self.head(rel) is not None

    # -- bulk transfers (s3transfer) ----------------------------------------------------------
    def upload_many(self, items: Mapping[str, bytes], *, concurrency: int = 8) -> None:
        from s3transfer.manager import TransferConfig, TransferManager

        cfg = TransferConfig(max_request_concurrency=concurrency,
                             multipart_threshold=64 * 1024 * 1024)
        with TransferManager(self.client, cfg) as tm:
            futures = [
                (rel, tm.upload(io.BytesIO(data), self.bucket, self.key(rel),
                                extra_args={"ContentType": "application/octet-stream"}))
                for rel, data in items.items()
            ]
            for rel, fut in futures:
                try:
                    fut.result()
                except awserrors.transfer_errors() as exc:
                    self.usage.add("put", bytes_out=len(items[rel]))
                    raise self._fail("upload", rel, exc) from exc
                self.usage.add("put", bytes_out=len(items[rel]))

    def download_many(self, items: Sequence[tuple[str, Path, int]], *, concurrency: int = 8,
                      on_progress: Callable[[int], None] | None = None,
                      on_done: Callable[[int], None] | None = None,
                      expired: Callable[[], bool] | None = None) -> None:
        if not items:
            return
        from s3transfer.manager import TransferConfig, TransferManager
        from s3transfer.subscribers import BaseSubscriber

        class Sub(BaseSubscriber):  # type: ignore[misc]
            def __init__(self, size: int) -> None:
                self.size = size

            def on_queued(self, future: Any, **kw: Any) -> None:
                future.meta.provide_transfer_size(self.size)  # no HeadObject per file

            def on_progress(self, future: Any, bytes_transferred: int, **kw: Any) -> None:
                if on_progress is not None:
                    on_progress(bytes_transferred)

        cfg = TransferConfig(max_request_concurrency=concurrency, num_download_attempts=2,
                             multipart_threshold=64 * 1024 * 1024,
                             multipart_chunksize=16 * 1024 * 1024)
        tm = TransferManager(self.client, cfg)
        cancel = True
        try:
            pending = [(i, tm.download(self.bucket, self.key(rel), str(dest),
                                       subscribers=[Sub(size)]))
                       for i, (rel, dest, size) in enumerate(items)]
            while pending:
                if expired is not None and expired():
                    raise DeadlineExceeded(f"deadline exceeded while downloading "
                                           f"({len(pending)} objects left)")
                still = []
                for i, fut in pending:
                    if not fut.done():
                        still.append((i, fut))
                        continue
                    try:
                        fut.result()
                    except awserrors.transfer_errors() as exc:
                        self.usage.add("get")
                        raise self._fail("download", items[i][0], exc) from exc
                    self.usage.add("get", bytes_in=items[i][2])
                    if on_done is not None:
                        on_done(i)
                pending = still
                if pending:
                    time.sleep(0.005)
            cancel = False
        finally:
            tm.shutdown(cancel=cancel)

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (simulator and tests; real deployments pre-create it)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except awserrors.AWS_ERRORS:
            pass  # missing (404) or not ours (403): creating it tells which
        try:
            self.client.create_bucket(Bucket=self.bucket)
        except awserrors.AWS_ERRORS as exc:
            if awserrors.error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreError(f"create bucket {self.bucket}: {exc}") from exc

