"""`ec2-agent boot` on the emulated cloud against the floor of any boto3 tool. Goal <= 2x.

The floor is `python -c "import boto3; boto3.client('s3')"`: what any agent written
with boto3 pays before it does anything. The boot is a real one: the embedded
cloud (moto + the IMDSv2 emulator) serves an instance whose user-data carries the
agent's config; each run is a fresh process, on the same instance (a re-run of
the same boot), alternating with the floor, medians compared.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

GOAL = 2.0
TINY = {"repeat": 1}  # python -m bench --tiny: proves it runs, measures nothing


def _time(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=False)
    return time.perf_counter() - t0, r.returncode


def run(repeat: int = 9) -> dict:
    from agent.sim.cloud import EmbeddedCloud

    floor_cmd = [sys.executable, "-c", "import boto3; boto3.client('s3')"]
    boot_cmd = [sys.executable, "-m", "agent.cli", "boot", "-q"]
    # A first boot: no lean botocore data yet (agent/aws/botodata.py; the daemon builds it).
    with EmbeddedCloud(lean_aws_data=False) as cloud:
        iid = cloud.run_standalone("bench", 1)[0]
        env = cloud.instances[iid].env(cloud)
        ours: list[float] = []
        floor: list[float] = []
        codes: set[int] = set()
        for _ in range(repeat):
            t, rc = _time(boot_cmd, env)
            ours.append(t)
            codes.add(rc)
            floor.append(_time(floor_cmd, env)[0])
        st = cloud.instances[iid].state() or {}
    phases = ", ".join(p["name"] for p in st.get("phases", []))
    m_ours, m_floor = statistics.median(ours), statistics.median(floor)
    ratio = m_ours / m_floor
    md = (
        "## `ec2-agent boot` vs the boto3 floor (`bench/bench_boot.py`)\n\n"
        f"Median of {repeat} runs each, alternating, fresh processes; boot phases: {phases}; "
        f"boot exit codes seen: {sorted(codes)}; botocore's full data, as on a first boot."
        "\n\n"
        "| command | median | min | max |\n|---|---|---|---|\n"
        f"| `ec2-agent boot` | {m_ours * 1000:.0f} ms | {min(ours) * 1000:.0f} ms | "
        f"{max(ours) * 1000:.0f} ms |\n"
        f"| `python -c \"import boto3; boto3.client('s3')\"` (floor) | {m_floor * 1000:.0f} ms "
        f"| {min(floor) * 1000:.0f} ms | {max(floor) * 1000:.0f} ms |\n\n"
        f"Ratio: **{ratio:.2f}x** (goal <= {GOAL}x): {'met' if ratio <= GOAL else 'NOT met'}.\n"
    )
    return {"ratio": ratio, "ours_s": m_ours, "baseline_s": m_floor, "goal": GOAL,
            "met": ratio <= GOAL and codes == {0}, "markdown": md}


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    print(run()["markdown"])
