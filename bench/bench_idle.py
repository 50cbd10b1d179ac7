"""Idle `ec2-agent run` with 10 peers: RSS <= 50 MB and CPU <= 1 % of one core.

Eleven real agents (boot, then run, default intervals: heartbeat 10 s, bundle
refresh 30 s) on the embedded cloud; one of them is measured with psutil over a
window after a warm-up: resident memory (max of samples) and CPU time over wall
time. The baseline measured in the same run is an idle Python process that has
imported boto3 and made one S3 client, the floor of any boto3 daemon.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

RSS_GOAL_MB = 50.0
CPU_GOAL = 0.01


def _measure(pid: int, window_s: float, step: float = 1.0) -> tuple[float, float]:
    p = psutil.Process(pid)
    t0 = time.monotonic()
    c0 = sum(p.cpu_times()[:2])
    rss = 0
    while time.monotonic() - t0 < window_s:
        rss = max(rss, p.memory_info().rss)
        time.sleep(step)
    cpu = (sum(p.cpu_times()[:2]) - c0) / (time.monotonic() - t0)
    return rss / 2**20, cpu


def run(peers: int = 10, warmup_s: float = 25.0, window_s: float = 60.0) -> dict:
    from agent.sim.cloud import EmbeddedCloud

    floor = subprocess.Popen([sys.executable, "-c",
                              "import boto3, time; boto3.client('s3', region_name='us-east-1');"
                              " time.sleep(3600)"])
    try:
        with EmbeddedCloud() as cloud:
            cfg = cloud.agent_config("idle", heal={"mode": "armed"})
            ids = cloud.run_standalone("idle", peers + 1, cfg)
            codes = cloud.boot_all(ids, timeout=300)
            procs = {iid: cloud.spawn(iid, "run") for iid in ids}
            time.sleep(warmup_s)
            measured = ids[0]
            rss_mb, cpu = _measure(procs[measured].pid, window_s)
            alive = sum(1 for p in procs.values() if p.poll() is None)
            st = cloud.instances[measured].state() or {}
            seen = len([p for p in st.get("peers", []) if p.get("state") == "ready"])
        floor_rss = psutil.Process(floor.pid).memory_info().rss / 2**20
    finally:
        floor.kill()
        floor.wait()
    met = rss_mb <= RSS_GOAL_MB and cpu <= CPU_GOAL and set(codes.values()) == {0}
    md = (
        "## Idle `ec2-agent run` with 10 peers (`bench/bench_idle.py`)\n\n"
        f"{peers + 1} agents (boot exit codes {sorted(set(codes.values()))}, {alive} daemons "
        f"alive at the end; the measured one saw {seen} ready peers), default intervals, "
        f"{warmup_s:.0f} s warm-up, {window_s:.0f} s window.\n\n"
        "| measure | ec2-agent run | baseline: idle python + boto3 client | goal |\n"
        "|---|---|---|---|\n"
        f"| RSS (max) | {rss_mb:.1f} MB | {floor_rss:.1f} MB ({rss_mb / floor_rss:.2f}x) "
        f"| <= {RSS_GOAL_MB:.0f} MB |\n"
        f"| CPU | {cpu * 100:.2f} % of one core | ~0 % | <= {CPU_GOAL * 100:.0f} % |\n\n"
        f"Goals {'met' if met else 'NOT met'}. The baseline is the floor of any boto3 daemon:"
        " the RSS goal sits at it, so what is left above it is the agent's own imports"
        " (jsonschema, jinja2, its modules) and its threads' arenas.\n"
    )
    return {"rss_mb": rss_mb, "cpu": cpu, "baseline_rss_mb": floor_rss, "met": met,
            "markdown": md}


if __name__ == "__main__":
    print(run()["markdown"])
