"""The structures that keep a watcher's per-tick work O(watched) (issue #11) against plain
dicts and scans as referees: same contents, every older version unchanged."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.group.membership import (
    FrozenMap,
    LivenessState,
    MemberTrack,
    Observation,
    TrackMap,
)

IDS = st.sampled_from([f"i-{n}" for n in range(40)])


def track(n: int) -> MemberTrack:
    return MemberTrack(f"e{n}", 0.0, 0.0, 0.0, 0.0, float(n))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(IDS, st.one_of(st.none(), st.integers(0, 99)), max_size=20),
                max_size=40))
def test_trackmap_versions_match_dicts_and_never_change(rounds: list[dict]) -> None:
    tm, model = TrackMap(), {}
    history = [(tm, dict(model))]
    for changes in rounds:
        tm = tm.evolve({k: None if v is None else track(v) for k, v in changes.items()})
        for k, v in changes.items():
            if v is None:
                model.pop(k, None)
            else:
                model[k] = track(v)
        history.append((tm, dict(model)))
    for version, want in history:
        assert dict(version) == want and len(version) == len(want)
        assert sorted(version) == sorted(want)
        for k in [f"i-{n}" for n in range(40)]:
            assert (k in version) == (k in want)
            assert version.get(k) == want.get(k)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ob", "gone", "list", "prune"]), st.lists(IDS,
                                                                                  max_size=4)),
                max_size=30))
def test_gone_index_matches_a_scan(ops: list) -> None:
    s, mono = LivenessState(), 0.0
    for op, ids in ops:
        mono += 10.0
        if op == "ob":
            s = s.update([Observation(m, f"e{mono}", mono, mono, mono, "ready") for m in ids],
                         mono)
        elif op == "gone":
            s = s.update([], mono, gone=ids)
        elif op == "list":
            s = s.update([Observation(m, f"e{mono}", mono, mono, mono) for m in set(ids)], mono,
                         listing=True)
        else:
            s = s.prune_gone(mono - 25.0)
        scan = {m for m, t in s.members.items() if t.gone_mono is not None}
        assert s.gone_ids == scan
        assert all(t.gone_mono is None or t.gone_mono >= mono - 25.0
                   for t in s.prune_gone(mono - 25.0).members.values())


def test_frozen_map_counts_and_is_kept_uncopied_by_heal_view() -> None:
    from agent.heal.decide import HealView

    zones = FrozenMap({"a": "z1", "b": "z1", "c": "z2", "d": ""})
    assert dict(zones.counts()) == {"z1": 2, "z2": 1}
    view = HealView(observer_id="a", group_size=4, verdicts={}, zones=zones)
    assert view.zones is zones
    plain = {"a": "z1"}
    assert HealView(observer_id="a", group_size=1, verdicts={}, zones=plain).zones is not plain
