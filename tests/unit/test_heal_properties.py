"""Property tests: no sequence of observations makes heal or liveness unsafe.

Two small pure simulations:

* ``HealSim`` drives ``decide`` with random views step after step, carrying what the
  daemon would carry (leases, the CAS budget counter, in-flight replacements and
  their outcomes), executes only non-dry-run actions, and checks every invariant on
  every decision and on the whole history.
* ``run_liveness`` drives a ``LivenessState`` with random store writes, reads,
  clock rates and observer restarts, and checks the two-clock rule, including that
  shifting every observer time (or the store's clock) changes no verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.group.membership import LIVENESS, LivenessState, Observation, Verdict
from agent.heal.decide import (
    ACTION_KINDS,
    MODES,
    Decision,
    HealPolicy,
    HealView,
    budget_after,
    budget_take,
    decide,
    failure_streak,
    is_failed_replacement,
)

EC2 = ("pending", "running", "shutting-down", "stopping", "stopped", "terminated", None)
OBSERVER = "i-00"
REPLACEMENT_DEADLINE = 120.0

# --------------------------------------------------------------------------- heal sim

policies = st.builds(
    HealPolicy,
    mode=st.sampled_from(MODES + ("armed", "armed")),
    action=st.sampled_from(ACTION_KINDS),
    grace_s=st.just(300.0),
    max_per_window=st.integers(0, 3),
    window_s=st.sampled_from([60.0, 300.0]),
    freeze_fraction=st.sampled_from([0.2, 0.34, 0.5, 1.0]),
    confirm_observers=st.integers(1, 3),
    dead_after_s=st.just(30.0),
    silent_after_s=st.sampled_from([60.0, 120.0]),
    replace_silent=st.booleans(),
    failed_before_freeze=st.integers(1, 3),
    max_in_flight_fraction=st.sampled_from([0.1, 0.25, 1.0]),
)

mostly_false = st.sampled_from([False] * 11 + [True])
mostly_true = st.sampled_from([True] * 11 + [False])
# Mostly alive with some deaths, so that most decisions are not mass-death freezes.
verdict_st = st.sampled_from(("alive",) * 4 + ("dead",) * 4 + LIVENESS)
ec2_st = st.sampled_from(EC2 + ("stopped", "terminated") * 2 + ("running",) * 2)
asg_st = st.sampled_from(["Healthy", "Healthy", "Unhealthy", None])
probe_st = st.sampled_from([True, False, False, False, None])
silent_st = st.sampled_from([None, 0.0, 59.0, 60.0, 119.0, 120.0, 400.0])


@dataclass(frozen=True)
class Step:
    dt: float
    observer_sick: bool
    observer_fresh: bool
    paused: bool
    api_healthy: bool
    verdicts: dict[str, str]
    suspicions: dict[str, set[str]]
    ec2_state: dict[str, str | None]
    asg_health: dict[str, str | None]
    probe_ok: dict[str, bool | None]
    silent_for: dict[str, float | None]
    heartbeated: set[str]


@st.composite
def steps(draw: st.DrawFn, members: list[str]) -> Step:
    peers = [*members, "i-x1", "i-x2"]
    # Suspecting observers: a prefix of a per-step shuffle, 0-3 of them (incl. strangers).
    member = st.tuples(verdict_st, st.integers(0, 3), ec2_st, asg_st, probe_st, silent_st)
    rows = draw(st.fixed_dictionaries({m: member for m in members}))
    order = draw(st.permutations(peers))
    return Step(
        dt=float(draw(st.sampled_from([0, 1, 29, 30, 59, 60, 150, 299, 300, 400]))),
        observer_sick=draw(mostly_false),
        observer_fresh=draw(mostly_false),
        paused=draw(mostly_false),
        api_healthy=draw(mostly_true),
        verdicts={m: r[0] for m, r in rows.items()},
        suspicions={m: set(order[: r[1]]) for m, r in rows.items()},
        ec2_state={m: r[2] for m, r in rows.items()},
        asg_health={m: r[3] for m, r in rows.items()},
        probe_ok={m: r[4] for m, r in rows.items()},
        silent_for={m: r[5] for m, r in rows.items()},
        heartbeated=draw(st.sets(st.sampled_from(members), max_size=3)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[HealPolicy, list[str], int, list[Step]]:
    n = draw(st.integers(1, 8))
    members = [f"i-{k:02d}" for k in range(n)]
    group_size = draw(st.sampled_from([n, 3 * n, 10 * n, 10 * n, max(0, n - 1)]))
    return draw(policies), members, group_size, draw(st.lists(steps(members), max_size=10))


@dataclass
class HealSim:
    """What the daemon carries between decisions, reduced to the safety-relevant bits."""

    policy: HealPolicy
    group_size: int
    now: float = 1_000.0
    leases: set[str] = field(default_factory=set)
    counter: dict[str, Any] | None = None
    in_flight: dict[str, float] = field(default_factory=dict)
    outcomes: list[bool] = field(default_factory=list)  # True = failed replacement
    executed: list[tuple[float, str]] = field(default_factory=list)
    dry_run_decided: int = 0

    def view(self, s: Step) -> HealView:
        return HealView(
            observer_id=OBSERVER, group_size=self.group_size, verdicts=s.verdicts,
            suspicions=s.suspicions, ec2_state=s.ec2_state, asg_health=s.asg_health,
            probe_ok=s.probe_ok, silent_for=s.silent_for, leases=frozenset(self.leases),
            in_flight=len(self.in_flight),
            budget=budget_after(self.counter, self.now, self.policy.window_s)[1],
            consecutive_failures=failure_streak(self.outcomes),
            observer_sick=s.observer_sick, observer_fresh=s.observer_fresh, paused=s.paused,
            api_healthy=s.api_healthy, now=self.now,
        )

    def step(self, s: Step) -> Decision:
        self.now += s.dt
        for m in sorted(self.in_flight):
            if m in s.heartbeated:
                self.outcomes.append(False)
                del self.in_flight[m]
            elif is_failed_replacement(self.in_flight[m], self.now, REPLACEMENT_DEADLINE, False):
                self.outcomes.append(True)
                del self.in_flight[m]
        v = self.view(s)
        d = decide(v, self.policy)
        check_decision(v, self.policy, d)
        self.dry_run_decided += sum(1 for a in d.actions if a.dry_run)
        for a in [a for a in d.actions if not a.dry_run]:
            # The lease is create-only: a second action for one member would lose the race.
            assert a.member_id not in self.leases, f"acted twice on {a.member_id}"
            self.leases.add(a.member_id)
            counter = budget_take(self.counter, self.now, self.policy.window_s,
                                  self.policy.max_per_window)
            assert counter is not None, "acted with no budget left"
            self.counter = counter
            self.in_flight[a.member_id] = self.now
            self.executed.append((self.now, a.member_id))
        assert len(self.in_flight) <= self.policy.in_flight_cap(self.group_size)
        return d


def check_decision(v: HealView, p: HealPolicy, d: Decision) -> None:
    """Every per-decision invariant, stated from the view alone."""
    if p.mode == "off":
        assert d == Decision()
        return
    ids = [a.member_id for a in d.actions]
    refused = [r.member_id for r in d.refusals]
    considered = sorted(m for m, s in v.verdicts.items() if s != "alive")
    # 11: every member considered is either acted on or refused with reasons, once.
    assert sorted(ids + refused) == considered
    assert all(r.reasons for r in d.refusals) and all(a.reasons for a in d.actions)
    # 1: at most one action per member
    assert len(set(ids)) == len(ids)
    # 9: dry-run marks everything; armed nothing
    assert all(a.dry_run == (p.mode == "dry-run") for a in d.actions)
    # 3, 4, 6, 9: frozen, paused, sick or fresh -> nothing
    must_freeze = (v.observer_sick or v.observer_fresh or v.paused or not v.api_healthy
                   or v.consecutive_failures >= p.failed_before_freeze)
    stale = sum(1 for s in v.verdicts.values() if s in ("dead", "suspect"))
    if stale / max(1, v.group_size) > p.freeze_fraction:
        must_freeze = True
    if must_freeze:
        assert d.frozen and not d.actions
    if d.frozen:
        assert not d.actions
    # 5: rate limit and in-flight cap
    assert v.budget + len(ids) <= p.max_per_window
    assert v.in_flight + len(ids) <= p.in_flight_cap(v.group_size)
    for a in d.actions:
        m = a.member_id
        assert a.kind == p.action
        assert m != v.observer_id
        # 2, 7, 8: only confirmed deaths; never grace, leaving, suspect or unknown
        assert v.verdicts[m] == "dead"
        assert m not in v.leases
        ec2 = v.ec2_state.get(m)
        assert ec2 in ("stopped", "terminated", "running")
        assert v.probe_ok.get(m) is not True
        agree = (set(v.suspicions.get(m, ())) | {v.observer_id}) - {m}
        assert len(agree) >= p.confirm_observers
        if ec2 == "running":
            silent = v.silent_for.get(m)
            assert p.replace_silent and v.probe_ok.get(m) is False
            assert silent is not None and silent >= p.silent_after_s
            assert v.asg_health.get(m) != "Unhealthy"


def replay_windows(executed: list[tuple[float, str]], window_s: float) -> list[int]:
    """Count executed actions per budget window, as the counter's rules define them."""
    counts: list[int] = []
    start: float | None = None
    for t, _ in executed:
        if start is None or t >= start + window_s:
            start = t
            counts.append(0)
        counts[-1] += 1
    return counts


