"""Boot-to-ready under real systemd and cloud-init (``tests/realboot``), for docs/benchmarks.md.

Runs the real-boot test once, in a network namespace with only ``lo`` (as ``make test``
does), and reads the figures it writes to ``$EC2_AGENT_REALBOOT_REPORT``. Needs root and
``make image-cache`` (the Debian root filesystem and the wheelhouse). No ratio here: there
is no in-run baseline for "an EC2 instance boots"; the figure is the time from starting
the container to ``ec2-agent.service`` active (READY=1, after the first heartbeat),
cloud-init's whole run and the agent's boot included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "realboot.json"
        env = {**os.environ, "EC2_AGENT_REALBOOT_REPORT": str(report)}
        cmd = ["unshare", "-n", "sh", "-c",
               f"ip link set lo up && exec {sys.executable} -m pytest -p no:xdist -q "
               "-p no:cacheprovider tests/realboot"]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=900, stdin=subprocess.DEVNULL, check=False)
        if res.returncode != 0 or not report.exists():
            raise RuntimeError(f"tests/realboot did not run (exit {res.returncode}):\n"
                               f"{res.stdout[-3000:]}{res.stderr[-2000:]}")
        t = json.loads(report.read_text())
    rows = [
        ("boot-to-ready: container start -> `ec2-agent.service` active", t["boot_to_ready_s"]),
        ("  of which `ec2-agent-boot.service` (identity ... register)", t["agent_boot_s"]),
        ("cloud-init `done` (from container start)", t["cloud_init_done_s"]),
        ("reboot: container start -> `ec2-agent.service` active", t["reboot_to_ready_s"]),
        ("watchdog: SIGSTOP -> a new daemon active (WatchdogSec=30, RestartSec=5)",
         t["watchdog_s"]),
        ("the whole test (bake, first boot, watchdog, reboot, stop)", t["total_s"]),
    ]
    table = "\n".join(f"| {name} | {value:.2f} s |" for name, value in rows)
    markdown = f"""## Boot under real systemd and cloud-init (`bench/bench_realboot.py`)

One run of `tests/realboot` (Debian 12 under `systemd-nspawn --boot`, systemd as PID 1,
cloud-init 22.4 with the Ec2 datasource on the IMDS emulator, units installed by
`packaging/install.sh` but enabled by the shipped cloud-config). A figure, not a ratio:
on this machine, shared, no baseline in the same run.

| measure | time |
|---|---|
{table}
"""
    return {"markdown": markdown,
            "summary": f"boot-to-ready {t['boot_to_ready_s']:.2f} s; {json.dumps(t)}"}
