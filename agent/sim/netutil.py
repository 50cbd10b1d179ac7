"""Loopback and process helpers shared by the emulators, the fleet and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float = 60.0, step: float = 0.1,
             what: str | Callable[[], str] = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy, and return that.

    AssertionError after ``timeout`` s, naming ``what`` (a callable is asked only
    then, for the state worth showing).
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"{what() if callable(what) else what} not met in {timeout}s")


def wait_listening(port: int, timeout: float = 30.0, host: str = LOOPBACK) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def stop_process(p: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a child by its PID: SIGCONT (it may be SIGSTOPped), SIGTERM, then SIGKILL."""
    if p.poll() is not None:
        return
    try:
        os.kill(p.pid, signal.SIGCONT)
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=timeout)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=timeout)