@settings(max_examples=150, deadline=None)
@given(scenarios())
def test_no_sequence_of_observations_breaks_a_heal_invariant(
        scenario: tuple[HealPolicy, list[str], int, list[Step]]) -> None:
    policy, _members, group_size, seq = scenario
    sim = HealSim(policy, group_size)
    frozen_steps = 0
    for s in seq:
        d = sim.step(s)
        frozen_steps += d.frozen
    members_acted = [m for _, m in sim.executed]
    assert len(set(members_acted)) == len(members_acted)  # never twice for one member
    assert all(c <= policy.max_per_window for c in replay_windows(sim.executed,
                                                                  policy.window_s))
    if policy.mode != "armed":
        assert sim.executed == []  # dry-run decides, off does nothing; neither executes


@settings(max_examples=60, deadline=None)
@given(policies, st.integers(3, 10), st.lists(st.integers(0, 400), min_size=1, max_size=20),
       st.booleans())
def test_a_storm_of_deaths_never_beats_the_rate_limit(
        policy: HealPolicy, n: int, gaps: list[int], replacements_work: bool) -> None:
    """Everyone but the observer dead, confirmed and stopped at every step: the caps hold.

    Replacements either all heartbeat (in-flight drains, the rate limit binds) or never
    do (in-flight fills, then the failure freeze binds).
    """
    members = [f"i-{k:02d}" for k in range(n)]
    others = [m for m in members if m != OBSERVER]
    sim = HealSim(policy, group_size=n * 10)  # big group: no mass-death freeze, caps bind
    for gap in gaps:
        s = Step(
            dt=float(gap), observer_sick=False, observer_fresh=False, paused=False,
            api_healthy=True,
            verdicts={m: ("alive" if m == OBSERVER else "dead") for m in members},
            suspicions={m: set(members) for m in members},
            ec2_state={m: "stopped" for m in members}, asg_health={},
            probe_ok={m: False for m in members}, silent_for={m: 999.0 for m in members},
            heartbeated=set(members) if replacements_work else set(),
        )
        d = sim.step(s)
        if not replacements_work and failure_streak(sim.outcomes) >= policy.failed_before_freeze:
            assert d.frozen and not d.actions
    assert all(c <= policy.max_per_window for c in replay_windows(sim.executed, policy.window_s))
    assert len({m for _, m in sim.executed}) == len(sim.executed) <= len(others)


