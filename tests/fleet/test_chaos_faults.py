"""Issue #10 in the chaos suite: real agent processes against moto, hurt on purpose.

Every window is derived from the config the agents are given (``INTERVAL``, ``DEAD``,
``SILENT``): a scenario waits for a state to be reached (with a generous ceiling), and
the "nothing happens" holds last as long as the old code needed to do the wrong thing
plus a margin in heartbeat intervals, never a fixed number of seconds.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from agent.sim.fleet import Fleet, FleetCloud
from tests.fleet.test_chaos import DEAD, INTERVAL, SILENT, config

pytestmark = pytest.mark.fleet

# How long the code before #10 needed to act on a silent-but-running member: silent_after
# plus a confirmation round and a probe timeout; a few intervals on top for a busy machine.
ACT_WINDOW = SILENT + 2 * DEAD + 6 * INTERVAL


def group_freezes(f: Fleet) -> list[dict[str, Any]]:
    f.actions()  # polls the events
    return [e for e in f.events if e["kind"] == "heal-freeze"
            and (e.get("details") or {}).get("scope") == "group"]


def death_freezes(f: Fleet) -> list[dict[str, Any]]:
    """Group freezes that counted members as dead (not an API hiccup of a busy moto)."""
    return [e for e in group_freezes(f)
            if any(r.startswith(("mass-death", "failed-replacements"))
                   for r in e.get("reasons", []))]


def test_zone_of_three_of_nine_stopped_at_once_is_disrupted_not_replaced(
        make_fleet: Callable[..., Fleet], fleet_cloud: FleetCloud,
        report: Callable[..., None], monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGSTOP a whole zone (instances still running): 0 actions, the zone named, all back.

    3/9 is under the default freeze_fraction 0.34: before the zone rule the group
    replaced the zone.
    """
    three = fleet_cloud.subnets()[:3]  # three zones of three
    monkeypatch.setattr(fleet_cloud, "subnets", lambda: three)
    f = make_fleet(config=config(fleet_cloud, action="launch"))
    ids = f.start(9)
    f.calm()
    zone = {i: fleet_cloud.client("ec2").describe_instances(InstanceIds=[i])[
        "Reservations"][0]["Instances"][0]["Placement"]["AvailabilityZone"] for i in ids}
    dark_zone = zone[ids[0]]
    dark = [i for i in ids if zone[i] == dark_zone]
    assert len(dark) == 3
    for i in dark:
        f.sigstop(i)
    t_stop = f.now()
    def zone_events() -> list[dict[str, Any]]:
        # (On a loaded machine another zone may look disrupted for a moment: that is the
        # rule being careful; the dark zone's event is the one this scenario waits for.)
        f.actions()  # polls the events
        return [e for e in f.events if e["kind"] == "heal-zone-disrupted"
                and dark_zone in " ".join(e.get("reasons") or [])]

    ev = f.wait(zone_events, ACT_WINDOW + 30, "a zone-disrupted event")
    assert dark_zone in ev[0]["reasons"][0] and sorted(ev[0]["details"]["members"]) == sorted(dark)
    f.hold(max(0.0, ACT_WINDOW - (f.now() - t_stop)))
    r = f.replacements()
    assert r["actions"] == 0 and r["launched"] == 0, f.timeline_text()
    observers = [i for i in ids if i not in dark]
    zones_in_status = [f.heal_state(i).get("disrupted_zones") for i in observers]
    assert [dark_zone] in zones_in_status, zones_in_status
    for i in dark:
        f.sigcont(i)
    t_cont = f.now()
    f.wait(lambda: len(f.ready()) >= 9, 60, "all nine ready again")
    t_back = f.now()
    f.hold(3 * DEAD)
    r = f.replacements()
    assert r["actions"] == 0 and r["leases"] == 0 and r["launched"] == 0, r
    f.wait_ready(ids, exactly=True)
    assert not death_freezes(f), death_freezes(f)
    report(stop_to_zone_event_s=round(ev[0]["t"] - t_stop, 2),
           cont_to_all_ready_s=round(t_back - t_cont, 2), replacements=r)


