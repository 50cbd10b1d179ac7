"""Does the simulator find bugs? Re-introduce each known one into today's code (issue #11).

Each mutant puts back, as a small in-memory patch of the shipped code, one unsafe
behaviour the review of issue #10 found (and the simulator's sweeps after it). The
CI seed set (the swarm and regression seeds of ``tests/sim/test_fleetsim.py``, the
ones ``make test`` runs) is then run against it: a mutant is *caught* when some seed
that runs clean on the real code reports an invariant violation. Every required mutant
(the five of issue #11) must be caught, or ``make mutants`` exits 1: one that is not
needs a new seed in the CI set. The others put back later sessions' own fixes.

``python -m bench mutants`` (or ``make mutants``) writes the table to
docs/benchmarks.md; ``python -m bench.bench_mutants NAME ...`` runs the named mutants
only and prints the table. Not a speed benchmark: the numbers are seeds, not seconds.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Seed = tuple[str, str, int, int, float]  # (id, profile, seed, members, hours)


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # the unsafe behaviour put back
    patch: Callable[[], contextlib.AbstractContextManager[None]]
    # False: a bug of this session, put back too; its seed moved with later merges, so it
    # may go uncaught by the seeds (its controller test against moto still fails on it).
    required: bool = True
    also: str = ""  # the test that fails on it besides the seeds


def _accepts_all(old: Any, new: Any) -> bool:
    """Can ``new`` be called with every parameter ``old`` takes? A mutant that cannot is
    caught by its own TypeError (``agent-error`` at every seed), not by the simulator:
    session 14 gave ``_fence`` a parameter and ``no-fencing`` was "caught" that way."""
    old, new = getattr(old, "__func__", old), getattr(new, "__func__", new)
    if not callable(old) or not callable(new):
        return True
    try:
        params_old = inspect.signature(old).parameters
        params_new = inspect.signature(new).parameters
    except (TypeError, ValueError):
        return True
    P = inspect.Parameter
    positional = sum(1 for p in params_old.values()
                     if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD))
    named = {n: None for n, p in params_old.items() if p.kind is P.KEYWORD_ONLY}
    try:  # every parameter of the real one: positional ones by position, the rest by name
        inspect.Signature(list(params_new.values())).bind(*range(positional), **named)
    except TypeError:
        return False
    return True


@contextlib.contextmanager
def _setattr(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)
    if not _accepts_all(old, value):
        raise TypeError(f"mutant of {name} does not take every parameter the real one does")
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _no_fencing() -> contextlib.AbstractContextManager[None]:
    """``_fence`` re-reads nothing (no fresh-heartbeat, kill-switch or decision-age check)
    and a lost race on the lease does not abort: the lease is only moved to ``acting``."""
    from agent.heal import controller as C

    def fence(self: Any, lease: Any, what: str, *, probe_at: Any = None,
              check_age: bool = True) -> Any:
        state = lease.state if lease.acted else "acting"
        return self._rewrite(lease, state=state, detail=f"unfenced before {what}") or lease

    return _setattr(C.HealController, "_fence", fence)


def _no_fence_probe() -> contextlib.AbstractContextManager[None]:
    """The fence does not ask the member itself at the last look (its record decides)."""
    from agent.heal import controller as C

    return _setattr(C.HealController, "_probe_at_fence", lambda *_a, **_k: None)


def _blind_probe_trusted() -> contextlib.AbstractContextManager[None]:
    """The fence's probe has no controls: silence counts even when the observer's probes
    reach nobody."""
    from agent.heal import controller as C

    real = C.HealController._probe_at
    return _setattr(C.HealController, "_probe_at",
                    lambda self, m, *a, **k: C._ProbeAt(real(self, m, *a, **k).member))


def _held_exiles() -> contextlib.AbstractContextManager[None]:
    """Any lease that is not ``refused`` means "you were replaced" (held and failed too)."""
    from agent.heal.leases import Lease

    return _setattr(Lease, "supersedes", property(lambda self: self.state != "refused"))


def _not_found_trusted() -> contextlib.AbstractContextManager[None]:
    """EC2's first "no such instance" is believed: ``terminated`` at once."""
    from agent.heal import controller as C

    return _setattr(C, "not_found_belief", lambda *_a, **_k: "terminated")


def _uncapped_in_flight() -> contextlib.AbstractContextManager[None]:
    """No group-wide in-flight compare-and-swap: only each observer's own count caps."""
    from agent.heal import controller as C

    return _setattr(C, "take_inflight", lambda *_a, **_k: (True, "in-flight not counted"))


def _no_zone_rule() -> contextlib.AbstractContextManager[None]:
    """No zone is ever disrupted: a dark zone is judged under the group's fraction only."""
    from agent.heal import decide as D

    return _setattr(D, "disrupted_zones", lambda *_a, **_k: ())


