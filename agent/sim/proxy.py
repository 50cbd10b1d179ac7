"""A loopback TCP proxy the test controls: the network between agents and the cloud.

A fleet rehearsal needs to break the network in the ways that matter for safe
replacement, without root and without touching the moto server itself:

    pass       forward bytes both ways (the healthy network)
    blackhole  accept, read, never answer: calls hang until the client's timeout,
               which is what a sick control plane looks like from an instance
    refuse     close every connection at once (a fast, loud failure)

A scenario may also watch the traffic (``watch``, test-only): called with the first
bytes of every request, it may return a callable that runs right before the answer
to that request is passed back, when the request has reached the upstream and its
client has not seen the answer yet. The fleet scenarios use it as a deterministic
stall point (SIGSTOP an agent the moment its lease is in the store), so the product
needs no fault knob of its own.

Switching mode applies to connections already open too (boto3 keeps a pool), so a
blackhole starts at the switch, not at the next new connection; leaving blackhole
closes the held connections, so clients retry on fresh ones instead of waiting out
their read timeout. Counters say what the proxy did, for the tests' numbers.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from agent.sim.netutil import LOOPBACK

MODES = ("pass", "blackhole", "refuse")


@dataclass
class ProxyCounters:
    accepted: int = 0
    passed: int = 0
    blackholed: int = 0
    refused: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    upstream_errors: int = 0


class TcpProxy:
    """127.0.0.1:<ephemeral> → ``upstream``; one thread per connection, daemon threads."""

    def __init__(self, upstream_host: str, upstream_port: int, mode: str = "pass",
                 name: str = "proxy") -> None:
        if upstream_host not in (LOOPBACK, "localhost"):
            raise ValueError(f"the proxy forwards to loopback only, got {upstream_host!r}")
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self._mode = self._check(mode)
        self.counters = ProxyCounters()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: set[socket.socket] = set()
        self._held: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        # Test-only (module docstring): request head -> what to run before its answer.
        self.watch: Callable[[bytes], Callable[[], None] | None] | None = None

    @classmethod
    def to_url(cls, url: str, mode: str = "pass", name: str = "proxy") -> TcpProxy:
        """A proxy in front of ``http://127.0.0.1:PORT`` (the moto server's URL)."""
        from urllib.parse import urlsplit

        u = urlsplit(url)
        return cls(u.hostname or "", int(u.port or 80), mode, name)

    @staticmethod
    def _check(mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"proxy mode must be one of {', '.join(MODES)}, got {mode!r}")
        return mode

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        self._mode = self._check(mode)
        if mode != "blackhole":
            with self._lock:
                held = list(self._held)
            for s in held:  # let clients retry now rather than after their read timeout
                _close(s)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> TcpProxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((LOOPBACK, 0))
        ls.listen(128)
        ls.settimeout(0.2)
        self._listener = ls
        self.port = ls.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            _close(self._listener)
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            _close(s)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections ----------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.counters.accepted += 1
            threading.Thread(target=self._serve, args=(client,), name=f"{self.name}-conn",
                             daemon=True).start()

    def _track(self, s: socket.socket, on: bool = True) -> None:
        with self._lock:
            (self._conns.add if on else self._conns.discard)(s)

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        try:
            mode = self._mode
            if mode == "refuse":
                self.counters.refused += 1
                return
            if mode == "blackhole":
                self._blackhole(client)
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                self.counters.upstream_errors += 1
                return
            self._track(upstream)
            try:
                self.counters.passed += 1
                if self._pump(client, upstream) == "blackhole":
                    _close(upstream)
                    self._blackhole(client)
            finally:
                self._track(upstream, False)
                _close(upstream)
        finally:
            self._track(client, False)
            _close(client)

    def _pump(self, client: socket.socket, upstream: socket.socket) -> str:
        """Forward until either side closes or the mode changes; returns why it stopped."""
        peers = {client: upstream, upstream: client}
        before_answer: Callable[[], None] | None = None
        while not self._stop.is_set():
            if self._mode != "pass":
                return self._mode
            try:
                ready, _, _ = select.select(list(peers), [], [], 0.1)
            except (OSError, ValueError):
                return "closed"
            for s in ready:
                if self._mode != "pass":
                    return self._mode
                try:
                    data = s.recv(65536)
                except OSError:
                    return "closed"
                if not data:
                    return "closed"
                watch = self.watch
                if s is client and watch is not None and before_answer is None:
                    before_answer = watch(data)
                elif (s is upstream and before_answer is not None
                      and not data.startswith(b"HTTP/1.1 100")):
                    before_answer, run = None, before_answer
                    run()
                try:
                    peers[s].sendall(data)
                except OSError:
                    return "closed"
                if s is client:
                    self.counters.bytes_up += len(data)
                else:
                    self.counters.bytes_down += len(data)
        return "stopped"

    def _blackhole(self, client: socket.socket) -> None:
        """Read and discard; never answer, until the client gives up or the mode changes."""
        self.counters.blackholed += 1
        with self._lock:
            self._held.add(client)
        try:
            client.settimeout(0.2)
            while not self._stop.is_set() and self._mode == "blackhole":
                try:
                    if not client.recv(65536):
                        return
                except TimeoutError:
                    continue
                except OSError:
                    return
        finally:
            with self._lock:
                self._held.discard(client)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
