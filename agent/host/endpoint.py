"""The agent's small HTTP endpoint: ``/health`` and ``/metrics``.

Peers may probe ``/health`` directly (its address is the member record's
``endpoint``), load balancers may use it, and Prometheus scrapes ``/metrics``.
``/health`` is this instance's own health summary (see ``agent.host.health``): 200 for
passing or warning, 503 for critical. It answers from the last summary the daemon
computed, never by running checks per request, so a scrape storm cannot turn into
a probe storm. A stdlib ``ThreadingHTTPServer`` in a daemon thread: no framework.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.errors import AgentError

HealthFn = Callable[[], dict[str, Any]]
MetricsFn = Callable[[], bytes]


def _default_metrics() -> bytes:
    from agent.host import metrics

    return metrics.render()


def advertised_url(bind: str, port: int, private_ip: str = "") -> str:
    """The URL peers use: the private IP when bound to every interface."""
    host = bind
    if bind in ("0.0.0.0", "", "::"):
        host = private_ip or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        path = self.path.split("?", 1)[0]
        if path == "/health":
            try:
                summary = self.server.health_fn()
            except Exception as exc:  # the endpoint must answer even if the daemon is confused
                summary = {"status": "critical", "error": f"{type(exc).__name__}: {exc}"}
            code = 503 if summary.get("status") == "critical" else 200
            self._send(
                code, json.dumps(summary, sort_keys=True).encode() + b"\n", "application/json"
            )
        elif path == "/metrics" and self.server.metrics_fn is not None:
            try:
                body = self.server.metrics_fn()
            except Exception as exc:  # a scrape answers 500 rather than kill the server thread
                self._send(500, f"metrics failed: {exc}\n".encode(), "text/plain")
                return
            self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # probes every few seconds would flood the journal


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    health_fn: HealthFn
    metrics_fn: MetricsFn | None


class Endpoint:
    """``Endpoint(bind, port, health_fn).start()``; ``.url`` for the record; ``.stop()``."""

    def __init__(
        self,
        bind: str = "127.0.0.1",
        port: int = 0,
        *,
        health_fn: HealthFn = lambda: {"status": "passing", "checks": {}},
        metrics_fn: MetricsFn | None = _default_metrics,
        private_ip: str = "",
    ) -> None:
        self.bind = bind
        self.port = port
        self.health_fn = health_fn
        self.metrics_fn = metrics_fn
        self.private_ip = private_ip
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Endpoint:
        try:
            server = _Server((self.bind, self.port), _Handler)
        except OSError as exc:
            raise AgentError(f"cannot serve HTTP on {self.bind}:{self.port}: {exc}") from exc
        server.health_fn = self.health_fn
        server.metrics_fn = self.metrics_fn
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever,
            name="ec2-agent-http",
            kwargs={"poll_interval": 0.5},
            daemon=True,
        )
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return advertised_url(self.bind, self.port, self.private_ip)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Endpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