def test_asg_replacing_three_hung_members_itself_is_no_freeze(
        make_fleet: Callable[..., Fleet], fleet_cloud: FleetCloud,
        report: Callable[..., None]) -> None:
    """The ASG's own health check takes three hung members (terminate, relaunch).

    Before #10: judged three new deaths (3/5 a mass death: frozen), asg-terminate
    failed on instances no longer in the group, and the records stayed for ever.
    """
    f = make_fleet(config=config(fleet_cloud, action="asg-terminate"), asg=True)
    ids = f.start(5)
    f.calm()
    hung = ids[:3]
    asg = fleet_cloud.client("autoscaling")
    # The ASG acts first, then the agents go with their instances: killed the other way
    # round, a loaded machine (slow moto calls) can let dead_after pass before EC2 says
    # "terminated", and then 3/5 silent and running is a real mass death (a right freeze,
    # not this scenario's).
    for i in hung:  # what the ASG's EC2 health check does, by itself
        asg.terminate_instance_in_auto_scaling_group(InstanceId=i,
                                                     ShouldDecrementDesiredCapacity=False)
        f.mark("asg replaces", i, "the ASG's own health check")
    for i in hung:
        f.kill(i)
    t0 = f.now()
    f.wait(lambda: not set(hung) & set(f.members()), 60, "the three records forgotten")
    t_gone = f.now()
    f.hold(3 * DEAD)
    kinds = f.event_kinds()
    # Two observers may both forget one record in the same instant: count members.
    forgotten = {e["member"] for e in f.events if e["kind"] == "heal-already-replaced"}
    assert forgotten == set(hung), kinds
    # (Replacements that boot slower than grace_s may look stale for a moment: a freeze
    # over them is not this scenario's; none may count the three.)
    # An api-failing freeze (moto busy on a loaded machine) is the API's, not a verdict on
    # the three: what must never happen is counting them as deaths or failures.
    # Once their records are gone the three are "leaving" in every view (listed among the
    # members considered, never counted): only a freeze before that can have counted them.
    over_hung = [e for e in death_freezes(f) if e["t"] <= t_gone
                 and set(e["details"].get("members", [])) & set(hung)]
    assert not over_hung, over_hung
    assert not kinds.get("heal-action") and not kinds.get("heal-action-failed"), kinds
    assert f.replacements()["leases"] == 0
    report(asg_replace_to_records_gone_s=round(t_gone - t0, 2), events=kinds)


def test_transient_action_failure_does_not_exile_and_a_later_death_is_replaced_once(
        make_fleet: Callable[..., Fleet], fleet_cloud: FleetCloud, tmp_path: Any,
        report: Callable[..., None]) -> None:
    """The action fails once (a throttled call): the member is not exiled.

    A hook is the action so that the failure is real and in the agent's own process:
    its first run exits 1, later runs record the member. Before #10 the failed lease
    exiled the member (it stepped down as superseded as soon as it ran again).
    """
    flag, log = tmp_path / "throttled-once", tmp_path / "replaced.log"
    hook = (f'if [ -e {flag} ]; then echo "$EC2_AGENT_DEAD_ID" >> {log}; '
            f'else touch {flag}; echo "Throttling: Rate exceeded" >&2; exit 1; fi')
    f = make_fleet(config=config(fleet_cloud, action="hook", hook=hook))
    ids = f.start(5)
    f.calm()
    victim = ids[0]
    f.sigstop(victim)  # hung: silent, its probe times out; EC2 says running

    def failed() -> list[dict[str, Any]]:
        f.actions()
        return [e for e in f.events if e["kind"] == "heal-action-failed"]

    f.wait(failed, ACT_WINDOW + 30, "the action to fail once")
    f.sigcont(victim)
    f.wait(lambda: victim in f.ready(), 30, "the victim ready again")
    f.hold(3 * DEAD)
    f.wait_ready([victim])  # not exiled: a ready member still (#16: not one instant's look)
    assert (f.state(victim).get("membership") or {}).get("state", "ready") == "ready"
    assert not f.heal_state(victim).get("superseded")
    assert not log.exists()
    # Its real death later is replaced, once.
    f.kill(victim)
    t_kill = f.now()
    f.wait(lambda: f.actions(), ACT_WINDOW + 30, "the replacement action")
    f.hold(3 * DEAD)
    assert log.read_text().split() == [victim], f.timeline_text()
    assert len(f.actions()) == 1 and f.actions()[0]["member"] == victim
    report(kill_to_action_s=round(f.actions()[0]["t"] - t_kill, 2),
           events=f.event_kinds())


