"""``python -m agent.sim.soak``: as many simulation seeds as time allows (``make soak``).

Round-robin over the fault profiles, seeds counting up from ``--first``; prints one
line per run and, for every run with a violation, the replay command. Exit 1 if any
run violated an invariant. Not part of ``make test``: a soak runs for minutes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from agent.sim import fleetsim
from agent.sim.faults import PROFILES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.sim.soak")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--members", default="30",
                   help="N, or LO-HI: seed S runs LO + (7 S mod (HI-LO+1)) members "
                        "(session 3's sweep: --members 9-20 --hours 1 --first 100)")
    p.add_argument("--hours", type=float, default=2.0)
    p.add_argument("--first", type=int, default=1000)
    p.add_argument("--faults", default=",".join(PROFILES))
    a = p.parse_args(argv)
    lo, _, hi = a.members.partition("-")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        p.error(f"--members {a.members!r}: N or LO-HI")
    if not 1 <= low <= high:
        p.error(f"--members {a.members!r}: need 1 <= LO <= HI")
    profiles = a.faults.split(",")
    logging.disable(logging.WARNING)
    deadline = time.monotonic() + a.minutes * 60.0
    runs = bad = 0
    seed = a.first
    while time.monotonic() < deadline:
        for prof in profiles:
            t0 = time.monotonic()
            members = low + (7 * seed) % (high - low + 1)
            res = fleetsim.run(seed, members, a.hours, prof, timeline=False)
            runs += 1
            kinds = sorted({v.kind for v in res.violations})
            print(f"seed {seed} {prof:<19} n {members:3d} deaths {res.deaths:3d} replacements "
                  f"{res.replacements:3d} violations {len(res.violations):3d} {','.join(kinds)} "
                  f"({time.monotonic() - t0:.1f}s)", flush=True)
            if kinds:
                bad += 1
                print(f"  replay: ec2-agent simulate --seed {seed} --members {members} "
                      f"--hours {a.hours:g} --faults {prof}", flush=True)
            if time.monotonic() >= deadline:
                break
        seed += 1
    print(f"{runs} runs, {bad} with violations")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
