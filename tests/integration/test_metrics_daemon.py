"""Metrics from real agent processes on the emulated cloud (moto + IMDSv2 emulator).

Three instances boot and run ``ec2-agent run``; each serves ``/metrics`` at the
address in its member record. The text is parsed with ``prometheus_client.parser``
(the format Prometheus itself scrapes), never matched as strings. One agent is
killed with SIGKILL; a survivor's metrics must show the dead peer and exactly one
replacement across the group (armed ``launch`` into moto; the lease makes it one).
The boot's textfile (``/var/lib/ec2-agent/metrics.prom``) is checked the same way.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from agent.aws.store import Store
from agent.group.membership import LIVENESS
from agent.sim.cloud import EmbeddedCloud
from agent.sim.fleet import fast_config
from agent.sim.netutil import wait_for

PHASES = ("identity", "userdata", "config", "pull", "restore", "render", "register")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _parse(text: str) -> tuple[Samples, dict[str, str]]:
    """{(sample name, sorted labels): value} and {family name: type}."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def _scrape(url: str) -> tuple[Samples, dict[str, str]]:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:  # noqa: S310 - loopback
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return _parse(r.read().decode())


def _get(s: Samples, name: str, **labels: str) -> float | None:
    return s.get((name, tuple(sorted(labels.items()))))


def _endpoint(cloud: EmbeddedCloud, iid: str) -> str | None:
    obj = Store(cloud.bucket, cloud.prefix).get_or_none(f"groups/web/members/{iid}.json")
    return json.loads(obj.body).get("endpoint") if obj is not None else None


def test_boot_writes_phase_durations_textfile(cloud: EmbeddedCloud) -> None:
    iid = cloud.run_standalone("web", 1, fast_config(cloud, "web"))[0]
    assert cloud.boot_all([iid]) == {iid: 0}
    path = cloud.instances[iid].root / "var/lib/ec2-agent/metrics.prom"
    samples, types = _parse(path.read_text())
    assert types["ec2_agent_boot_phase_duration_seconds"] == "histogram"
    # nothing else (prometheus_client adds a *_created gauge per series, the parser splits it)
    assert set(types) <= {"ec2_agent_boot_phase_duration_seconds",
                          "ec2_agent_boot_phase_duration_seconds_created"}
    st = cloud.instances[iid].state()
    assert st["metrics_textfile"].endswith("var/lib/ec2-agent/metrics.prom")
    for p in st["phases"]:
        name = "ec2_agent_boot_phase_duration_seconds"
        assert _get(samples, name + "_count", phase=p["name"]) == 1
        assert _get(samples, name + "_sum", phase=p["name"]) == p["duration_s"]
        assert _get(samples, name + "_bucket", phase=p["name"], le="+Inf") == 1
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_daemon_serves_metrics_and_counts_a_replacement(cloud: EmbeddedCloud) -> None:
    cfg = fast_config(cloud, "web", heal={"mode": "armed", "action": "launch"})
    ids = cloud.run_standalone("web", 3, cfg)
    assert set(cloud.boot_all(ids).values()) == {0}
    procs = {iid: cloud.spawn(iid, "run") for iid in ids}
    try:
        urls = {iid: wait_for(lambda i=iid: _endpoint(cloud, i), 120.0, 0.2) for iid in ids}
        assert all(u.startswith("http://127.0.0.1:") for u in urls.values())
        survivors, victim = ids[:2], ids[2]

        # Settled: every agent judges its peers alive and has left its restart window.
        def settled(iid: str) -> Samples | None:
            s, _ = _scrape(urls[iid])
            alive = _get(s, "ec2_agent_peers", state="alive") or 0
            return s if alive >= 1 and _get(s, "ec2_agent_heal_frozen") == 0 else None

        s = wait_for(lambda: settled(survivors[0]), 120.0, 0.2)
        _, types = _scrape(urls[survivors[0]])
        assert types["ec2_agent_boot_phase_duration_seconds"] == "histogram"
        assert types["ec2_agent_heartbeat_age_seconds"] == "gauge"
        assert types["ec2_agent_peers"] == "gauge"
        assert types["ec2_agent_heal_frozen"] == "gauge"
        assert types["ec2_agent_replacements"] == "counter"
        assert types["ec2_agent_freezes"] == "counter"
        for phase in PHASES:  # the boot before this daemon, observed once
            assert _get(s, "ec2_agent_boot_phase_duration_seconds_count", phase=phase) == 1
            assert _get(s, "ec2_agent_boot_phase_duration_seconds_sum", phase=phase) >= 0
        age = _get(s, "ec2_agent_heartbeat_age_seconds")
        # An age of a recent beat (interval 1 s), not an absurd value; loose for a busy
        # machine (issue #16), where a beat and the loop that publishes its age are late.
        assert age is not None and 0 <= age < 60
        assert {st for (n, lb), _ in s.items() if n == "ec2_agent_peers"
                for (_, st) in lb} >= set(LIVENESS)  # every state present, 0 when none
        assert _get(s, "ec2_agent_peers", state="dead") == 0
        # The restart window froze it once (observer-fresh), and it lifted.
        assert _get(s, "ec2_agent_freezes_total", reason="observer-fresh") == 1
        assert _get(s, "ec2_agent_freezes_total", reason="mass-death") == 0
        assert _get(s, "ec2_agent_replacements_total", action="launch", result="acted") == 0

        os.kill(procs[victim].pid, signal.SIGKILL)
        procs[victim].wait(timeout=10)

        def replaced() -> list[Samples] | None:
            got = [_scrape(urls[i])[0] for i in survivors]
            acted = sum(_get(x, "ec2_agent_replacements_total", action="launch",
                             result="acted") or 0 for x in got)
            return got if acted >= 1 else None

        dead_seen = wait_for(lambda: any((_get(_scrape(urls[i])[0], "ec2_agent_peers",
                                            state="dead") or 0) >= 1 for i in survivors),
                             120.0, 0.2)
        assert dead_seen
        got = wait_for(replaced, 180, 0.2)
        acted = [_get(x, "ec2_agent_replacements_total", action="launch", result="acted")
                 for x in got]
        assert sorted(acted) == [0, 1]  # one lease, one actor
        time.sleep(3)  # and it stays one
        again = [_get(_scrape(urls[i])[0], "ec2_agent_replacements_total", action="launch",
                      result="acted") for i in survivors]
        assert sorted(again) == [0, 1]
        for x in got:
            assert _get(x, "ec2_agent_heal_frozen") == 0  # 1 of 3 dead is no mass death
            assert 0 <= (_get(x, "ec2_agent_heartbeat_age_seconds") or -1) < 60
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
