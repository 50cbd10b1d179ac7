"""Simulation speed: simulated member-hours per wall-clock second (issue #11).

For N = 100, 1,000 and 10,000 members, ``agent.sim.fleetsim`` runs the calm profile
for a fixed number of member-hours. The baseline, measured in the same run, is the
same agents' same steps (heartbeat, watch, heal: ``agent.daemon.tasks.MemberTasks``) called
round-robin in a plain loop on one fake clock against the bare twins: no event
queue, no greenlets, no fault layer, no invariant checks. The ratio is what the
simulator costs on top of the agent's own code; a profile of the N = 100 run says
where the time goes. One core (the simulation is single-threaded).
"""

from __future__ import annotations

import cProfile
import gc
import json
import logging
import pstats
import random
import resource
import time
from dataclasses import dataclass
from typing import Any

# (members, simulated hours). Short spans: every run starts cold (each member's first full
# LIST, then up to 100 GETs a tick until it has read every record once: N^2 GETs in all),
# which dominates a short run; at N = 10,000 only the first seconds fit (measured 2026-12-01).
SIZES = ((100, 0.25), (1000, 0.05), (10000, 0.001))
# Warm windows, what a long run costs once started: (members, from h, to h, profile); the
# rate counts only the CPU between the two virtual times (one run, measured inside it).
WARM = ((1000, 0.05, 0.1, "calm"), (1000, 0.05, 0.1, "everything"),
        (1000, 0.2, 0.3, "everything"))  # later: the first deaths' replacements are done
# What bounds the rate: the agent's own steps, warm, in the bare loop: (members, simulated
# seconds before, simulated seconds measured); the measured span holds every member's LIST.
BARE = (1000, 600.0, 600.0)
TINY = {"sizes": ((20, 0.01),), "profile_hours": 0.01,  # python -m bench --tiny: runs only
        "warm": ((20, 0.005, 0.01, "everything"),), "bare": (20, 60.0, 310.0)}
BEFORE = (
    "Before issue #11's speed work (main at beab8c0, same spans, same machine, 2026-12-01): "
    "N = 100, 0.25 h: 4.18 member-h per CPU-s; N = 1,000, 0.05 h: 0.35 member-h per CPU-s "
    "(141.8 CPU-s, max RSS 1,152 MiB). After session 4 (main at c6db77e, measured back to "
    "back with this session's branches, load 9-20): warm N = 1,000 calm 2.0-2.1 member-h per "
    "CPU-s (max RSS 1,183 MiB, cold start to 0.05 h 65-70 CPU-s). After session 5 (main at "
    "67ab06d, quiet machine): warm N = 1,000 calm 5.79, everything 1.78 (window 0.05-0.1 h); "
    "the 24 h run then also slowed down as it ran, because every lease was kept and every "
    "member LISTed all of them at every step, and every replacement sent all N watchers "
    "to a full LIST (a marker bump by each observer overflowed its change log).")
BASELINE_MAX_N = 1000  # the bare loop is as cold as the simulator: not run above this
NOT_MEASURED = (
    "N = 10,000: only a cold start fits (the row above); a warm 10,000-member hour was not "
    "run. It is bounded by the product's own O(N) reads: each member LISTs the whole group "
    "(10 pages) every 600 s and, once after starting, GETs every record (N^2 GETs for a "
    "fleet that starts together), so it stays far above five minutes on one core. Memory "
    "is not linear in N either: every simulated member keeps its own view of the whole "
    "group (one PeerInfo and one liveness track per member it knows), N^2 in all; the "
    "max RSS column grows accordingly. Measured (session 12, calm, seed 1, RSS after the cold "
    "start): N = 100 48 MiB, 300 101 MiB, 1,000 646 MiB, 3,000 4.7 GiB at 151 simulated seconds "
    "and still growing; about 520 bytes per pair of members, so a 10,000-member run needs about "
    "50 GB, twice this machine's memory.")