# --------------------------------------------------------------------------- liveness

DEAD_AFTER = 30.0


@dataclass(frozen=True)
class Round:
    d_store: int          # how far the store's clock moved
    d_mono: int           # how far the observer's monotonic clock moved (own rate)
    writes: frozenset[str]  # members that heartbeat (new ETag) this round
    reads: frozenset[str]   # members whose record the observer read this round
    restart: bool           # the observer process restarted before this round


MEMBERS = ("i-a", "i-b", "i-c")
HB = "i-a"  # heartbeats every round


rounds_st = st.builds(
    Round,
    d_store=st.integers(0, 25),
    d_mono=st.integers(0, 25),
    writes=st.frozensets(st.sampled_from(MEMBERS)),
    reads=st.frozensets(st.sampled_from(MEMBERS)),
    restart=st.sampled_from([False] * 9 + [True]),
)


def run_liveness(rounds: list[Round], *, mono0: int = 0, store0: int = 1_000_000,
                 grace_s: float = 0.0) -> list[tuple[LivenessState, dict[str, Verdict]]]:
    """Feed the rounds through a LivenessState; return the state and verdicts after each."""
    store_now, mono = store0, mono0
    last: dict[str, tuple[str, int]] = {m: ("e0", store0) for m in MEMBERS}
    seq = dict.fromkeys(MEMBERS, 0)
    state = LivenessState()
    out = []
    for r in rounds:
        store_now += r.d_store
        mono += r.d_mono
        if r.restart:
            state = LivenessState()  # nothing survives a restart, on purpose
        for m in sorted(r.writes | {HB}):
            seq[m] += 1
            last[m] = (f"e{seq[m]}", store_now)
        obs = [Observation(m, last[m][0], float(last[m][1]), float(store_now), float(mono))
               for m in sorted(r.reads)]
        state = state.update(obs, float(mono))
        out.append((state, state.verdicts(dead_after_s=DEAD_AFTER, grace_s=grace_s)))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(rounds_st, max_size=25), st.sampled_from([-600, 600, -1, 7]),
       st.integers(-10**6, 10**6), st.sampled_from([0.0, 45.0]))
