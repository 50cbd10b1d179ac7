"""Health probes against real local processes and servers on 127.0.0.1, started and stopped here."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.host.health import CheckSpec, HealthChecker, probe
from agent.sim.netutil import wait_for

SLOW_S = 10.0  # how long /slow takes to answer


class _H(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        code = {"/ok": 200, "/busy": 429, "/slow": 200}.get(self.path, 500)
        if self.path == "/slow":
            time.sleep(SLOW_S)
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"hi")

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _H)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_http(http_server: str) -> None:
    assert probe(CheckSpec("http", url=f"{http_server}/ok")).outcome == "ok"
    assert probe(CheckSpec("http", url=f"{http_server}/busy")).outcome == "warn"
    assert probe(CheckSpec("http", url=f"{http_server}/nope")).outcome == "fail"
    p = probe(CheckSpec("http", url=f"{http_server}/slow", timeout_s=0.3))
    # Gave up at its timeout, not when the answer came: room for a busy machine (issue #16).
    assert p.outcome == "fail" and p.duration_s < SLOW_S - 2


def test_tcp_open_and_closed() -> None:
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen()
    port = lsn.getsockname()[1]
    try:
        assert probe(CheckSpec("tcp", port=port, timeout_s=1)).outcome == "ok"
    finally:
        lsn.close()
    assert probe(CheckSpec("tcp", port=port, timeout_s=1)).outcome == "fail"


def test_process_by_cmdline_word() -> None:
    marker = f"ec2agent-health-marker-{time.monotonic_ns()}"
    spec = CheckSpec("process", name=marker)
    assert probe(spec).outcome == "fail"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    try:
        assert probe(spec).outcome == "ok"
    finally:
        proc.kill()
        proc.wait(10)
    assert probe(spec).outcome == "fail"


def test_command_exit_codes_and_timeout() -> None:
    assert probe(CheckSpec("command", command="true")).outcome == "ok"
    w = probe(CheckSpec("command", command="echo degraded; exit 1"))
    assert (w.outcome, w.output) == ("warn", "exit 1: degraded")
    assert probe(CheckSpec("command", command="exit 2")).outcome == "fail"
    t0 = time.monotonic()
    p = probe(CheckSpec("command", command="sleep 120 & sleep 120; wait", timeout_s=0.5))
    assert p.outcome == "fail" and "timed out" in p.output
    # The whole group was killed, not only the shell (else the pipe stays open for 120 s);
    # the bound leaves a busy machine plenty of room (issue #16).
    assert time.monotonic() - t0 < 60


def test_checker_goes_critical_after_n_failures_then_recovers() -> None:
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    port = lsn.getsockname()[1]
    lsn.close()  # nothing listens yet
    hc = HealthChecker.from_config([{"type": "tcp", "port": port, "timeout_s": 0.5,
                                     "failures_before_critical": 2}])
    assert hc.run()["status"] == "warning"
    assert hc.run()["status"] == "critical"
    lsn = socket.socket()
    lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsn.bind(("127.0.0.1", port))
    lsn.listen()
    try:
        s = hc.run()
        assert s["status"] == "passing"
        assert s["checks"][f"tcp:127.0.0.1:{port}"]["failures"] == 0
    finally:
        lsn.close()


def test_command_whose_output_is_held_open_by_an_escaped_process_returns(
        tmp_path: Path) -> None:
    """``setsid daemon &`` in a check leaves a process outside the check's session holding
    its output pipe. The probe waited for that pipe's end with no bound: the heartbeat
    thread was wedged for as long as that process lived (issue #16). Now the wait after
    the timeout is bounded and the probe returns."""
    pidfile = tmp_path / "escaped.pid"
    cmd = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 300' & echo started"
    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(probe(
        CheckSpec("command", command=cmd, timeout_s=1))), daemon=True)
    t.start()
    try:
        wait_for(pidfile.exists, 60, 0.05, "the escaped process")
        t.join(timeout=120)  # a ceiling on "it returned", not a speed bound
        assert not t.is_alive(), "the probe is wedged on a pipe held by an escaped process"
        p = box[0]
        # The check's own command exited 0: it passed; the output says what happened.
        assert p.outcome == "ok", p
        assert "held open" in p.output
    finally:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 60, 0.05)
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