def _sim(n: int, hours: float) -> tuple[float, float, Any]:
    """(wall s, CPU s of this process, result): CPU time is what an idle core would take."""
    from agent.sim import fleetsim

    t0, c0 = time.perf_counter(), time.process_time()
    res = fleetsim.run(1, n, hours, "calm", timeline=False)
    return time.perf_counter() - t0, time.process_time() - c0, res


def _warm(n: int, start_h: float, end_h: float, profile: str) -> tuple[float, float, Any]:
    """(cold CPU s to ``start_h``, warm CPU s from ``start_h`` to ``end_h``, result)."""
    from agent.sim.fleetsim import Simulation
    from agent.sim.world import T0

    sim = Simulation(1, n, end_h, profile, timeline=False)
    mark: list[float] = []
    sim.at(T0 + start_h * 3600.0, lambda: mark.append(time.process_time()))
    c0 = time.process_time()
    res = sim.run()
    c1 = time.process_time()
    return mark[0] - c0, c1 - mark[0], res


def _bare_store() -> Any:
    """The real ``Store`` adapter against the bare S3 twin: no simulator, no faults."""
    from agent.aws.store import Store
    from agent.sim.fleetsim import BUCKET, T0
    from agent.sim.twins import S3Twin

    s3 = S3Twin(lambda: T0)
    s3.client().create_bucket(Bucket=BUCKET)
    return Store(BUCKET, "", client=s3.client())


def _call_floor(calls: int = 20_000) -> tuple[float, float]:
    """Microseconds of CPU for one conditional GET through the real ``Store`` adapter against
    the bare S3 twin (no simulator, no faults): (answered 304, answered 200 with a body)."""
    from agent.interfaces import NotModified

    store = _bare_store()
    etag = store.put("k.json", b'{"a": 1}')
    assert isinstance(store.get("k.json", if_none_match=etag), NotModified)
    c0 = time.process_time()
    for _ in range(calls):
        store.get("k.json", if_none_match=etag)
    c1 = time.process_time()
    for _ in range(calls):
        store.get("k.json")
    c2 = time.process_time()
    return (c1 - c0) / calls * 1e6, (c2 - c1) / calls * 1e6


def _fleet(n: int) -> tuple[Any, list[Any]]:
    """N members' real tasks (heartbeat, watch, heal) on one fake clock against the bare
    twins: no event queue, no greenlets, no fault layer, no invariant checks."""
    from agent.aws.cloud import Cloud
    from agent.aws.store import Store
    from agent.clock import FakeClock
    from agent.daemon.tasks import MemberTasks
    from agent.group.heartbeat import Heartbeater
    from agent.group.membership import MemberRecord
    from agent.group.peers import PeerWatcher
    from agent.heal.controller import HealController
    from agent.sim.fleetsim import BUCKET, GROUP, T0, ZONES, sim_config
    from agent.sim.twins import CloudTwin, S3Twin

    clock = FakeClock(now=T0, mono=100.0)
    s3 = S3Twin(clock.time)
    s3.client().create_bucket(Bucket=BUCKET)
    cloud = CloudTwin(clock.time, zones=ZONES)
    ids = cloud.create_group(GROUP, n, sorted(ZONES), state="running")
    config = sim_config(n)
    members = []
    for i, iid in enumerate(ids):
        store = Store(BUCKET, "", client=s3.client())
        rec = MemberRecord(instance_id=iid, group=GROUP, seq=0, state="ready", az="us-east-1a",
                           private_ip=f"10.0.{i >> 8}.{i & 255}",
                           endpoint=f"http://10.0.{i >> 8}.{i & 255}:8080")
        hb = Heartbeater(store, rec, clock=clock, interval_s=10.0, rng=random.Random(i))
        w = PeerWatcher(store, GROUP, iid, clock=clock)
        ctl = HealController(store, Cloud("us-east-1", ec2=cloud.ec2_client(),
                                          autoscaling=cloud.asg_client()),
                             config, iid, clock, watcher=w, probe=lambda _e, timeout_s=2.0: True)
        members.append(MemberTasks(hb, w, ctl))
    return clock, members


