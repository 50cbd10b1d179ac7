"""Fleet rehearsal: N real agent processes on the embedded cloud, and a hand to hurt them.

``Fleet`` sits on ``EmbeddedCloud`` (one moto server, one IMDS emulator, a root dir
per instance) and adds what a chaos test needs:

* the network: every agent reaches moto through a loopback ``TcpProxy`` the test
  controls (one shared, plus one per instance on demand), so "the API is down" or
  "this instance is cut off" is one ``set_mode`` away;
* the image: a launcher thread plays what the AMI does on a real instance. When the
  group gets an instance it has not seen (its ASG's, or EC2 instances tagged
  ``ec2-agent:group`` in pending/running), it serves the instance's IMDS identity
  and boots, then runs, an agent on it. ``launcher_mode`` "none" leaves new
  instances without an agent, "broken" boots them with a config that cannot work:
  a replacement that never heartbeats;
* moto's gaps, filled by a reconciler only where a test asks for it: moto records
  ``SetInstanceHealth Unhealthy`` but its ASG never replaces the instance, so the
  reconciler plays the ASG (terminate without decrement, which moto does relaunch);
* the faults: kill -9, SIGSTOP/SIGCONT, terminate in EC2, restart an agent;
* the numbers: a timeline of what happened with times (the harness's own acts and
  what a poller sees in the store: stale members, suspicions, freezes, leases,
  actions, replacements booted), and replacement counts from the store and from
  the cloud.

The test side talks to moto directly, never through the proxies, so its view is
unaffected by the faults it injects. Every process and thread it starts it stops
(``stop``), processes by PID.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.sim.cloud import EmbeddedCloud, cloud_config
from agent.sim.netutil import stop_process
from agent.sim.proxy import TcpProxy

GROUP_TAG = "ec2-agent:group"
BOOT_DEADLINE_S = 120.0
# The harness's own ceiling on a boot process: above the agent's deadline, so the verdict
# on a slow boot is the agent's (its exit code), never the harness killing it.
BOOT_CEILING_S = BOOT_DEADLINE_S + 180.0


def fast_config(cloud: EmbeddedCloud, group: str, *, interval_s: float = 1.0,
                dead_after_s: float = 3.0, heal: dict[str, Any] | None = None,
                **extra: Any) -> dict[str, Any]:
    """The agent config for rehearsals: intervals shortened, heal as given.

    The boot deadline is not shortened: it is the product default (120 s), because a
    rehearsal boots many agents at once on a small, often busy machine, and a deadline
    sized for a quiet one fails boots that are merely slow (issue #16). A test about
    the boot deadline sets its own.
    """
    h = {"mode": "armed", "action": "launch", "grace_s": 1, "confirm_observers": 2,
         "max_per_window": 10, "window_s": 300, "silent_after_s": 2 * dead_after_s,
         "replace_silent": True}
    h.update(heal or {})
    cfg = cloud.agent_config(
        group, heartbeat={"interval_s": interval_s, "dead_after_s": dead_after_s}, heal=h,
        http={"port": 0, "bind": "127.0.0.1"}, bundle={"refresh_s": 2},
        boot={"deadline_s": BOOT_DEADLINE_S})
    cfg.update(extra)
    return cfg


class FleetCloud(EmbeddedCloud):
    """``EmbeddedCloud`` whose agents reach AWS through an endpoint of the fleet's choosing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_endpoint: str | None = None
        self.endpoints: dict[str, str] = {}

    def agent_env(self, instance_id: str) -> dict[str, str]:
        env = self.instances[instance_id].env(self)
        ep = self.endpoints.get(instance_id) or self.default_endpoint
        if ep:
            env["AWS_ENDPOINT_URL"] = ep
        env.setdefault("AWS_MAX_ATTEMPTS", "2")
        return env

    def spawn(self, instance_id: str, *args: str, log: str | None = None) -> subprocess.Popen:
        inst = self.instances[instance_id]
        logf = open(inst.root / (log or f"{args[0]}.log"), "ab")  # noqa: SIM115
        try:
            p = subprocess.Popen([sys.executable, "-m", "agent.cli", *args],
                                 env=self.agent_env(instance_id), stdout=logf,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            logf.close()
        inst.procs.append(p)
        return p


@dataclass(frozen=True)
class Mark:
    """One line of the timeline: seconds since the fleet started, what, about whom."""

    t: float
    kind: str
    member: str = ""
    detail: str = ""

    def line(self) -> str:
        return f"{self.t:7.2f}s  {self.kind:<18} {self.member:<20} {self.detail}"


@dataclass
class Agent:
    instance_id: str
    proc: subprocess.Popen | None = None
    boot_code: int | None = None
    replacement: bool = False
    killed: bool = False


@dataclass
class Fleet:
    """A group of agent processes on a ``FleetCloud``; see the module docstring."""

    cloud: FleetCloud
    group: str = "web"
    asg: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    launcher_mode: str = "agent"  # agent | none | broken
    reconcile: bool = False
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.agents: dict[str, Agent] = {}
        self.timeline: list[Mark] = []
        self.proxy = TcpProxy.to_url(self.cloud.moto.url, name="shared").start()
        self.cloud.default_endpoint = self.proxy.url
        self.own_proxies: dict[str, TcpProxy] = {}
        self.known: set[str] = set()
        self.launched: list[str] = []
        self.reconciled: list[str] = []
        self.user_data = b""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._seen_events: set[str] = set()
        self._seen_leases: set[str] = set()
        self._seen_susp: set[str] = set()
        self._stale: set[str] = set()
        self._lease_bodies: dict[str, tuple[str, dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        from agent.aws.store import Store

        self.store = Store(self.cloud.bucket, self.cloud.prefix, client=self.cloud.client("s3"))

    # -- timeline -------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, kind: str, member: str = "", detail: str = "") -> Mark:
        m = Mark(round(self.now(), 2), kind, member, detail)
        with self._lock:
            self.timeline.append(m)
        return m

    def marks(self, kind: str) -> list[Mark]:
        with self._lock:
            return [m for m in self.timeline if m.kind == kind]

    def timeline_text(self) -> str:
        with self._lock:
            return "\n".join(m.line() for m in sorted(self.timeline, key=lambda m: m.t))

    # -- start / stop ---------------------------------------------------------------------------
    def start(self, n: int, *, wait: bool = True, timeout: float = 180.0,
              own_proxy: int = 0) -> list[str]:
        """Create the group, boot and run an agent on each of ``n`` instances.

        ``own_proxy``: the first that many instances reach AWS through a proxy of their
        own (passing for now), so a test can cut one off alone (``isolate``).
        """
        self.user_data = cloud_config(self.config)
        if self.asg:
            ids = self.cloud.create_asg(self.group, n, self.config)
        else:
            ids = self.cloud.run_standalone(self.group, n, self.config)
        self.known.update(ids)
        for iid in ids[:own_proxy]:
            self.isolate(iid, "pass")
        self.mark("group", "", f"{'asg' if self.asg else 'standalone'} of {n}")
        codes = self.cloud.boot_all(ids, timeout=BOOT_CEILING_S)
        for iid in ids:
            self.agents[iid] = Agent(iid, boot_code=codes[iid])
        bad = {i: c for i, c in codes.items() if c != 0}
        if bad:
            raise RuntimeError(f"boot failed: {bad}; see {self.cloud.workdir}/<id>/boot.log")
        for iid in ids:
            self.run_agent(iid)
        self._spawn_thread("launcher", self._launcher)
        self._spawn_thread("poller", self._poller)
        if self.reconcile:
            self._spawn_thread("reconciler", self._reconciler)
        if wait:
            self.wait(lambda: len(self.ready()) >= n, timeout, f"{n} ready members")
        self.mark("ready", "", f"{len(self.ready())} ready")
        return ids

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)
        procs = [p for inst in self.cloud.instances.values() for p in inst.procs]
        procs += [a.proc for a in self.agents.values() if a.proc is not None]
        live = {p.pid: p for p in procs if p.poll() is None}
        for pid in live:  # all at once: each leaves and takes its final backup in parallel
            for sig in (signal.SIGCONT, signal.SIGTERM):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        for p in live.values():
            stop_process(p)  # waits; SIGKILL after its timeout
        self.proxy.stop()
        for p in self.own_proxies.values():
            p.stop()

    def _spawn_thread(self, name: str, fn: Callable[[], None]) -> None:
        t = threading.Thread(target=self._guard, args=(name, fn), name=f"fleet-{name}",
                             daemon=True)
        t.start()
        self._threads.append(t)

    def _guard(self, name: str, fn: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                fn()
            except Exception as exc:  # a harness hiccup (moto busy) must not end the rehearsal
                self.mark("harness-error", "", f"{name}: {type(exc).__name__}: {exc}"[:200])
            self._stop.wait(self.poll_s)

    # -- agents ---------------------------------------------------------------------------------
    def run_agent(self, iid: str) -> subprocess.Popen:
        p = self.cloud.spawn(iid, "run")
        a = self.agents.setdefault(iid, Agent(iid))
        a.proc, a.killed = p, False
        return p

    def pid(self, iid: str) -> int:
        p = self.agents[iid].proc
        assert p is not None, f"{iid} runs no agent"
        return p.pid

    def kill(self, iid: str) -> None:
        """kill -9: no leave, no final backup; the record just stops changing."""
        a = self.agents[iid]
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(timeout=10)
        a.killed = True
        self.mark("kill -9", iid, f"pid {a.proc.pid}")

    def sigstop(self, iid: str) -> None:
        os.kill(self.pid(iid), signal.SIGSTOP)
        self.mark("SIGSTOP", iid)

    def sigcont(self, iid: str) -> None:
        os.kill(self.pid(iid), signal.SIGCONT)
        self.mark("SIGCONT", iid)

    def sigterm(self, iid: str, timeout: float = 30.0) -> int:
        a = self.agents[iid]
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGTERM)
        code = a.proc.wait(timeout=timeout)
        self.mark("SIGTERM", iid, f"exit {code}")
        return code

    def restart(self, iid: str) -> None:
        self.run_agent(iid)
        self.mark("restart", iid)

    def terminate_instance(self, iid: str) -> None:
        self.cloud.client("ec2").terminate_instances(InstanceIds=[iid])
        self.mark("ec2 terminate", iid)

    def cli(self, iid: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """``ec2-agent <args>`` as that instance (through its network path)."""
        return subprocess.run([sys.executable, "-m", "agent.cli", *args],
                              env=self.cloud.agent_env(iid), capture_output=True, text=True,
                              timeout=timeout, check=False)

    def isolate(self, iid: str, mode: str = "blackhole") -> TcpProxy:
        """Give ``iid`` its own proxy (takes effect when its agent next starts)."""
        p = self.own_proxies.get(iid)
        if p is None:
            p = TcpProxy.to_url(self.cloud.moto.url, name=f"own-{iid}").start()
            self.own_proxies[iid] = p
            self.cloud.endpoints[iid] = p.url
        p.set_mode(mode)
        self.mark(f"net {mode}", iid)
        return p

    def outage(self, mode: str = "blackhole") -> None:
        self.proxy.set_mode(mode)
        self.mark(f"api {mode}" if mode != "pass" else "api restored")

    # -- the image (launcher) and the ASG where moto falls short (reconciler) ---------------------
    def group_instances(self) -> set[str]:
        ec2 = self.cloud.client("ec2")
        resp = ec2.describe_instances(Filters=[
            {"Name": f"tag:{GROUP_TAG}", "Values": [self.group]},
            {"Name": "instance-state-name", "Values": ["pending", "running"]}])
        return {i["InstanceId"] for r in resp["Reservations"] for i in r["Instances"]}

    def _launcher(self) -> None:
        new = sorted(self.group_instances() - self.known)
        for iid in new:
            self.known.add(iid)
            self.launched.append(iid)
            self.mark("launched", iid, f"new instance in the group; launcher: {self.launcher_mode}")
            if self.launcher_mode == "none":
                continue
            threading.Thread(target=self._boot_new, args=(iid,), daemon=True,
                             name=f"boot-{iid}").start()

    def _boot_new(self, iid: str) -> None:
        ud = self.user_data
        if self.launcher_mode == "broken":
            broken = dict(self.config, store={"bucket": "no-such-bucket-ec2-agent",
                                              "prefix": "x"})
            ud = cloud_config(broken)
        self.cloud.add_instance(iid, ud)
        self.agents[iid] = Agent(iid, replacement=True)
        code = self.cloud.boot_all([iid], timeout=BOOT_CEILING_S)[iid]
        self.agents[iid].boot_code = code
        if code != 0 or self._stop.is_set():
            self.mark("boot failed", iid, f"exit {code}")
            return
        self.run_agent(iid)
        self.mark("booted", iid, "agent running")

    def _reconciler(self) -> None:
        asg = self.cloud.client("autoscaling")
        for a in asg.describe_auto_scaling_instances()["AutoScalingInstances"]:
            if (a["AutoScalingGroupName"] == self.group and a["HealthStatus"] == "Unhealthy"
                    and a["LifecycleState"] == "InService"
                    and a["InstanceId"] not in self.reconciled):
                self.reconciled.append(a["InstanceId"])
                asg.terminate_instance_in_auto_scaling_group(
                    InstanceId=a["InstanceId"], ShouldDecrementDesiredCapacity=False)
                self.mark("reconciler", a["InstanceId"],
                          "moto gap: Unhealthy -> terminate without decrement (ASG relaunches)")

    # -- what the store says ----------------------------------------------------------------------
    def members(self) -> dict[str, float]:
        """Every member record's age on the store's clock (one LIST, no GETs: moto is busy)."""
        from agent.group.peers import members_prefix

        listing = self.store.list(members_prefix(self.group))
        return {e.key.rsplit("/", 1)[-1].removesuffix(".json"):
                listing.store_now - e.last_modified for e in listing.entries}

    def dead_after(self) -> float:
        return float(self.config.get("heartbeat", {}).get("dead_after_s", 30))

    def ready(self) -> list[str]:
        """Members with a fresh record (younger than dead_after) whose agent says ready."""
        out = []
        for m, age in self.members().items():
            if age >= self.dead_after():
                continue
            inst = self.cloud.instances.get(m)
            st = (inst.state() if inst is not None else None) or {}
            if (st.get("membership") or {}).get("state", "ready") == "ready":
                out.append(m)
        return sorted(out)

    def wait_ready(self, ids: Iterable[str], timeout: float = 30.0, *,
                   exactly: bool = False) -> None:
        """Wait until every one of ``ids`` is ready (``exactly``: and nobody else is).

        What a test means by "still a ready member" after a hold: a member that was exiled or
        left never comes back, while a live one whose record a loaded machine let age past
        dead_after for a moment is fresh again within an interval or two. One instantaneous
        look would fail in that moment (every record went stale at once on a busy machine).
        """
        want = sorted(set(ids))

        def ok() -> bool:
            ready = self.ready()
            return ready == want if exactly else set(want) <= set(ready)

        self.wait(ok, timeout, f"{'exactly ' if exactly else ''}{', '.join(want)} ready")

    def leases(self) -> dict[str, dict[str, Any]]:
        """Lease bodies by member, closed ones too (GET only the ones whose ETag changed)."""
        from agent.heal.leases import closed_leases_prefix, leases_prefix

        out = {}
        entries = [*self.store.list(closed_leases_prefix(self.group)).entries,
                   *self.store.list(leases_prefix(self.group)).entries]
        for e in entries:
            m = e.key.rsplit("/", 1)[-1]
            cached = self._lease_bodies.get(m)
            if cached is None or cached[0] != e.etag:
                obj = self.store.get_or_none(e.key)
                if obj is None:
                    continue
                cached = (e.etag, json.loads(obj.body))
                self._lease_bodies[m] = cached
            out[m] = cached[1]
        return out

    def actions(self) -> list[dict[str, Any]]:
        """Every heal action taken (events of kind heal-action), oldest first."""
        self._poll_events()
        with self._lock:
            return [e for e in self.events if e["kind"] == "heal-action"]

    def event_kinds(self) -> dict[str, int]:
        self._poll_events()
        out: dict[str, int] = {}
        with self._lock:
            for e in self.events:
                out[e["kind"]] = out.get(e["kind"], 0) + 1
        return out

    def replacements(self) -> dict[str, Any]:
        """Replacement counts three ways: leases acted on, action events, the cloud's view."""
        leases = self.leases()
        acted = {m: lz for m, lz in leases.items() if lz.get("state") in ("acted", "done",
                                                                            "failed")}
        return {"leases": len(leases), "acted_leases": len(acted),
                "actions": len(self.actions()), "launched": len(self.launched),
                "terminated": len(self.terminated_in_ec2()), "reconciled": len(self.reconciled),
                "members": sorted(acted)}

    def terminated_in_ec2(self) -> list[str]:
        resp = self.cloud.client("ec2").describe_instances(Filters=[
            {"Name": f"tag:{GROUP_TAG}", "Values": [self.group]},
            {"Name": "instance-state-name", "Values": ["shutting-down", "terminated"]}])
        return sorted(i["InstanceId"] for r in resp["Reservations"] for i in r["Instances"])

    def state(self, iid: str) -> dict[str, Any]:
        return self.cloud.instances[iid].state() or {}

    def heal_state(self, iid: str) -> dict[str, Any]:
        return dict(self.state(iid).get("heal") or {})

    # -- the poller: what the store shows, onto the timeline --------------------------------------
    def _poll_events(self) -> None:
        from agent.group.events import events_prefix

        listing = self.store.list(events_prefix(self.group))
        for e in sorted(listing.entries, key=lambda e: e.key):
            with self._lock:
                if e.key in self._seen_events:
                    continue
                self._seen_events.add(e.key)
            obj = self.store.get_or_none(e.key)
            if obj is None:
                continue
            try:
                ev = json.loads(obj.body)
            except ValueError:
                continue
            ev["t"] = round(float(ev.get("time", 0)) - self.wall0, 2)
            with self._lock:
                self.events.append(ev)
                self.events.sort(key=lambda x: x["t"])
            kind = ev.get("kind", "")
            if kind.startswith(("heal-", "leave", "pause", "resume")):
                why = "; ".join(ev.get("reasons") or [])
                det = ev.get("details") or {}
                if kind == "heal-action":
                    why = f"{det.get('action', '')}: {det.get('detail', '')}"
                with self._lock:
                    self.timeline.append(Mark(ev["t"], kind, ev.get("member", ""),
                                              f"by {ev.get('actor', '')}: {why}"[:160]))

    def _poller(self) -> None:
        from agent.heal.leases import suspicions_prefix

        dead_after = self.dead_after()
        for mid, age in self.members().items():
            stale = age >= dead_after
            if stale and mid not in self._stale:
                self._stale.add(mid)
                self.mark("stale", mid, f"record {age:.1f}s old (store clock)")
            elif not stale and mid in self._stale:
                self._stale.discard(mid)
                self.mark("fresh again", mid)
        for e in self.store.list(suspicions_prefix(self.group)).entries:
            if e.key not in self._seen_susp:
                self._seen_susp.add(e.key)
                member, observer = e.key.rsplit("/", 2)[-2:]
                self.mark("suspicion", member, f"by {observer}")
        for mid in self.leases():
            if mid not in self._seen_leases:
                self._seen_leases.add(mid)
                self.mark("lease", mid)
        self._poll_events()

    # -- waiting --------------------------------------------------------------------------------
    def wait(self, pred: Callable[[], Any], timeout: float, what: str, step: float = 0.25) -> Any:
        end = time.monotonic() + timeout
        last_exc: Exception | None = None
        while time.monotonic() < end:
            try:
                v = pred()
                if v:
                    return v
            except Exception as exc:  # moto briefly busy: try again
                last_exc = exc
            time.sleep(step)
        raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} "
                           f"(last error: {last_exc})\n{self.timeline_text()}")

    def hold(self, seconds: float) -> None:
        time.sleep(seconds)

    def running(self) -> list[str]:
        return sorted(i for i, a in self.agents.items()
                      if a.proc is not None and a.proc.poll() is None)

    def calm(self, timeout: float = 120.0) -> None:
        """Every running agent has stepped its heal controller and is neither fresh nor frozen."""
        def ok() -> bool:
            hs = [self.heal_state(i) for i in self.running()]
            return bool(hs) and all(h.get("last_step") and not h.get("frozen") for h in hs)

        self.wait(ok, timeout, "every observer watching, nothing frozen")
        self.mark("calm", "", f"{len(self.running())} observers watching")

    def log_tail(self, iid: str, name: str = "run.log", n: int = 30) -> str:
        p = Path(self.cloud.instances[iid].root) / name
        try:
            return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""
