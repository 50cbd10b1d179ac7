"""`ec2-agent run` as a real process on the emulated cloud: heartbeats, peers, leave on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.aws.store import Store
from agent.sim.cloud import EmbeddedCloud
from agent.sim.fleet import fast_config
from agent.sim.netutil import wait_for


def _fast_config(cloud: EmbeddedCloud, group: str = "web", **extra) -> dict:
    return fast_config(cloud, group, interval_s=0.5, heal={"mode": "off"},
                       bundle={"refresh_s": 1}, **extra)


def _members(cloud: EmbeddedCloud, group: str) -> set[str]:
    store = Store(cloud.bucket, cloud.prefix)
    return {e.key.rsplit("/", 1)[-1].removesuffix(".json")
            for e in store.list(f"groups/{group}/members/").entries}


class _Notifications:
    """Collects sd_notify datagrams on a socket, each with its arrival (monotonic) time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            now = time.monotonic()
            self.got.extend((now, line) for line in data.splitlines())

    def times(self, what: str, since: float = 0.0) -> list[float]:
        return [t for t, line in list(self.got) if line == what and t >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def test_run_heartbeats_sees_peers_and_leaves_on_sigterm(cloud: EmbeddedCloud,
                                                        tmp_path: Path) -> None:
    ids = cloud.run_standalone("web", 3, _fast_config(cloud))
    assert set(cloud.boot_all(ids).values()) == {0}
    assert _members(cloud, "web") == set(ids)
    procs = {iid: cloud.spawn(iid, "run") for iid in ids}
    try:
        def seq(iid: str) -> int:
            st = cloud.instances[iid].state() or {}
            return int(st.get("heartbeat", {}).get("seq", 0))

        start = {iid: seq(iid) for iid in ids}
        wait_for(lambda: all(seq(i) >= start[i] + 3 for i in ids))
        # every agent sees the other two as ready peers
        wait_for(lambda: all(
            {p["id"] for p in (cloud.instances[i].state() or {}).get("peers", [])} >= set(ids)
            - {i} for i in ids))
        victim = ids[0]
        os.kill(procs[victim].pid, signal.SIGTERM)
        assert procs[victim].wait(timeout=30) == 0
        assert victim not in _members(cloud, "web")
        st = cloud.instances[victim].state()
        assert st["membership"]["state"] == "leaving"
        assert all(procs[i].poll() is None for i in ids[1:])
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=30)


def test_run_refuses_before_boot(cloud: EmbeddedCloud) -> None:
    iid = cloud.run_standalone("web", 1, _fast_config(cloud))[0]
    p = cloud.spawn(iid, "run")
    assert p.wait(timeout=60) == 1
    log = (cloud.instances[iid].root / "run.log").read_text()
    assert "boot has not completed" in log


def test_run_serves_health_endpoint_and_notifies_systemd(cloud: EmbeddedCloud,
                                                          tmp_path: Path) -> None:
    iid = cloud.run_standalone("web", 1, _fast_config(cloud))[0]
    assert cloud.boot_all([iid]) == {iid: 0}
    notes = _Notifications(str(tmp_path / "notify.sock"))
    inst = cloud.instances[iid]
    env = inst.env(cloud)
    env.update(NOTIFY_SOCKET=notes.sock.getsockname(), WATCHDOG_USEC="1000000",
               WATCHDOG_PID="")
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "run"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # A generous ceiling: the daemon's start is slow on a busy machine (issue #16).
        ready = wait_for(lambda: notes.times("READY=1"), 120, 0.1, "READY=1")[0]
        wait_for(lambda: notes.times("WATCHDOG=1", ready), 60, 0.1, "WATCHDOG=1 after READY=1")
        store = Store(cloud.bucket, cloud.prefix)
        rec = json.loads(store.get(f"groups/web/members/{iid}.json").body)
        assert rec["endpoint"].startswith("http://127.0.0.1:")
        import urllib.request

        with urllib.request.urlopen(rec["endpoint"] + "/health", timeout=30) as r:
            assert r.status == 200
            assert json.loads(r.read())["status"] == "passing"
    finally:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=30)
        notes.close()