def _baseline(n: int, hours: float) -> float:
    """The agents' own steps for the same span, in a bare loop (no simulator)."""
    clock, members = _fleet(n)
    steps = int(hours * 3600 / 10.0)
    c0 = time.process_time()
    for _ in range(steps):
        for m in members:
            m.heartbeat()
            m.watch()
            m.heal()
        clock.advance(10.0)
    return time.process_time() - c0


def _steps(n: int, warm_s: float, span_s: float) -> dict[str, float]:
    """Microseconds of CPU per member-interval of each of the agent's own steps, warm, in
    the bare loop: ``warm_s`` simulated seconds first (every member has LISTed the group
    and read every record), then ``span_s`` measured (every member LISTs in it: the LIST
    is amortized over the intervals). Also one LIST entry's cost (a member's LIST of the
    group, divided by N)."""
    from agent.group.peers import TickReport, list_period_s

    clock, members = _fleet(n)

    def loop(seconds: float) -> dict[str, float]:
        spent = {"heartbeat": 0.0, "watch": 0.0, "heal": 0.0}
        wall = time.perf_counter
        for _ in range(int(seconds / 10.0)):
            for m in members:
                t0 = wall()
                m.heartbeat()
                t1 = wall()
                m.watch()
                t2 = wall()
                m.heal()
                t3 = wall()
                spent["heartbeat"] += t1 - t0
                spent["watch"] += t2 - t1
                spent["heal"] += t3 - t2
            clock.advance(10.0)
        return spent

    loop(warm_s)
    gc.collect()
    c0 = time.process_time()
    spent = loop(span_s)
    cpu = time.process_time() - c0
    intervals = n * int(span_s / 10.0)
    timed = sum(spent.values())
    out = {k: cpu * v / timed / intervals * 1e6 for k, v in spent.items()}
    out["total"] = cpu / intervals * 1e6
    # The best of a few LISTs with the collector off: a lower bound, not a full sweep of
    # this process's heap landing in one of them.
    watcher = members[0].watcher
    gc.collect()
    gc.disable()
    try:
        best = float("inf")
        for _ in range(7):
            c0 = time.process_time()
            watcher._list(TickReport())  # what tick() does when a LIST is due
            best = min(best, time.process_time() - c0)
    finally:
        gc.enable()
    out["list entry"] = best / n * 1e6
    # How often the product LISTs, by the watcher's own settings: this group's pages as
    # LISTed, and a 10,000-member group's 10 pages (S3's pages of 1,000 keys).
    out["list period n"] = list_period_s(watcher.last_pages, watcher.list_s,
                                         watcher.list_pages_per_hour)
    out["list period 10k"] = list_period_s(10, watcher.list_s, watcher.list_pages_per_hour)
    return out


def _member_floor(rounds: int = 20_000, k: int = 3) -> tuple[float, float]:
    """Microseconds of CPU for the least a member does every interval, and nothing else:
    its heartbeat PUT, the change marker's GET (unchanged: 304) and its k watched records'
    GETs (each changed, a watched peer heartbeats every interval: a body), through the real
    ``Store`` adapter against the bare S3 twin: (that I/O alone, that I/O plus the record's
    JSON: the heartbeat record encoded, the k watched records decoded). No validation, no
    liveness, no heal step, no simulator."""
    from agent.group.membership import MemberRecord
    from agent.interfaces import Obj
    from agent.layout import marker_key, member_key
    from agent.sim.fleetsim import GROUP

    store = _bare_store()
    rec = MemberRecord(instance_id="i-0000000000000000", group=GROUP, seq=1, state="ready",
                       az="us-east-1a", private_ip="10.0.0.1", endpoint="http://10.0.0.1:8080")
    body = rec.dumps()
    own = member_key(GROUP, "i-0000000000000000")
    watched = [member_key(GROUP, f"i-{j:016x}") for j in range(1, k + 1)]
    for key in watched:
        store.put(key, body)
    marker = marker_key(GROUP)
    m_etag = store.put(marker, b'{"version": 1, "changes": []}')
    c0 = time.process_time()
    for _ in range(rounds):
        store.put(own, body, content_type="application/json")
        store.get(marker, if_none_match=m_etag)
        for key in watched:
            store.get(key)
    c1 = time.process_time()
    for _ in range(rounds):
        store.put(own, rec.dumps(), content_type="application/json")
        store.get(marker, if_none_match=m_etag)
        for key in watched:
            got = store.get(key)
            assert isinstance(got, Obj)
            json.loads(got.body)
    c2 = time.process_time()
    return (c1 - c0) / rounds * 1e6, (c2 - c1) / rounds * 1e6


