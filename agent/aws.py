"""boto3 clients the way the agent needs them.

botocore's *standard* retry mode (bounded attempts, jittered backoff, retry
quota), short connect/read timeouts so a sick control plane cannot hang a phase,
a region from IMDS when the config does not pin one, and the endpoint from
boto3's own ``AWS_ENDPOINT_URL`` (which is how every test and the simulator
reach moto on loopback). boto3 is imported lazily: ``status`` must not pay for it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

_lock = threading.Lock()
_sessions: dict[str | None, Any] = {}


def _session(region: str | None) -> Any:
    import boto3

    with _lock:
        s = _sessions.get(region)
        if s is None:
            s = boto3.session.Session(region_name=region)
            _sessions[region] = s
        return s


def client(service: str, region: str | None = None, *, connect_timeout: float = 2.0,
           read_timeout: float = 10.0, max_attempts: int | None = None,
           max_pool_connections: int = 10) -> Any:
    """A boto3 client with standard retries and bounded timeouts.

    ``max_attempts`` defaults to ``AWS_MAX_ATTEMPTS`` or 3. The endpoint comes
    from boto3's own environment handling (``AWS_ENDPOINT_URL`` /
    ``AWS_ENDPOINT_URL_<SERVICE>``).
    """
    from botocore.config import Config

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "3"))
    cfg = Config(
        retries={"mode": "standard", "max_attempts": attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    return _session(region).client(service, config=cfg)
