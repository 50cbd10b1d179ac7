"""One exception tree for the whole agent.

    AgentError                    exit 1 unless stated
     ├── ConfigError              bad config: names the key path and the layer
     ├── UserDataError            user-data that cannot be decoded or parsed
     ├── ImdsError                instance metadata service failures
     │    ├── ImdsDisabled        token PUT answered 403: IMDS is turned off
     │    └── ImdsUnavailable     5xx, timeouts, refused connections after retries
     ├── DeadlineExceeded         a phase or the whole boot ran out of time
     ├── StateError               local state unreadable or unwritable
     ├── StoreError               S3 (the coordination store) failures
     │    ├── PreconditionFailed  a conditional write lost its race
     │    └── NotFound            the object does not exist
     ├── IntegrityError           checksum, size or path checks refused content
     ├── RenderError              a template failed to render or check
     └── CloudError               EC2 / Auto Scaling API failures

Errors from the layer below (urllib3, botocore, yaml, jsonschema) are mapped at
the adapter boundary and chained with ``from exc`` so the cause is never lost,
while callers only ever need to catch ``AgentError``.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    exit_code = 1


class ConfigError(AgentError):
    """A config value is wrong; says where (key path) and which layer it came from."""

    def __init__(self, message: str, *, path: str = "", layer: str = "") -> None:
        self.path = path
        self.layer = layer
        where = []
        if layer:
            where.append(layer)
        if path:
            where.append(path)
        prefix = f"{': '.join(where)}: " if where else ""
        super().__init__(f"{prefix}{message}")


class UserDataError(AgentError):
    """User-data could not be decoded or parsed."""


class ImdsError(AgentError):
    """The instance metadata service failed."""


class ImdsDisabled(ImdsError):
    """IMDS answered 403 to the token request: it is disabled for this instance."""


class ImdsUnavailable(ImdsError):
    """IMDS did not answer usefully within the retries and the deadline."""


class DeadlineExceeded(AgentError):
    """A deadline ran out before the work was done."""


class StateError(AgentError):
    """Local state could not be read or written."""


class StoreError(AgentError):
    """The S3 store failed (network, permissions, throttling)."""


class PreconditionFailed(StoreError):
    """A conditional write (If-Match / If-None-Match) lost: someone else wrote first."""


class NotFound(StoreError):
    """The object does not exist in the store.

    ``store_now`` is the store's clock of the 404 when it had one (a vanished
    record still ages on the store's clock), else None.
    """

    def __init__(self, message: str, *, store_now: float | None = None) -> None:
        super().__init__(message)
        self.store_now = store_now


class IntegrityError(AgentError):
    """Content failed verification: checksum, size, or an unsafe path."""


class RenderError(AgentError):
    """A template failed to render, or its check command refused the result."""


class CloudError(AgentError):
    """An EC2 or Auto Scaling API call failed; never evidence that an instance is dead."""