def _profile_split(n: int, hours: float) -> dict[str, float]:
    from agent.sim import fleetsim

    prof = cProfile.Profile()
    prof.enable()
    fleetsim.run(2, n, hours, "calm", timeline=False)
    prof.disable()
    st = pstats.Stats(prof)
    buckets = {"simulator (event queue, greenlets, fault layer, checks)": 0.0,
               "twins (S3, EC2, ASG)": 0.0, "agent code and the libraries it calls": 0.0}
    total = 0.0
    for (fname, _, func), (_, _, tt, _, _) in st.stats.items():  # type: ignore[attr-defined]
        total += tt
        if fname.endswith("agent/sim/twins.py"):
            buckets["twins (S3, EC2, ASG)"] += tt
        elif fname.endswith(tuple(f"agent/sim/{m}.py" for m in (
                "fleetsim", "faults", "world", "vtime", "members", "calls", "faultplan",
                "invariants"))) or (
                "greenlet" in func or "heap" in func):
            buckets["simulator (event queue, greenlets, fault layer, checks)"] += tt
        else:
            buckets["agent code and the libraries it calls"] += tt
    return {k: v / total for k, v in buckets.items()}


GOAL_RATE = 80.0  # member-h per CPU-s at N = 1,000 (issue #11)
GOAL_US = 1e6 / (GOAL_RATE * 360)  # CPU per member per 10 s interval at that rate: 34.7 us
GOAL_10K_US = 300.0 / (10_000 * 360) * 1e6  # a 10,000-member hour in 300 s: 83.3 us