def test_shifting_the_observers_clock_changes_no_verdict(
        rounds: list[Round], mono_shift: int, store_shift: int, grace: float) -> None:
    base = run_liveness(rounds, grace_s=grace)
    shifted_mono = run_liveness(rounds, mono0=mono_shift, grace_s=grace)
    shifted_store = run_liveness(rounds, store0=1_000_000 + store_shift, grace_s=grace)
    assert [v for _, v in base] == [v for _, v in shifted_mono] == [v for _, v in shifted_store]


@settings(max_examples=150, deadline=None)
@given(st.lists(rounds_st, max_size=25))
def test_dead_only_with_both_clocks_and_a_full_window(rounds: list[Round]) -> None:
    for state, verdicts in run_liveness(rounds):
        assert verdicts.get(HB, None) is None or verdicts[HB].status != "dead"
        for m, v in verdicts.items():
            if v.status == "dead":
                assert v.store_age_s is not None and v.store_age_s >= DEAD_AFTER
                assert v.unchanged_s is not None and v.unchanged_s >= DEAD_AFTER
                assert not state.observer_fresh(DEAD_AFTER)
                assert m != HB


@settings(max_examples=100, deadline=None)
@given(st.lists(rounds_st, max_size=25), st.integers(1, 3))
def test_heal_on_tracked_verdicts_never_touches_a_heartbeating_member(
        rounds: list[Round], confirm: int) -> None:
    """Liveness into decide, everything else maximally permissive: only silence kills."""
    policy = HealPolicy(mode="armed", confirm_observers=confirm, max_per_window=10,
                        max_in_flight_fraction=1.0, freeze_fraction=1.0, grace_s=0,
                        dead_after_s=DEAD_AFTER, replace_silent=True, silent_after_s=1)
    for state, verdicts in run_liveness(rounds):
        v = HealView(
            observer_id=OBSERVER, group_size=len(MEMBERS) + 1, verdicts=verdicts,
            suspicions={m: {"i-p1", "i-p2", "i-p3"} for m in MEMBERS},
            ec2_state={m: "stopped" for m in MEMBERS},
            probe_ok={m: False for m in MEMBERS}, silent_for={m: 1e6 for m in MEMBERS},
            observer_fresh=state.observer_fresh(DEAD_AFTER),
        )
        d = decide(v, policy)
        acted = {a.member_id for a in d.actions}
        assert HB not in acted
        for m in acted:
            assert verdicts[m].status == "dead"
        if state.observer_fresh(DEAD_AFTER):
            assert not acted


@settings(max_examples=100, deadline=None)
@given(st.lists(rounds_st, max_size=20), st.lists(st.sampled_from(MEMBERS), max_size=3))
def test_a_member_whose_record_is_gone_is_never_dead(
        rounds: list[Round], gone: list[str]) -> None:
    results = run_liveness(rounds)
    if not results:
        return
    state, _ = results[-1]
    after = state.update([], (state.last_mono or 0) + 1, gone=gone)
    for m in gone:
        if m in state.members:
            assert after.verdicts(dead_after_s=DEAD_AFTER, grace_s=0)[m].status == "leaving"
