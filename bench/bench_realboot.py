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
# python -m bench --tiny: nothing smaller to run; the real boot is tests/realboot, itself in
# make test (this bench only times one run of it)
TINY_SKIP = "the real boot is tests/realboot itself, which make test runs"


def run() -> dict[str, Any]:
    load_before = os.getloadavg()[0]
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
    load_after = os.getloadavg()[0]
    rows = [
        ("boot-to-ready: container start -> `ec2-agent.service` active", t["boot_to_ready_s"]),
        ("  of which `ec2-agent-boot.service` (identity ... register)", t["agent_boot_s"]),
        ("cloud-init `done` (from container start)", t["cloud_init_done_s"]),
        ("reboot (units enabled now): container start -> `ec2-agent.service` active",
         t["reboot_to_ready_s"]),
        ("watchdog: SIGSTOP -> a new daemon active (killed <= WatchdogSec=30 after its last "
         "ping, restarted RestartSec=5 later)", t["watchdog_s"]),
        ("the whole test (bake, first boot, watchdog, reboot, stop)", t["total_s"]),
    ]
    table = "\n".join(f"| {name} | {value:.2f} s |" for name, value in rows)
    markdown = f"""## Boot under real systemd and cloud-init (`bench/bench_realboot.py`)

One run of `tests/realboot` (Debian 12 under `systemd-nspawn --boot`, systemd as PID 1,
cloud-init 22.4 with the Ec2 datasource on the IMDS emulator, units installed by
`packaging/install.sh` but enabled by the shipped cloud-config, so at the first boot the
agent starts from cloud-final's runcmd, after cloud-init's last stage). A figure, not a
ratio: there is no baseline in the same run. 1-minute load average {load_before:.1f} before,
{load_after:.1f} after (2 cores, shared).

| measure | time |
|---|---|
{table}
"""
    return {"markdown": markdown,
            "summary": f"boot-to-ready {t['boot_to_ready_s']:.2f} s; {json.dumps(t)}"}