def test_observer_stalled_between_lease_and_action_while_the_member_recovers_acts_not(
        make_fleet: Callable[..., Fleet], fleet_cloud: FleetCloud,
        report: Callable[..., None]) -> None:
    """SIGSTOP the observer the moment its lease is in the store; the member recovers.

    Every agent reaches moto through a proxy of its own, which watches for the lease's
    create-only PUT (``TcpProxy.watch``): the agent that sent it is stopped before the
    answer reaches it, so the lease is in the store and nothing after it has run. The
    member is then let go (SIGCONT) until its heartbeat is fresh, and only then the
    observer. Before the fence (#10 item 3) it launched a clone and terminated the
    member; now its fence reads the fresh heartbeat (or its decision is too old) and
    nothing happens.
    """
    f = make_fleet(config=config(fleet_cloud, action="launch"))
    ids = f.start(5, own_proxy=5)
    f.calm()
    victim, observers = ids[0], ids[1:]
    stalled: list[tuple[str, float]] = []
    lock = threading.Lock()

    def watcher(iid: str) -> Callable[[bytes], Callable[[], None] | None]:
        def watch(head: bytes) -> Callable[[], None] | None:
            first = head.split(b"\r\n", 1)[0]
            if not (first.startswith(b"PUT ") and b"/leases/" in first
                    and b"if-none-match: *" in head.lower()):
                return None

            def stop() -> None:
                with lock:
                    if stalled:
                        return
                    os.kill(f.pid(iid), signal.SIGSTOP)  # before it sees the answer
                    stalled.append((iid, f.now()))
            return stop
        return watch

    for iid in observers:
        f.own_proxies[iid].watch = watcher(iid)
    f.sigstop(victim)  # hung: silent, its probe times out; EC2 says running
    t_stop = f.now()
    observer = ""
    try:
        f.wait(lambda: stalled, ACT_WINDOW + 30, "an observer's lease, and its stall")
        observer, t_stall = stalled[0]
        f.mark("SIGSTOP", observer, "right after its lease reached the store")
        lease = f.leases().get(victim) or {}
        assert lease.get("holder") == observer and lease.get("state") == "held", lease
        f.sigcont(victim)
        f.wait(lambda: f.members().get(victim, DEAD) < INTERVAL, 10 * INTERVAL,
               "the member's fresh heartbeat")
        stall_s = f.now() - t_stall
    finally:
        for iid in observers:
            f.own_proxies[iid].watch = None
        if observer:
            f.sigcont(observer)

    def gave_up() -> list[dict[str, Any]]:
        # Its fence (heal-fenced); on a loaded machine its second look at EC2 may refuse
        # first (heal-refuse): either way the stalled step ended without acting.
        f.actions()  # polls the events
        return [e for e in f.events if e["kind"] in ("heal-fenced", "heal-refuse")
                and e["member"] == victim and e.get("actor") == observer
                and e["t"] >= t_stall]

    ev = f.wait(gave_up, 10 * INTERVAL, "the stalled observer's fence")
    f.hold(3 * DEAD)
    r = f.replacements()
    assert r["actions"] == 0 and r["launched"] == 0 and r["terminated"] == 0, (
        r, f.timeline_text())
    assert not f.terminated_in_ec2()
    f.wait_ready([victim, observer])
    assert not f.heal_state(victim).get("superseded")
    report(stop_to_lease_s=round(t_stall - t_stop, 2), stall_s=round(stall_s, 2),
           fence=f"{ev[0]['kind']}: {ev[0]['reasons'][0][:120]}", replacements=r)
