"""botocore's errors, read in one place: which exceptions an AWS call raises, and their code.

The adapters (store, cloud, secrets, pull, publish, backup) catch ``AWS_ERRORS``
only: a ``TypeError`` or ``KeyError`` is a bug in the agent and propagates, it is
never turned into "the store is failing" (which would freeze healing quietly).
"""

from __future__ import annotations

import functools
from email.utils import parsedate_to_datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

# What an AWS call may raise when the service or the network fails. ResponseParserError
# (an HTML 500 page where XML was expected) is not a BotoCoreError.
AWS_ERRORS: tuple[type[Exception], ...] = (ClientError, BotoCoreError, ResponseParserError)


def transfer_errors() -> tuple[type[Exception], ...]:
    """``AWS_ERRORS`` and s3transfer's own (a download that ran out of attempts, a failed
    multipart). A function: only the callers that use s3transfer import it (~10 ms of CPU,
    multiprocessing included, that a restore or a heartbeat need not pay)."""
    from s3transfer.exceptions import (
        RetriesExceededError,
        S3DownloadFailedError,
        S3UploadFailedError,
    )

    return AWS_ERRORS + (RetriesExceededError, S3DownloadFailedError, S3UploadFailedError)

NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound", "NoSuchBucket"})
PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


def _response(exc: BaseException) -> dict[str, Any]:
    r = getattr(exc, "response", None)
    return r if isinstance(r, dict) else {}


def error_code(exc: BaseException) -> str:
    """The service's error code (``NoSuchKey``, ``InvalidInstanceID.NotFound``...), else ""."""
    return str((_response(exc).get("Error") or {}).get("Code", "") or "")


def http_status(exc: BaseException) -> int:
    """The HTTP status of the failed response, 0 when there was none (network errors)."""
    meta = _response(exc).get("ResponseMetadata") or {}
    return int(meta.get("HTTPStatusCode", 0) or 0)


def describe(exc: BaseException) -> str:
    """``code`` or the exception's type name, for messages."""
    return error_code(exc) or type(exc).__name__


@functools.lru_cache(maxsize=32)
def http_date_seconds(date: str) -> float:
    """An HTTP ``Date`` header as epoch seconds. Memoised: it changes once a second, and
    every response carries one (parsing it was ~8 % of a member's interval)."""
    return parsedate_to_datetime(date).timestamp()


def date_of(meta: Any) -> float | None:
    """The ``Date`` header of a response's ``ResponseMetadata`` as epoch seconds, or None."""
    headers = (meta or {}).get("HTTPHeaders") or {}
    date = headers.get("date")
    return http_date_seconds(date) if date else None


def error_date(exc: BaseException) -> float | None:
    """The ``Date`` header of a failed response (a 304 or a 404 still has the store clock)."""
    return date_of(_response(exc).get("ResponseMetadata"))


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in NOT_FOUND_CODES or http_status(exc) == 404


def is_precondition(exc: BaseException) -> bool:
    return error_code(exc) in PRECONDITION_CODES or http_status(exc) in (409, 412)


def is_not_modified(exc: BaseException) -> bool:
    return http_status(exc) == 304 or error_code(exc) == "304"