@dataclass(frozen=True)
class Bounds:
    """What bounds the rate, in microseconds of CPU per member-interval (10 s)."""

    n: int
    heartbeat: float
    watch: float
    heal: float
    total: float
    list_entry: float  # one entry of a member's LIST of the group, at N = n
    floor: float  # the least store I/O a member makes per interval, no logic
    floor_json: float  # that I/O and the records' JSON
    list_period_n: float  # how often a member LISTs an n-member group (s)
    list_period_10k: float  # how often a member LISTs a 10,000-member group (s)

    @property
    def list_n(self) -> float:
        """A member's LIST of its n-member group, amortized over its intervals."""
        return self.n * self.list_entry / (self.list_period_n / 10.0)

    @property
    def list_10k(self) -> float:
        """A member's LIST of a 10,000-member group, amortized over its intervals."""
        return 10_000 * self.list_entry / (self.list_period_10k / 10.0)

    def markdown(self, g304: float, g200: float, warm_calm: float | None) -> list[str]:
        rate = 1e6 / (self.total * 360)
        warm = (f" The simulator's warm calm rate above is {1e6 / (warm_calm * 360):.0f} us "
                "per member-interval." if warm_calm else "")
        return [
            "### What bounds the rate (measured in the same run)", "",
            f"Goals (issue #11): >= {GOAL_RATE:.0f} member-h per CPU-s at N = 1,000, which "
            f"leaves {GOAL_US:.1f} us of CPU per member per 10 s interval; a 10,000-member "
            f"hour in under five minutes, {GOAL_10K_US:.1f} us. The agent's own steps, warm, "
            f"in the bare loop (no simulator; N = {self.n:,}; the measured span holds every "
            "member's LIST of the group):", "",
            "| per member-interval | us of CPU |", "|---|---|",
            f"| heartbeat: the record's JSON and its PUT | {self.heartbeat:.1f} |",
            "| watch: the change marker, k = 3 watched records (read, parsed, validated), "
            f"liveness, the group's LIST amortized | {self.watch:.1f} |",
            f"| of which the group's LIST, at best ({self.n:,} entries every "
            f"{self.list_period_n:.0f} s, amortized; the entry's cost below) | "
            f"{self.list_n:.1f} |",
            "| heal: an idle step's HEAD; a full step (LISTs of suspicions, control, leases; "
            f"the budget) at least every dead_after_s | {self.heal:.1f} |",
            f"| **the agent's steps** ({rate:.1f} member-h per CPU-s) | **{self.total:.1f}** |",
            "| the least store I/O alone: heartbeat PUT, marker GET (304), 3 watched GETs "
            "(a body), through the real adapter against the bare twin; no JSON, no logic "
            f"({1e6 / (self.floor * 360):.0f} member-h per CPU-s at most) | {self.floor:.1f} |",
            "| the same and the records' JSON: the heartbeat record encoded, the 3 watched "
            f"records decoded ({1e6 / (self.floor_json * 360):.0f} member-h per CPU-s at "
            f"most) | {self.floor_json:.1f} |",
            f"| goal at N = 1,000 | {GOAL_US:.1f} |",
            f"| one entry of a member's LIST of the group (N = {self.n:,}; into its view and "
            f"a liveness row; the best of 7 LISTs) | {self.list_entry:.2f} |",
            "| N = 10,000: that LIST alone, amortized (10 pages every "
            f"{self.list_period_10k:.0f} s, the product's request budget) | "
            f"{self.list_10k:.1f} |",
            f"| goal at N = 10,000 | {GOAL_10K_US:.1f} |", "",
            "One conditional GET through the real store adapter against the bare twin costs "
            f"{g304:.1f} us answered 304 and {g200:.1f} us with a body (same run)." + warm +
            f" The least store I/O a member makes every interval, with nothing done with "
            f"the answers, takes {self.floor / GOAL_US * 100:.0f} % of the N = 1,000 "
            f"budget, and {self.floor_json / GOAL_US * 100:.0f} % with the records' JSON, "
            "before the records are validated, liveness is judged, a heal step is taken or "
            "the simulator schedules anything; the group's LIST, a safety net every "
            f"{self.list_period_n:.0f} s, takes {self.list_n / GOAL_US:.1f} times it on its "
            f"own; the agent's steps take {self.total / GOAL_US:.1f} times the budget. "
            "At N = 10,000 the product's periodic LIST of the group alone takes "
            f"{self.list_10k / GOAL_10K_US:.1f} times that goal's budget, and memory is "
            "N^2 (above). So neither goal can be met by the real agent code on CPython on "
            "one core, whatever the simulator costs: it needs a member that does less per "
            "interval (fewer calls, a smaller record, a LIST shared or sharded), a change to "
            "the product's membership protocol, or a faster interpreter (PyPy: Debian 12's "
            "pypy3 is Python 3.9, the project needs 3.10). Three product costs are already "
            "gone: closed leases leave the LISTed prefix (docs/safety.md, 13); a replacement "
            "is announced on the marker once, not by every observer; and a heal step is "
            "idle (one HEAD instead of the full step's reads) while every member its "
            "observer judges is alive, with a full step at least every dead_after_s "
            "(docs/cost-model.md, healing's reads).",
        ]


def _bounds(n: int, warm_s: float, span_s: float, floor_us: tuple[float, float]) -> Bounds:
    st = _steps(n, warm_s, span_s)
    return Bounds(n, st["heartbeat"], st["watch"], st["heal"], st["total"], st["list entry"],
                  *floor_us, st["list period n"], st["list period 10k"])


