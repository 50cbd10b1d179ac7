"""Store requests and bytes per instance-hour with N = 10 / 100 / 1,000 / 10,000 members.

Measured, not computed: a real moto_server on loopback holds N-1 member records
written straight into it (and a change marker that has seen N joins); ONE real
observer (``Heartbeater`` + ``PeerWatcher``, the daemon's per-interval work) runs
360 iterations of the default 10 s interval on an injected clock (a simulated
hour), and ``Store.usage`` counts every request it makes. Its k watched peers keep
heartbeating (through an uncounted client) and one member joins every 10 minutes,
the same churn at every N. The observer's first sight of the group (the LIST and
one GET per record it has not seen, a once-per-lifetime cost) is counted
separately as the join cost.

Goal (issue #4): steady-state requests per instance-hour at N = 10,000 at most
1.2x those at N = 10, and the aggregate rate per prefix within S3's limits
(about 5,500 GET/LIST and 3,500 PUT per second per prefix).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

GOAL_RATIO = 1.2
INTERVAL_S = 10.0
ITERATIONS = 360  # one hour of 10 s intervals
SIZES = (10, 100, 1_000, 10_000)
TINY = {"sizes": (10, 20), "iterations": 6}  # python -m bench --tiny: runs, measures nothing
PRICE_PUT_LIST = 0.005 / 1000  # S3 Standard list prices as of writing (us-east-1)
PRICE_GET_HEAD = 0.0004 / 1000
S3_READS_PER_PREFIX = 5500
S3_WRITES_PER_PREFIX = 3500
BUCKET = "bench-membership"
GROUP = "bench"


def _record(i: int) -> bytes:
    from agent.group.membership import MemberRecord

    return MemberRecord(instance_id=f"i-{i:017x}", group=GROUP, seq=1, state="ready",
                        az=f"az-{i % 3}", private_ip=f"10.{i // 65536 % 256}.{i // 256 % 256}."
                        f"{i % 256}", image_id="ami-bench", agent_version="bench").dumps()


def _populate(client: Any, n_others: int) -> None:
    from agent.group.peers import marker_apply, marker_key, member_key

    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"prod/{member_key(GROUP, f'i-{i:017x}')}",
                          Body=_record(i))

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(put, range(1, n_others + 1)))
    marker: dict[str, Any] = {"version": n_others - 64 if n_others > 64 else 0, "changes": []}
    for i in range(max(1, n_others - 63), n_others + 1):
        marker = marker_apply(marker, {"id": f"i-{i:017x}", "state": "ready", "ip": "10.0.0.1",
                                       "az": "az-0"})
    client.put_object(Bucket=BUCKET, Key=f"prod/{marker_key(GROUP)}",
                      Body=json.dumps(marker).encode())


def _clear(client: Any) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET):
        objs = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objs:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": objs})


def _snapshot(store: Any) -> tuple[dict[str, int], int]:
    u = store.usage
    return dict(u.requests), u.bytes_in + u.bytes_out


def _delta(after: tuple[dict[str, int], int], before: tuple[dict[str, int], int]
           ) -> tuple[dict[str, int], int]:
    ops = {k: v - before[0].get(k, 0) for k, v in after[0].items()}
    return {k: v for k, v in ops.items() if v}, after[1] - before[1]


def measure(n: int, client: Any, iterations: int = ITERATIONS) -> dict[str, Any]:
    from agent.aws.store import Store
    from agent.clock import FakeClock
    from agent.group.heartbeat import Heartbeater
    from agent.group.membership import MemberRecord
    from agent.group.peers import PeerWatcher

    _clear(client)
    t0 = time.perf_counter()
    _populate(client, n - 1)
    populate_s = time.perf_counter() - t0
    clock = FakeClock()
    store = Store(BUCKET, "prod", client=client)
    others = Store(BUCKET, "prod", client=client)  # the rest of the fleet: not counted
    me = MemberRecord(instance_id="i-observer", group=GROUP, seq=0, az="az-0",
                      private_ip="10.255.255.1")
    hb = Heartbeater(store, me, clock=clock, interval_s=INTERVAL_S)
    watcher = PeerWatcher(store, GROUP, "i-observer", clock=clock)
    peers: dict[str, Heartbeater] = {}

    def peer(mid: str) -> Heartbeater:
        if mid not in peers:
            i = int(mid[2:], 16) if mid.startswith("i-") and mid[2:].isalnum() else 0
            rec = MemberRecord.loads(_record(i)) if i else MemberRecord(
                instance_id=mid, group=GROUP, seq=1, state="ready")
            peers[mid] = Heartbeater(others, rec, clock=clock, interval_s=INTERVAL_S)
            peers[mid].announced_state = "ready"
        return peers[mid]

    def iteration(it: int) -> None:
        hb.beat(state="ready")
        watcher.tick()
        for mid in watcher.watching:  # the watched peers are alive: they keep writing
            peer(mid).beat()
        if it and it % 60 == 0:  # one join every 10 minutes, at every N
            Heartbeater(others, MemberRecord(instance_id=f"i-join{it:04d}", group=GROUP, seq=0,
                                             state="ready", private_ip="10.254.0.1"),
                        clock=clock).beat(state="ready")
        clock.advance(INTERVAL_S)

    # join: the first sight of the group, until every record is known
    t0 = time.perf_counter()
    s0 = _snapshot(store)
    it = 0
    while it == 0 or watcher.need_fetch:
        iteration(it)
        it += 1
    join_ops, join_bytes = _delta(_snapshot(store), s0)
    # steady state: one simulated hour
    s1 = _snapshot(store)
    for i in range(iterations):
        iteration(i)
    hour_ops, hour_bytes = _delta(_snapshot(store), s1)
    wall = time.perf_counter() - t0
    per_hour = sum(hour_ops.values())
    writes = hour_ops.get("put", 0) + hour_ops.get("list", 0)  # billed as PUT/LIST class
    reads = per_hour - writes
    dollars_month = (writes * PRICE_PUT_LIST + reads * PRICE_GET_HEAD) * 730
    return {
        "n": n, "requests_per_hour": per_hour, "ops": hour_ops, "bytes_per_hour": hour_bytes,
        "join_requests": sum(join_ops.values()), "join_bytes": join_bytes,
        "join_iterations": it, "list_pages": watcher.last_pages,
        "aggregate_reads_per_s": n * (per_hour - hour_ops.get("put", 0)) / 3600.0,
        "aggregate_puts_per_s": n * hour_ops.get("put", 0) / 3600.0,
        "dollars_per_instance_month": dollars_month,
        "populate_s": round(populate_s, 1), "wall_s": round(wall, 1),
    }


def run(sizes: tuple[int, ...] = SIZES, iterations: int = ITERATIONS) -> dict[str, Any]:
    import boto3

    from agent.sim.moto import FAKE_CREDENTIALS, MotoServer

    os.environ.update(FAKE_CREDENTIALS)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    with MotoServer() as server:
        os.environ["AWS_ENDPOINT_URL"] = server.url
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1",
                              config=Config(max_pool_connections=40,
                                            retries={"mode": "standard", "max_attempts": 3}))
        client.create_bucket(Bucket=BUCKET)
        rows = [measure(n, client, iterations) for n in sizes]
    base, top = rows[0], rows[-1]
    ratio = top["requests_per_hour"] / base["requests_per_hour"]
    within = (top["aggregate_reads_per_s"] <= S3_READS_PER_PREFIX
              and top["aggregate_puts_per_s"] <= S3_WRITES_PER_PREFIX)
    met = ratio <= GOAL_RATIO and within
    lines = [
        "## Membership: store requests per instance-hour (issue #4)",
        "",
        f"One real observer (heartbeat + watch loop), {iterations} iterations of the "
        f"{INTERVAL_S:g} s interval on an injected clock, against moto_server holding N records; "
        "requests counted by `Store.usage`. k = 3 watched peers keep heartbeating; one member "
        "joins every 10 minutes at every N. Steady state, per instance-hour:",
        "",
        "| N | requests/h | PUT | GET (mostly 304) | LIST pages | bytes/h | $/instance-month "
        "| aggregate reads/s | aggregate PUT/s | join: requests (once) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o = r["ops"]
        lines.append(
            f"| {r['n']:,} | {r['requests_per_hour']:,} | {o.get('put', 0):,} | "
            f"{o.get('get', 0) + o.get('head', 0):,} | {o.get('list', 0):,} | "
            f"{r['bytes_per_hour'] / 1e3:,.0f} kB | ${r['dollars_per_instance_month']:.3f} | "
            f"{r['aggregate_reads_per_s']:,.0f} | {r['aggregate_puts_per_s']:,.0f} | "
            f"{r['join_requests']:,} |")
    lines += [
        "",
        f"Ratio N={top['n']:,} / N={base['n']:,}: **{ratio:.3f}x** (goal <= {GOAL_RATIO}x); "
        f"aggregate at N={top['n']:,}: {top['aggregate_reads_per_s']:,.0f} reads/s and "
        f"{top['aggregate_puts_per_s']:,.0f} PUT/s per prefix (S3: ~{S3_READS_PER_PREFIX:,} "
        f"and {S3_WRITES_PER_PREFIX:,}). Goal {'met' if met else 'NOT met'}.",
        "Prices: S3 Standard list prices as of writing (PUT/LIST $0.005, GET $0.0004 per "
        "1,000). The join cost is paid once per instance lifetime (LIST + one GET per record).",
    ]
    summary = (f"membership: {base['requests_per_hour']:,} -> {top['requests_per_hour']:,} "
               f"requests/instance-hour from N={base['n']:,} to N={top['n']:,} "
               f"({ratio:.3f}x, goal <= {GOAL_RATIO}x): {'met' if met else 'NOT met'}")
    return {"rows": rows, "ratio": ratio, "met": met, "summary": summary,
            "markdown": "\n".join(lines)}


if __name__ == "__main__":
    import sys

    sizes = tuple(int(a) for a in sys.argv[1:]) or SIZES
    print(run(sizes)["markdown"])