@pytest.mark.parametrize("notice", ["spot", "asg"])
def test_departure_notice_leaves_the_group(cloud: EmbeddedCloud, notice: str) -> None:
    iid = cloud.run_standalone("web", 1, _fast_config(cloud))[0]
    assert cloud.boot_all([iid]) == {iid: 0}
    p = cloud.spawn(iid, "run")
    try:
        wait_for(lambda: int((cloud.instances[iid].state() or {}).get("heartbeat", {})
                          .get("seq", 0)) >= 3)
        meta = cloud.imds.host(iid).meta
        if notice == "spot":
            meta.spot_action = {"action": "terminate", "time": "2026-11-27T00:00:00Z"}
        else:
            meta.target_lifecycle_state = "Terminated"
        wait_for(lambda: iid not in _members(cloud, "web"), timeout=90)
        wait_for(lambda: (cloud.instances[iid].state() or {}).get("membership", {})
              .get("state") == "leaving")
        assert p.poll() is None  # leaving the group is not stopping the services
    finally:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=30)


def test_membership_change_rerenders_peers_after_quiescence(cloud: EmbeddedCloud,
                                                             tmp_path: Path) -> None:
    cfg = _fast_config(cloud, membership={"quiescence_min_s": 1, "quiescence_max_s": 4})
    cloud.ensure_bucket()
    cloud.push_bundle("web", {
        "agent.yaml": (
            "templates:\n"
            "  - src: upstream.conf.j2\n"
            "    dest: /etc/demo/upstream.conf\n"
            "    reload: echo upstream >> \"$EC2_AGENT_ROOT/reloads.log\"\n"
            "  - src: static.conf.j2\n"
            "    dest: /etc/demo/static.conf\n"
            "    reload: echo static >> \"$EC2_AGENT_ROOT/reloads.log\"\n"
        ),
        "upstream.conf.j2": "{% for p in peers %}server {{ p.ip }}; # {{ p.id }}\n{% endfor %}",
        "static.conf.j2": "group {{ group }}\n",
    })
    ids = cloud.run_standalone("web", 2, cfg)
    assert set(cloud.boot_all(ids).values()) == {0}
    procs = [cloud.spawn(i, "run") for i in ids]
    try:
        upstream = cloud.instances[ids[0]].root / "etc/demo/upstream.conf"
        reload_log = cloud.instances[ids[0]].root / "reloads.log"  # the first agent's reloads
        wait_for(lambda: ids[1] in upstream.read_text(), timeout=40)
        reloads_before = reload_log.read_text().split()
        newcomer = cloud.run_standalone("web", 1, cfg)[0]
        assert cloud.boot_all([newcomer]) == {newcomer: 0}
        procs.append(cloud.spawn(newcomer, "run"))
        wait_for(lambda: newcomer in upstream.read_text(), timeout=40)

        def after() -> list[str]:
            return reload_log.read_text().split()[len(reloads_before):]

        # The peers template changed and was reloaded: its reload runs after its file is
        # written, so wait for it (one look right after the file failed with two suites at
        # once, #16). The static one was not touched: its reload would come in the same
        # pass, right after the first.
        wait_for(lambda: "upstream" in after(), timeout=30)
        time.sleep(1.0)
        assert "static" not in after()
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout=30)


