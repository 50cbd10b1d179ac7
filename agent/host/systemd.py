"""sd_notify(3) without libsystemd: tell systemd we are ready, alive, or stopping.

Why by hand: the protocol is one datagram on a unix socket, and a C binding (or
the python-systemd package) would be a dependency that AMIs without the dev
headers cannot build. Why it matters: ``ec2-agent.service`` is ``Type=notify``
with ``WatchdogSec=``; systemd only orders dependent units after READY=1 and
restarts a daemon that stops sending WATCHDOG=1, i.e. one that is wedged on a
hung API call rather than dead.

Every function is a no-op returning False when ``NOTIFY_SOCKET`` is unset (not
under systemd: a test, a shell, ``ec2-agent simulate``), and never raises: a
failed notification must not take the agent down; systemd's own timeouts are
the backstop.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _address(raw: str) -> str | bytes | None:
    """Map ``NOTIFY_SOCKET`` to a socket address.

    A leading ``@`` names a Linux abstract-namespace socket, spelled with a NUL
    byte; a path must be absolute. Anything else (systemd also supports
    ``vsock:`` for VMs) is not ours to handle: return None so we do nothing.
    """
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None


def notify(state: str) -> bool:
    """Send one sd_notify message (e.g. ``"READY=1"``); True when it was sent.

    Newline-separated assignments may be combined in one message, as systemd
    accepts them: ``"READY=1\\nSTATUS=configured"``.
    """
    raw = os.environ.get(NOTIFY_SOCKET_ENV)
    if not raw:
        return False
    addr = _address(raw)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """READY=1: boot finished; systemd may now start units ordered after us."""
    msg = "READY=1"
    if status_text:
        msg += "\nSTATUS=" + _one_line(status_text)
    return notify(msg)


def watchdog() -> bool:
    """WATCHDOG=1: the main loop is still turning (send every interval/2)."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """STOPPING=1: we are leaving and backing up; don't count it as a hang."""
    msg = "STOPPING=1"
    if status_text:
        msg += "\nSTATUS=" + _one_line(status_text)
    return notify(msg)


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds if systemd expects pings from *this* process.

    Per sd_watchdog_enabled(3): ``WATCHDOG_USEC`` gives the timeout; when
    ``WATCHDOG_PID`` is set it must be our PID (it may be inherited by a child
    we spawned, which must not ping on our behalf). Callers ping at half this
    value. None when there is no watchdog or the variables are malformed.
    """
    usec = os.environ.get(WATCHDOG_USEC_ENV)
    if not usec:
        return None
    pid = os.environ.get(WATCHDOG_PID_ENV)
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000


def _one_line(text: str) -> str:
    """STATUS must be one line: a newline would start a new assignment."""
    return " ".join(text.split())