def run(sizes: tuple[tuple[int, float], ...] = SIZES,
        profile_hours: float = 0.25,
        warm: tuple[tuple[int, float, float, str], ...] = WARM,
        bare: tuple[int, float, float] = BARE) -> dict[str, str]:
    logging.disable(logging.WARNING)
    rows = []
    summary = []
    for n, hours in sizes:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        wall, cpu, res = _sim(n, hours)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        steps = int(hours * 3600 / 10.0)
        base = _baseline(n, hours) if n <= BASELINE_MAX_N and steps else 0.0
        mh = n * hours
        b_rate, b_ratio = (f"{mh / base:.1f}", f"{base / cpu:.2f}x") if base else ("-", "-")
        rows.append(f"| {n:,} | {hours:g} h | {mh:g} | {wall:.1f} s | {cpu:.1f} s | "
                    f"**{mh / cpu:.2f}** | {b_rate} | {b_ratio} | {res.steps:,} | "
                    f"{res.calls:,} | {max(rss0, rss1) / 1024:.0f} MiB |")
        summary.append(f"N={n}: {mh / cpu:.2f} member-h per CPU-s (baseline {b_rate}); "
                       f"wall {wall:.0f}s")
    warm_rows = []
    warm_rate: dict[str, float] = {}
    for n, start_h, end_h, profile in warm:
        cold, hot, res = _warm(n, start_h, end_h, profile)
        rate = n * (end_h - start_h) / hot
        warm_rate.setdefault(profile, rate)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        warm_rows.append(f"| {n:,} | {profile} | {start_h:g}-{end_h:g} h | {cold:.1f} s | "
                         f"{hot:.1f} s | **{rate:.2f}** | {len(res.violations)} | "
                         f"{rss:.0f} MiB |")
        summary.append(f"warm N={n} {profile}: {rate:.2f} member-h per CPU-s")
        if profile == "everything" and n == 1000 and start_h >= 0.2:
            day = n * 24 / rate
            warm_rows.append(
                f"\nAt that rate `ec2-agent simulate --seed 1 --members 1000 --hours 24 "
                f"--faults everything` needs about {day / 3600:.1f} CPU-hours on one core "
                f"(24,000 member-hours / {rate:.2f}), plus its cold start.")
    split = _profile_split(100, profile_hours)
    tiny = len(sizes) == 1 and sizes[0][0] < 100
    g304, g200 = _call_floor(2_000 if tiny else 20_000)
    bound = _bounds(*bare, floor_us=_member_floor(2_000 if tiny else 20_000))
    summary.append(f"bare-loop member-interval at N={bare[0]}: {bound.total:.0f} us "
                   f"(goal {GOAL_US:.0f} us); least store I/O alone {bound.floor:.0f} us, "
                   f"with JSON {bound.floor_json:.0f} us")
    logging.disable(logging.NOTSET)
    md = ["## Deterministic fleet simulation speed (`bench/bench_sim.py`)", "",
          "Simulated member-hours per second of the simulation's own CPU time (one core; "
          "the machine was shared, so wall time is shown but not used), calm profile. "
          "Baseline: the same agents' same steps (heartbeat, watch, heal) in a bare loop on "
          "one fake clock against the bare twins, no simulator around them (same run).", "",
          "| N | simulated | member-hours | wall | CPU | member-h per CPU-s | baseline | "
          "sim / baseline speed | agent steps | agent calls | max RSS so far |",
          "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
          "Warm windows (the CPU between two virtual times of one run; what a long run "
          "costs per simulated hour once every member has started and read the group):", "",
          "| N | profile | window | CPU to the window | CPU in the window | member-h per "
          "CPU-s | violations | max RSS so far |", "|---|---|---|---|---|---|---|---|",
          *warm_rows, "",
          "Where the time goes (cProfile, N = 100, self time):", "",
          *[f"- {k}: {v * 100:.0f} %" for k, v in split.items()], "",
          NOT_MEASURED, "", BEFORE, "",
          *bound.markdown(g304, g200,
                          warm_rate.get("calm"))]
    return {"markdown": "\n".join(md), "summary": "; ".join(summary)}
