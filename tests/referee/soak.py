"""The long differential run: ``python -m tests.referee.soak --cases 10000`` (``make soak``).

Generates user-data with tests/referee/gen.py (hypothesis, one seed per chunk),
asks cloud-init 22.4 (tests/referee/cloudinit_referee.py, system python3) what it
assembles, and judges the agent's answer (tests/referee/harness.py). Prints the
counts; writes every disagreement to ``--out`` and exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import sys
import time

from tests.referee.gen import generate
from tests.referee.harness import agent, expected, judge, referee, referee_available


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=1_000)
    ap.add_argument("--seed", type=int, default=1, help="first chunk's seed (then +1 ...)")
    ap.add_argument("--out", default="userdata-soak-disagreements.jsonl")
    args = ap.parse_args(argv)
    if not referee_available():
        print("cloud-init is not installed for /usr/bin/python3: no referee", file=sys.stderr)
        return 2
    started = time.monotonic()
    outcomes: collections.Counter[str] = collections.Counter()
    bad = []
    done = 0
    seed = args.seed
    while done < args.cases:
        cases = generate(min(args.chunk, args.cases - done), seed)
        for case, ref in zip(cases, referee(cases), strict=True):
            got = agent(case)
            want = expected(case, ref)[0]
            outcomes[f"agent {got[0]} / cloud-init {'crash' if 'crash' in ref else want}"] += 1
            why = judge(case, ref, got)
            if why:
                bad.append({"why": why, "raw": base64.b64encode(case.raw).decode(),
                            "launch_index": case.launch_index, "seed": seed})
        done += len(cases)
        seed += 1
        print(f"{done} cases, {len(bad)} disagreements, {time.monotonic() - started:.0f} s",
              flush=True)
    for key, n in sorted(outcomes.items()):
        print(f"  {n:6d}  {key}")
    if bad:
        with open(args.out, "w") as f:
            for b in bad:
                f.write(json.dumps(b) + "\n")
        print(f"{len(bad)} disagreements written to {args.out}")
        return 1
    print(f"{done} cases: no disagreement")
    return 0


if __name__ == "__main__":
    sys.exit(main())
