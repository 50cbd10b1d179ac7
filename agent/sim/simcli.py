"""``ec2-agent simulate --seed S ...``: the deterministic fleet simulation from the command line.

Without ``--seed`` the ``simulate`` command runs the embedded-cloud demo
(``agent.sim.cloud.simulate``, what ``make demo`` runs); with it, this module
runs ``agent.sim.fleetsim`` and prints a summary (``--json``: one object), writes
an HTML timeline with ``--report``, a line on stderr per simulated hour with
``--progress``, and exits 1 on any invariant violation after printing the seed, the
step and the timeline around it. Same seed, same bytes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.sim.world import Result

EXIT_VIOLATION = 1


def _progress(args: Any) -> Callable[[float, Result], None]:
    """One line on stderr per simulated hour: how far, and what was found so far (simulated
    quantities only: the same seed prints the same lines)."""
    def report(done_s: float, res: Result) -> None:
        print(f"simulated {done_s / 3600.0:g} h of {args.hours:g}: deaths {res.deaths}, "
              f"replacements {res.replacements}, false replacements {res.false_replacements}, "
              f"freezes {res.freezes}, checks {res.checks}, violations {len(res.violations)}",
              file=sys.stderr, flush=True)
    return report


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
                           timeline=True, progress=_progress(args) if args.progress else None)
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