def _age_from_decide() -> contextlib.AbstractContextManager[None]:
    """The fence's decision age counts from after decide(), not from the step's start
    (this session's stalls seed 9)."""
    from agent.heal import controller as C

    real = C.HealController._record_decision

    def record(self: Any, *args: Any, **kw: Any) -> Any:
        self._decided_mono = self.clock.monotonic()
        return real(self, *args, **kw)

    return _setattr(C.HealController, "_record_decision", record)


def _lost_answer_leaves_acting() -> contextlib.AbstractContextManager[None]:
    """A rewrite that loses to the holder's own landed write gives up: the lease stays
    ``acting`` with nothing done (this session's flaky-store seed 147)."""
    from agent.heal import controller as C

    return _setattr(C.HealController, "_rewrite_mine", C.HealController._rewrite)


def _zone_on_watched_only() -> contextlib.AbstractContextManager[None]:
    """Zones judged on this observer's watched members only, not on every record's age
    (this session's zone-outage seed 129)."""
    from agent.heal import decide as D

    return _setattr(D, "zone_stale", lambda _view, stale: stale)


def _retry_while_in_transit() -> contextlib.AbstractContextManager[None]:
    """An acting lease resolved "not done" (its slot given back) at ``lease_expiry_s``,
    while its call may still be in transit (session 14: partitions seed 5014)."""
    from agent.heal import controller as C

    real = C.resolve_acting

    def early(action: str, age_s: float | None, bound_s: float, says: Any, *,
              call_over_s: float) -> Any:
        return real(action, age_s, bound_s, says, call_over_s=bound_s)

    return _setattr(C, "resolve_acting", early)


def _lost_action_failed() -> contextlib.AbstractContextManager[None]:
    """An error from the action's mutating call read as "nothing happened": the lease
    failed and its slot given back (session 14: control-plane-2007 seed 13)."""
    from agent.heal import controller as C

    return _setattr(C.HealController, "_landing",
                    staticmethod(lambda call, *a, **kw: call(*a, **kw)))


def _no_adoption_claim() -> contextlib.AbstractContextManager[None]:
    """A lease names the ASG launch it picked without claiming it first: the launches
    taken come from this observer's own lease cache (session 19's 24 h run: a28 adopted
    for 4b9 and 36f)."""
    from agent.heal import controller as C

    return _setattr(C.HealController, "_claim", lambda self, lease, iid: True)


def _no_fence_reprobe() -> contextlib.AbstractContextManager[None]:
    """The member is not asked again after a silent control at the fence (chaos seed
    7066: back during the control's 2 s timeout, terminated 2.9 s later)."""
    from agent.heal import controller as C

    return _setattr(C, "FENCE_REPROBE_AFTER_S", float("inf"))


MUTANTS = (
    Mutant("no-fencing", "no fence between the decision and the mutating call (#10.3)",
           _no_fencing),
    Mutant("held-exiles", "a held (or failed) lease exiles its member (#10.2)", _held_exiles),
    Mutant("not-found-trusted", "EC2 NotFound read as terminated at once (#10.4)",
           _not_found_trusted),
    Mutant("uncapped-in-flight", "in-flight capped per observer only (#10.7)",
           _uncapped_in_flight),
    Mutant("no-zone-rule", "a dark zone judged under the group fraction (#10 zone rule)",
           _no_zone_rule),
    Mutant("age-from-decide", "decision age counted from decide(), not from its evidence "
           "(stalls seed 9)", _age_from_decide, False,
           "test_item3_decision_is_as_old_as_its_evidence"),
    Mutant("lost-answer-acting", "a landed write whose answer was lost leaves the lease "
           "acting (flaky-store seed 147)", _lost_answer_leaves_acting, False,
           "test_item2_fence_write_landed_but_its_answer_lost_leaves_no_acting_lease"),
    Mutant("zone-watched-only", "zones judged on the watched members only (zone-outage seed "
           "129)", _zone_on_watched_only, False,
           "test_zone_half_watched_by_this_observer_is_judged_on_every_record"),
    Mutant("no-fence-probe", "the fence does not probe the member at the last look (session "
           "12's 24 h run, 20,460.6 s)", _no_fence_probe, False,
           "test_a_member_that_answers_at_the_last_look_is_not_terminated"),
    Mutant("retry-while-in-transit", "an acting lease handed back while its call may still "
           "land (partitions seed 5014)", _retry_while_in_transit, False,
           "test_regression_seed[acting-partitions-5014]"),
    Mutant("lost-action-failed", "a mutating call's error read as nothing done "
           "(control-plane-2007 seed 13)", _lost_action_failed, False,
           "test_a_launch_whose_answer_was_lost_keeps_its_in_flight_slot_until_resolved"),
    Mutant("blind-probe-trusted", "silence at the fence's probe counts from an observer cut "
           "off from its peers (part-zone seed 7008)", _blind_probe_trusted, False,
           "test_silence_at_the_fence_counts_only_if_the_observers_probes_reach_a_live_peer"),
    Mutant("no-adoption-claim", "two leases adopt the same launch: none is claimed before "
           "it is named (session 19's 24 h run; chaos seed 2100)", _no_adoption_claim, False,
           "test_two_leases_never_adopt_the_same_launch"),
    Mutant("no-fence-reprobe", "the member not asked again after a silent control at the "
           "fence (chaos seed 7066)", _no_fence_reprobe, False,
           "test_the_member_is_asked_again_after_a_silent_control"),
)


