"""A real ``moto_server`` subprocess on loopback, stopped by its PID.

Used by the test fixtures, ``.ci/run`` and ``ec2-agent simulate``. A separate
process (not a thread) so that a fleet of agent processes talks to it the way
instances talk to AWS, and so that a test can freeze it (SIGSTOP) to play an
API outage.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field

from agent.sim.netutil import LOOPBACK, free_port, stop_process, wait_listening

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


def moto_command(port: int) -> list[str]:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which(
        "moto_server"
    )
    if exe:
        return [exe, "-H", LOOPBACK, "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]


@dataclass
class MotoServer:
    port: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    log_path: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 60.0) -> MotoServer:
        if not self.port:
            self.port = free_port()
        env = dict(os.environ)
        env.update(FAKE_CREDENTIALS)
        env.update(self.extra_env)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                moto_command(self.port), env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        try:
            wait_listening(self.port, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback only
            resp.read()

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): calls hang, as in a sick control plane."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_process(self.proc)
        self.proc = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
