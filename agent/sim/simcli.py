"""``ec2-agent simulate --seed S ...``: the deterministic fleet simulation from the command line.

Without ``--seed`` the ``simulate`` command runs the embedded-cloud demo
(``agent.sim.cloud.simulate``, what ``make demo`` runs); with it, this module
runs ``agent.sim.fleetsim`` and prints a summary (``--json``: one object), writes
an HTML timeline with ``--report``, and exits 1 on any invariant violation after
printing the seed, the step and the timeline around it. Same seed, same bytes.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

EXIT_VIOLATION = 1


def run_cli(args: Any) -> int:
    from agent.sim import fleetsim
    from agent.sim.faults import PROFILES

    if args.faults not in PROFILES:
        print(f"ec2-agent simulate: unknown --faults {args.faults!r}; one of "
              f"{', '.join(PROFILES)}", file=sys.stderr)
        return 2
    if args.members < 1 or args.hours <= 0:
        print("ec2-agent simulate: --members must be >= 1 and --hours > 0", file=sys.stderr)
        return 2
    logging.disable(logging.WARNING)  # the agents' own warnings are the timeline's business
    try:
        res = fleetsim.run(args.seed, args.members, args.hours, args.faults,
                           timeline=True)
    finally:
        logging.disable(logging.NOTSET)
    if args.report:
        from agent.sim.report import write_report

        write_report(res, args.report)
    if args.json:
        print(fleetsim.to_json(res))
    else:
        print(fleetsim.summary(res))
    if res.violations:
        v = res.violations[0]
        step = next((i for i, e in enumerate(res.timeline) if e[1] == "VIOLATION"), -1)
        print(f"\nVIOLATION {v.kind}: {v.detail}\n  seed {res.seed}, faults {res.profile}, "
              f"members {res.members}, hours {res.hours:g}; at t={v.t - fleetsim.T0:.2f}s "
              f"(timeline step {step}), member {v.member or '-'}, actor {v.actor or '-'}\n"
              f"  replay: ec2-agent simulate --seed {res.seed} --members {res.members} "
              f"--hours {res.hours:g} --faults {res.profile}\ntimeline around it:",
              file=sys.stderr)
        print(fleetsim.timeline_around(res, v.t, member=v.member), file=sys.stderr)
        return EXIT_VIOLATION
    return 0