def test_outage_keeps_watchdog_alive_and_is_recorded(cloud: EmbeddedCloud,
                                                     tmp_path: Path) -> None:
    """A black-holed store: bounded calls fail, state says so, and systemd keeps its pings.

    The store is reached through a loopback TCP proxy the test controls. During the
    outage the loop must keep progressing (every call has timeouts), so WATCHDOG=1
    keeps coming and the agent is not restarted for the store's sickness; its own
    heartbeat failures are recorded as observer-sick.

    No fixed windows (issue #16: on a busy machine the daemon's start alone took
    longer than the old 4 s window): the test waits for READY=1, for pings, and for
    observer-sick, each with a generous ceiling. What it asserts about time is
    systemd's own rule: no gap between two pings longer than the watchdog timeout.
    The timeout given (6 s) is twice the daemon's ping period (3 s), so a ping may be
    up to 3 s late before the verdict changes; the store calls that fail during the
    outage are bounded at about 1.5 s (the daemon's timeouts for a 0.5 s interval).
    """
    import subprocess
    import sys

    from agent.sim.proxy import TcpProxy

    watchdog_s = 6.0
    iid = cloud.run_standalone("web", 1, _fast_config(cloud))[0]
    assert cloud.boot_all([iid]) == {iid: 0}
    notes = _Notifications(str(tmp_path / "notify.sock"))
    proxy = TcpProxy.to_url(cloud.moto.url).start()
    env = cloud.instances[iid].env(cloud)
    env.update(NOTIFY_SOCKET=notes.sock.getsockname(),
               WATCHDOG_USEC=str(int(watchdog_s * 1e6)), AWS_ENDPOINT_URL=proxy.url)
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "run"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def hb() -> dict:
        return (cloud.instances[iid].state() or {}).get("heartbeat", {})

    try:
        ready = wait_for(lambda: notes.times("READY=1"), 120, 0.1, "READY=1")[0]
        wait_for(lambda: len(notes.times("WATCHDOG=1", ready)) >= 2, 60, 0.1,
                 "two watchdog pings before the outage")
        proxy.set_mode("blackhole")
        t_out = time.monotonic()
        wait_for(lambda: hb().get("observer_sick") is True and hb().get("failures", 0) >= 3,
                 90, 0.2, lambda: f"observer-sick recorded (heartbeat {hb()})")
        # The outage lasts at least three ping periods, so "pings kept coming" means something.
        wait_for(lambda: len(notes.times("WATCHDOG=1", t_out)) >= 3, 90, 0.2,
                 "three watchdog pings during the outage")
        pings = [ready, *notes.times("WATCHDOG=1", ready)]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < watchdog_s, f"watchdog starved during the outage: gaps {gaps}"
        assert p.poll() is None
        proxy.set_mode("pass")
        wait_for(lambda: hb().get("observer_sick") is False, 60, 0.2, "observer-sick cleared")
        assert p.poll() is None
    finally:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=60)
        proxy.stop()
        notes.close()


def test_sigterm_takes_the_final_backup_after_leaving(cloud: EmbeddedCloud) -> None:
    from agent.data.backup import latest_snapshot, load_manifest

    cfg = _fast_config(cloud, data=[{"name": "app", "path": "/var/lib/app", "required": False,
                                     "backup_interval_s": 3600}])
    iid = cloud.run_standalone("web", 1, cfg)[0]
    data = cloud.instances[iid].root / "var/lib/app"
    data.mkdir(parents=True)
    (data / "before.txt").write_text("written before boot\n")
    assert cloud.boot_all([iid]) == {iid: 0}
    p = cloud.spawn(iid, "run")
    try:
        wait_for(lambda: int((cloud.instances[iid].state() or {}).get("heartbeat", {})
                          .get("seq", 0)) >= 3)
        (data / "last-words.txt").write_text("written just before the stop\n")
    finally:
        os.kill(p.pid, signal.SIGTERM)
        code = p.wait(timeout=120)
    assert code == 0
    store = Store(cloud.bucket, cloud.prefix)
    assert iid not in _members(cloud, "web")
    snap = latest_snapshot(store, "web", "app")
    assert snap is not None
    files = {f.path for f in load_manifest(store, "web", "app", snap).files}
    assert {"before.txt", "last-words.txt"} <= files
    assert cloud.instances[iid].state()["daemon"]["final_backup"]["ok"] is True
