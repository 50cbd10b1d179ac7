"""AWS (botocore) clients the way the agent needs them.

botocore's *standard* retry mode (bounded attempts, jittered backoff, retry
quota), short connect/read timeouts so a sick control plane cannot hang a phase,
a region from IMDS when the config does not pin one, and the endpoint from
botocore's own ``AWS_ENDPOINT_URL`` (which is how every test and the simulator
reach moto on loopback). botocore is imported lazily: ``status`` must not pay for it.
"""

from __future__ import annotations

import os
import threading
from typing import Any

_lock = threading.Lock()
_session_obj: Any = None
_data_path: str | None = None


def use_data(path: os.PathLike[str] | str | None) -> bool:
    """Search ``path`` (``agent.aws.botodata``'s lean copies) before botocore's own data.

    Only the first session reads it (a loader reads its search path once), so this
    belongs before the first client; later calls change nothing and return False.
    A directory the operator set in ``AWS_DATA_PATH`` still comes first.
    """
    global _data_path
    with _lock:
        if _session_obj is not None:
            return False
        _data_path = str(path) if path else None
        return True


def _session() -> Any:
    """One botocore session per process: its loader caches service models across clients.

    botocore's, not boto3's: the agent uses clients only (no resources, no transfer
    methods injected on the client), and not importing boto3 saves ~40 ms of CPU at
    every start of a command that talks to AWS."""
    global _session_obj
    import botocore.session

    with _lock:
        if _session_obj is None:
            core = botocore.session.get_session()
            if _data_path:
                from agent.aws.botodata import attach

                attach(core, _data_path)
            _session_obj = core
        return _session_obj


def prewarm(services: tuple[str, ...] = ("s3",),
            modules: tuple[str, ...] = ()) -> threading.Thread:
    """Import botocore and load service models in the background, while boot waits on IMDS.

    Building a client makes no network call; it parses the service model and endpoint
    rules, which the session's loader then keeps. The throwaway client uses a fixed
    region only to be constructible. Failures are ignored: the real call will report.
    """
    def work() -> None:
        import importlib

        try:
            for m in modules:
                importlib.import_module(m)
            sess = _session()
            for svc in services:
                sess.create_client(svc, region_name="us-east-1")
        except Exception:  # noqa: BLE001 - best effort; the real client creation reports
            pass

    t = threading.Thread(target=work, name="ec2-agent-prewarm", daemon=True)
    t.start()
    return t


def client(service: str, region: str | None = None, *, connect_timeout: float = 2.0,
           read_timeout: float = 10.0, max_attempts: int | None = None,
           max_pool_connections: int = 10, checksums: str = "when_supported") -> Any:
    """A botocore client with standard retries and bounded timeouts.

    ``max_attempts`` defaults to ``AWS_MAX_ATTEMPTS`` or 3. The endpoint comes
    from botocore's own environment handling (``AWS_ENDPOINT_URL`` /
    ``AWS_ENDPOINT_URL_<SERVICE>``).
    """
    from botocore.config import Config

    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "3"))
    extra = {} if checksums == "when_supported" else {
        "request_checksum_calculation": checksums, "response_checksum_validation": checksums}
    cfg = Config(
        # total_max_attempts counts the first try; botocore's max_attempts would not.
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        **extra,
    )
    c = _session().create_client(service, region_name=region, config=cfg)
    c.meta.events.register("before-call", _listed)
    return c


class UnlistedOperation(RuntimeError):
    """The agent called an operation missing from ``agent.aws.botodata.OPERATIONS``: a bug."""


def _listed(model: Any, **_: Any) -> None:
    """Refuse a call outside ``agent.aws.botodata.OPERATIONS`` (the lean copies would lack it)."""
    from agent.aws.botodata import OPERATIONS

    service = model.service_model.service_name
    if model.name not in OPERATIONS.get(service, ()):
        raise UnlistedOperation(f"{service}.{model.name} is not in agent.aws.botodata.OPERATIONS: "
                                f"add it there (the lean botocore data keeps only those)")