def ci_seeds() -> list[Seed]:
    """The seeds ``make test`` runs: tests/sim/test_fleetsim.py's swarm and regression."""
    from tests.sim import test_fleetsim as T

    out: list[Seed] = [(f"{p}-{s}", p, s, n, h) for p, s, n, h in T.SWARM]
    ids = T.test_regression_seed.pytestmark[0].kwargs["ids"]  # type: ignore[attr-defined]
    for pid, p in zip(ids, T.REGRESSION, strict=True):
        _, _, prof, seed, n, h = p.values
        out.append((pid, prof, seed, n, h))
    return out


def _run_set(seeds: list[Seed]) -> dict[str, list[str]]:
    """Seed id -> the violation kinds it reported (sorted, distinct)."""
    from agent.sim import fleetsim

    found: dict[str, list[str]] = {}
    for sid, prof, seed, n, h in seeds:
        res = fleetsim.run(seed, n, h, prof, timeline=False)
        found[sid] = sorted({v.kind for v in res.violations})
    return found


def run(mutants: tuple[str, ...] = (), seeds: tuple[str, ...] = (),
        strict: bool = False) -> dict[str, Any]:
    """``strict``: raise if a mutant is not caught or a seed is not clean on the real code."""
    logging.disable(logging.WARNING)
    chosen = [m for m in MUTANTS if not mutants or m.name in mutants]
    unknown = set(mutants) - {m.name for m in MUTANTS}
    if unknown:
        raise SystemExit(f"unknown mutant: {', '.join(sorted(unknown))}")
    pool = [s for s in ci_seeds() if not seeds or s[0] in seeds]
    t0 = time.monotonic()
    base = _run_set(pool)
    dirty = {k: v for k, v in base.items() if v}
    rows: list[tuple[Mutant, dict[str, list[str]]]] = []
    for m in chosen:
        with m.patch():
            got = _run_set(pool)
        rows.append((m, {k: v for k, v in got.items() if v and not base[k]}))
    took = time.monotonic() - t0
    missed = [m.name for m, caught in rows if not caught and m.required]
    lines = [
        "### Re-introduced bugs against the CI seed set (issue #11)",
        "",
        f"Each mutant is one unsafe behaviour of issue #10 put back into today's code as an "
        f"in-memory patch (`bench/bench_mutants.py`), then the {len(pool)} CI seeds "
        "(`tests/sim/test_fleetsim.py`: swarm + regression) are run against it. Caught: a seed "
        "that runs clean on the real code reports a violation (kinds in brackets). "
        f"{len(rows)} mutants, {sum(1 for _, c in rows if c)} caught; {took:.0f} s "
        f"(`make mutants`). The first {sum(m.required for m, _ in rows)} are issue #11's "
        f"required ones; the other {sum(not m.required for m, _ in rows)} put back later "
        "sessions' own fixes (not required: "
        "their seeds may move with later merges; the named test fails on each).",
        "",
        "| mutant | bug put back | caught by (violation kinds) |",
        "|---|---|---|",
    ]
    for m, caught in rows:
        cell = ", ".join(f"{k} [{', '.join(v)}]" for k, v in caught.items()) or (
            "**NOT CAUGHT**" if m.required else "not caught by a seed")
        if m.also:
            cell += f"; `{m.also}`"
        lines.append(f"| `{m.name}` | {m.bug} | {cell} |")
    if dirty:
        lines += ["", "Seeds not clean on the real code (left out of the judgement): "
                  + ", ".join(f"{k} [{', '.join(v)}]" for k, v in dirty.items())]
    md = "\n".join(lines)
    summary = md + ("" if not missed else f"\nNOT CAUGHT: {', '.join(missed)}")
    if strict and (missed or dirty):
        raise RuntimeError(summary)
    return {"markdown": md, "summary": summary, "missed": missed, "dirty": dirty}


# ``python -m bench --tiny mutants`` (make test): one mutant, the one seed that catches it.
TINY = {"mutants": ("no-zone-rule",), "seeds": ("10.zone-zone-outage-1",), "strict": True}


def main(argv: list[str]) -> int:
    result = run(tuple(argv))
    print(result["summary"])
    return 1 if result["missed"] or result["dirty"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
