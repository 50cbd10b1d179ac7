"""Races on the store's conditional writes, against a real moto server.

Ten observers (threads, each its own ``HealController``, its own store client and its
own observer id) all decide that the same member is dead at the same moment: exactly
one creates the lease and exactly one RunInstances is issued. moto does not make
RunInstances idempotent on ClientToken (real EC2 does), so the test counts
instances: our own code must never issue a second launch for one lease.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from agent.aws.cloud import Cloud
from agent.aws.store import Store
from agent.group.events import list_events
from agent.heal.controller import HealController, ObserverHealth, PeersView
from agent.heal.leases import read_lease, take_budget
from agent.retry import Retry
from agent.sim.cloud import EmbeddedCloud
from tests.integration.test_replace import GROUP, all_instances, config, view


def run_threads(n: int, fn: Any) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = fn(i)
        except BaseException as exc:  # surfaced below, never swallowed
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def test_ten_observers_racing_on_one_dead_member_give_one_lease_one_action(
        cloud: EmbeddedCloud) -> None:
    ids = cloud.run_standalone(GROUP, 11)
    dead = ids[5]
    cloud.client("ec2").terminate_instances(InstanceIds=[dead])
    cloud.ensure_bucket()
    n_before = len(all_instances(cloud))
    observers = [i for i in ids if i != dead]
    cfg = config(action="launch", max_per_window=5, confirm_observers=3, freeze_fraction=0.5)
    ctls = [HealController(Store(cloud.bucket, cloud.prefix), Cloud("us-east-1"), cfg, o)
            for o in observers]
    # Round 1: every observer sees the member stale but not yet dead on both clocks
    # ("suspect"): each records its suspicion; nobody may act on a suspect.
    suspect = PeersView(verdicts={m: ("suspect" if m == dead else "alive") for m in ids},
                        group_size=len(ids))
    run_threads(len(ctls), lambda i: ctls[i].step(suspect, ObserverHealth()))
    assert all(not c.outcomes for c in ctls)
    assert len(Store(cloud.bucket, cloud.prefix).list(f"groups/{GROUP}/suspicions/").entries) == 10
    # A suspect record is no confirmation (#10): each observer's record now says "dead"
    # (as its own step writes it once its verdict is dead on both clocks).
    run_threads(len(ctls), lambda i: ctls[i]._write_suspicion(dead, "dead"))
    # Round 2: all confirmed, all decide to act at once.
    decisions = run_threads(len(ctls), lambda i: ctls[i].step(view(ids, dead), ObserverHealth()))
    # An observer slow enough to list the leases after the winner created one refuses
    # with "leased"; every other one decided to act and lost the lease race.
    acting = [d for d in decisions
              if [a.member_id for a in d.actions if not a.dry_run] == [dead]]
    late = [d for d in decisions if d not in acting]
    assert all(any(r.startswith("leased") for x in d.refusals for r in x.reasons)
               for d in late), [(d.freeze, d.refusals) for d in late]
    results = Counter(o.result for c in ctls for o in c.outcomes)
    assert results == Counter({"acted": 1, "lost": len(acting) - 1})
    assert len(acting) >= 2  # it was a race
    assert len(all_instances(cloud)) == n_before + 1  # one RunInstances, not ten
    store = Store(cloud.bucket, cloud.prefix)
    lease = read_lease(store, GROUP, dead)
    winner = [c for c in ctls if c.outcomes and c.outcomes[-1].result == "acted"][0]
    assert lease.holder == winner.me and lease.state == "acted"
    kinds = Counter(e.kind for e in list_events(store, GROUP, 200))
    assert kinds["heal-action"] == 1 and kinds["heal-lease-lost"] == len(acting) - 1
    # Round 3: nobody acts again (the member is leased, its record gone).
    run_threads(len(ctls), lambda i: ctls[i].step(view(ids, dead), ObserverHealth()))
    assert len(all_instances(cloud)) == n_before + 1


def test_concurrent_budget_takers_never_exceed_max_per_window(cloud: EmbeddedCloud) -> None:
    cloud.ensure_bucket()
    stores = [Store(cloud.bucket, cloud.prefix) for _ in range(16)]
    now = stores[0].list("nothing/").store_now  # the store's clock, as the controller has it
    got = run_threads(16, lambda i: take_budget(stores[i], GROUP, window_s=300,
                                               max_per_window=3, store_now=now,
                                               retry=Retry(total=59)))
    won = [detail for ok, detail in got if ok]
    lost = [detail for ok, detail in got if not ok]
    assert len(won) == 3, got
    assert sorted(won) == ["budget 1/3", "budget 2/3", "budget 3/3"]
    assert all(d.startswith("rate-limit: 3/3") for d in lost), lost
