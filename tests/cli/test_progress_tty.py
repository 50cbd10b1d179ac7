"""``ec2-agent backup`` / ``restore`` show progress on a terminal, and only there.

The commands run as real processes: once with a pseudo-terminal as stdout and stderr
(what an operator sees), once with pipes (what a log or systemd sees).
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from agent.cli import main
from agent.data.backup import progress_line
from agent.sim.cloud import EmbeddedCloud, SimInstance


def _in_pty(argv: list[str], env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                            close_fds=True)
    os.close(slave)
    out = b""
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed its side
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode(errors="replace")


def _setup(cloud: EmbeddedCloud, instance: SimInstance) -> Path:
    ud = (b"#cloud-config\nec2_agent:\n  group: web\n  store: {bucket: " + cloud.bucket.encode()
          + b", prefix: " + cloud.prefix.encode() + b"}\n"
          b"  data: [{name: app, path: /var/lib/app, required: false}]\n")
    cloud.imds.host(instance.instance_id).meta.user_data = ud
    data = instance.root / "var/lib/app"
    data.mkdir(parents=True)
    for i in range(30):
        (data / f"f{i}").write_bytes(os.urandom(20_000))
    assert main(["boot"]) == 0
    return data


def test_progress_on_a_terminal_only(cloud: EmbeddedCloud, instance: SimInstance) -> None:
    data = _setup(cloud, instance)
    env = instance.env(cloud)
    cli = [sys.executable, "-m", "agent.cli"]
    code, out = _in_pty([*cli, "backup"], env)
    assert code == 0, out
    assert "\rbackup [####################] 100%" in out and "30/30 files" in out
    assert "MiB/s" in out or "KiB/s" in out
    assert "app: snapshot " in out and "30 files" in out  # the summary

    quiet = subprocess.run([*cli, "backup"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "" and "\r" not in quiet.stdout
    assert "app: snapshot " in quiet.stdout and "30 unchanged files not read" in quiet.stdout

    (data / "f0").write_bytes(b"changed")
    code, out = _in_pty([*cli, "restore", "--force"], env)
    assert code == 0, out
    assert "\rrestore app [####################] 100%" in out and "30/30 files" in out
    assert "app: restored " in out and (data / "f0").stat().st_size == 20_000


def test_progress_line() -> None:
    mid = progress_line("restore app", {"bytes": 3 * 2**20, "total": 4 * 2**20,
                                        "rate": 2**20, "files": 2, "files_total": 3,
                                        "eta_s": 65.0})
    assert mid == ("restore app [###############     ]  75% 3.0 MiB/4.0 MiB  2/3 files"
                   "  1.0 MiB/s  ETA 1m05s")
    end = progress_line("backup", {"bytes": 10, "total": 10, "rate": 5, "files": 1,
                                   "files_total": 1, "eta_s": 0.0})
    assert end.endswith("1/1 files  5 B/s") and "100%" in end
