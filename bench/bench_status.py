"""`ec2-agent status` wall time against `cloud-init status` on the same machine. Goal <= 0.34x.

Both are run as operators run them (a fresh process each time), alternating, and
the medians compared. ec2-agent reads a finished boot's state.json from a temp
EC2_AGENT_ROOT; cloud-init reads its own (absent) state on this machine.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.34
TINY = {"repeat": 1}  # python -m bench --tiny: proves it runs, measures nothing


def _time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    return time.perf_counter() - t0


def run(repeat: int = 21) -> dict:
    cloud_init = shutil.which("cloud-init")
    agent = str(Path(sys.executable).with_name("ec2-agent"))
    if not cloud_init:
        return {"skipped": "cloud-init not installed",
                "markdown": "skipped: `cloud-init` is not installed (apt-get install cloud-init)"}
    with tempfile.TemporaryDirectory() as root:
        from agent.host import state as statefile
        from agent.paths import Paths

        statefile.write(Paths(Path(root)).state_file, {
            "status": "done", "instance_id": "i-0123456789abcdef0", "group": "web",
            "boot_kind": "first",
            "phases": [{"name": n, "status": "ok", "duration_s": 0.01} for n in
                       ("identity", "userdata", "config", "pull", "restore", "render",
                        "register")],
            "errors": [],
        })
        env = dict(os.environ, EC2_AGENT_ROOT=root)
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(2):  # warm the page cache for both
            _time([agent, "status"], env)
            _time([cloud_init, "status"], env)
        for _ in range(repeat):
            ours.append(_time([agent, "status"], env))
            theirs.append(_time([cloud_init, "status"], env))
    m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
    ratio = m_ours / m_theirs
    md = (
        "## `ec2-agent status` vs `cloud-init status` (`bench/bench_status.py`)\n\n"
        f"Median of {repeat} runs each, alternating, fresh processes.\n\n"
        "| command | median | min | max |\n|---|---|---|---|\n"
        f"| `ec2-agent status` | {m_ours * 1000:.1f} ms | {min(ours) * 1000:.1f} ms | "
        f"{max(ours) * 1000:.1f} ms |\n"
        f"| `cloud-init status` (baseline) | {m_theirs * 1000:.1f} ms | "
        f"{min(theirs) * 1000:.1f} ms | {max(theirs) * 1000:.1f} ms |\n\n"
        f"Ratio: **{ratio:.2f}x** (goal <= {GOAL}x): "
        f"{'met' if ratio <= GOAL else 'NOT met'}.\n"
    )
    return {"ratio": ratio, "ours_s": m_ours, "baseline_s": m_theirs, "goal": GOAL,
            "met": ratio <= GOAL, "markdown": md}


if __name__ == "__main__":
    print(run()["markdown"])
