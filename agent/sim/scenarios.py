"""``ec2-agent simulate --scenario NAME``: rehearse a failure on the embedded cloud.

Each scenario starts its own moto server, IMDS emulator and a fleet of agent
processes (``agent.sim.fleet``) with shortened intervals (heartbeat 1 s, dead_after
3 s), does one bad thing, waits for the outcome the design promises, and prints the
timeline: deaths, suspicions, freezes, leases, actions, replacements booted, with
seconds since the fleet started. The exit code says whether the promise held.

    kill-one    kill -9 one agent and terminate its instance → exactly one launch,
                the replacement boots and the group is whole again
    kill-half   kill -9 half the agents at once → replacement freezes (mass death),
                nothing is replaced; restart them → the freeze lifts
    api-outage  black-hole the store and the API for 10 × dead_after → nothing is
                replaced, every agent recovers by itself
    leave       one agent leaves on purpose (SIGTERM) → nobody replaces it
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

from agent.sim.fleet import Fleet, FleetCloud, fast_config

SCENARIOS = ("kill-one", "kill-half", "api-outage", "leave")
INTERVAL = 1.0
DEAD = 3.0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _kill_one(f: Fleet, ids: list[str]) -> dict[str, Any]:
    victim = ids[0]
    f.kill(victim)
    f.terminate_instance(victim)
    t_kill = f.now()
    _say(f"killed {victim} (kill -9, instance terminated); waiting for the group to heal")
    f.wait(lambda: f.actions(), 90, "a replacement")
    f.wait(lambda: len([m for m in f.ready() if m != victim]) >= len(ids), 120,
           f"{len(ids)} ready members")
    t_whole = f.now()
    f.hold(2 * DEAD)
    acts = f.actions()
    return {"ok": len(acts) == 1 and acts[0]["member"] == victim,
            "victim": victim, "actions": len(acts),
            "kill_to_action_s": round(acts[0]["t"] - t_kill, 2) if acts else None,
            "kill_to_whole_s": round(t_whole - t_kill, 2)}


def _kill_half(f: Fleet, ids: list[str]) -> dict[str, Any]:
    k = math.ceil(len(ids) / 2)
    victims, survivors = ids[:k], ids[k:]
    for v in victims:
        f.kill(v)
    _say(f"killed {k} of {len(ids)} at once; waiting for the survivors to freeze")
    f.wait(lambda: all(f.heal_state(s).get("frozen") for s in survivors), 60, "the freeze")
    reason = f.heal_state(survivors[0]).get("reason", "")
    f.hold(3 * DEAD)
    _say("restarting the killed agents; waiting for the freeze to lift")
    for v in victims:
        f.restart(v)
    f.wait(lambda: not any(f.heal_state(s).get("frozen") for s in survivors), 90, "the lift")
    f.hold(DEAD)
    n = len(f.actions())
    return {"ok": n == 0, "killed": k, "freeze_reason": reason, "actions": n}


def _api_outage(f: Fleet, ids: list[str]) -> dict[str, Any]:
    outage = 10 * DEAD
    _say(f"black-holing the store and the API for {outage:g}s")
    f.outage("blackhole")
    f.hold(outage)
    during = {i: int(f.state(i).get("heartbeat", {}).get("seq", 0)) for i in ids}
    f.outage("pass")
    t_back = f.now()
    f.wait(lambda: all(int(f.state(i).get("heartbeat", {}).get("seq", 0)) > during[i] + 1
                       for i in ids), 90, "every agent heartbeating again")
    t_ok = f.now()
    f.hold(2 * DEAD)
    n = len(f.actions())
    return {"ok": n == 0, "outage_s": outage, "recovered_in_s": round(t_ok - t_back, 2),
            "actions": n}


def _leave(f: Fleet, ids: list[str]) -> dict[str, Any]:
    who = ids[0]
    code = f.sigterm(who)
    _say(f"{who} left (SIGTERM, exit {code}); watching for {DEAD * 3:g}s")
    f.hold(3 * DEAD + 6)
    n = len(f.actions())
    return {"ok": n == 0 and who not in f.members(), "left": who, "actions": n}


RUNNERS: dict[str, Callable[[Fleet, list[str]], dict[str, Any]]] = {
    "kill-one": _kill_one, "kill-half": _kill_half, "api-outage": _api_outage, "leave": _leave,
}


def run_scenario(name: str, instances: int = 5, keep: bool = False,
                 as_json: bool = False) -> int:
    if name not in RUNNERS:
        _say(f"unknown scenario {name!r}; have: {', '.join(SCENARIOS)}")
        return 2
    n = max(3, instances)
    t0 = time.monotonic()
    cloud = FleetCloud()
    fleet: Fleet | None = None
    result: dict[str, Any] = {"ok": False}
    try:
        cloud.start()
        _say(f"emulated cloud: moto {cloud.moto.url}, IMDS {cloud.imds.base_url}, "
             f"dir {cloud.workdir}")
        cfg = fast_config(cloud, "web", interval_s=INTERVAL, dead_after_s=DEAD,
                          heal={"action": "launch", "silent_after_s": 2 * DEAD})
        fleet = Fleet(cloud, "web", config=cfg)
        _say(f"starting {n} agents (heartbeat {INTERVAL:g}s, dead_after {DEAD:g}s, "
             f"heal armed: launch)")
        ids = fleet.start(n)
        fleet.calm()
        result = RUNNERS[name](fleet, ids)
    except TimeoutError as exc:
        result = {"ok": False, "error": str(exc).splitlines()[0]}
    finally:
        if fleet is not None:
            fleet.stop()
        cloud.stop(keep_dir=keep)
        if keep:
            _say(f"kept {cloud.workdir}")
    result["scenario"] = name
    result["seconds"] = round(time.monotonic() - t0, 1)
    marks = fleet.timeline if fleet is not None else []
    if as_json:
        print(json.dumps({"result": result, "timeline": [vars(m) for m in sorted(
            marks, key=lambda m: m.t)]}, indent=1, default=str))
    else:
        print(f"timeline of {name} ({n} agents; seconds since the fleet started):")
        if fleet is not None:
            print(fleet.timeline_text())
        print(f"result: {'OK' if result.get('ok') else 'FAILED'} "
              + json.dumps({k: v for k, v in result.items() if k != 'ok'}, default=str))
    return 0 if result.get("ok") else 1
