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
    checked_row,
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


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ob", "old", "gone", "list", "prune"]),
                          st.lists(IDS, max_size=3)), max_size=30))
def test_one_read_path_is_the_round_path(ops: list) -> None:
    """``update`` of one observation takes a short path; a round of the same one observation
    (a tuple of rows: the general path) is the referee. Same tracks, same gone index."""
    fast, ref, mono = LivenessState(), LivenessState(), 0.0
    for op, ids in ops:
        mono += 10.0
        if op in ("ob", "old"):
            for m in ids:
                when = mono - 15.0 if op == "old" else mono  # "old": overtaken responses
                ob = Observation(m, f"e{int(mono) % 30}", when, mono, when, "ready")
                fast = fast.update([ob], mono)
                ref = ref.update_rows((checked_row(m, ob.etag, when, mono, when, "ready"),),
                                      mono)
        elif op == "gone":
            fast, ref = fast.update([], mono, gone=ids), ref.update([], mono, gone=ids)
        elif op == "list":
            obs = [Observation(m, f"e{mono}", mono, mono, mono) for m in set(ids)]
            fast = fast.update(obs, mono, listing=True)
            ref = ref.update(obs, mono, listing=True)
        else:
            fast, ref = fast.prune_gone(mono - 25.0), ref.prune_gone(mono - 25.0)
        assert dict(fast.members) == dict(ref.members)
        assert fast.gone_ids == ref.gone_ids
        assert (fast.started_mono, fast.last_mono) == (ref.started_mono, ref.last_mono)


def test_checked_row_rejects_what_observation_rejects() -> None:
    import pytest

    assert checked_row("i-1", "e", 1.0, 2.0, 3.0, "ready") == ("i-1", "e", 1.0, 2.0, 3.0,
                                                               "ready")
    assert checked_row("i-1", "e", 1, 2, 3) == ("i-1", "e", 1, 2, 3, None)  # ints are numbers
    for bad in [("", "e", 1.0, 2.0, 3.0), ("i-1", "", 1.0, 2.0, 3.0),
                ("i-1", "e", float("nan"), 2.0, 3.0), ("i-1", "e", 1.0, float("inf"), 3.0),
                ("i-1", "e", 1.0, 2.0, True), ("i-1", None, 1.0, 2.0, 3.0)]:
        with pytest.raises(ValueError):
            checked_row(*bad)  # type: ignore[arg-type]


def test_tracks_and_peers_are_immutable_values() -> None:
    import pytest

    from agent.group.peers import PeerInfo

    t, p = track(1), PeerInfo("i-1", ip="10.0.0.1", state="ready")
    for obj, attr in ((t, "etag"), (p, "state")):
        with pytest.raises(AttributeError):
            setattr(obj, attr, "x")
    assert p._replace(state="leaving").state == "leaving" and p.state == "ready"


def test_record_cache_parses_each_body_once_and_a_changed_body_again() -> None:
    import pytest

    from agent.group.membership import MalformedRecord, MemberRecord
    from agent.group.peers import RecordCache

    cache = RecordCache(size=2)
    rec = MemberRecord("i-1", "g", 1, "ready", private_ip="10.0.0.1")
    body = rec.dumps()
    first = cache(body)
    assert first == rec
    assert cache(bytes(bytearray(body))) is first  # equal bytes, another object: cached
    beat = cache(rec.heartbeat(state="leaving").dumps())  # same key, new body: parsed anew
    assert (beat.seq, beat.state) == (2, "leaving") and first.state == "ready"
    for _ in range(2):
        with pytest.raises(MalformedRecord):
            cache(b'{"instance_id": "i-1"}')
    assert len(cache) == 2  # a malformed body is never kept
    cache(rec.heartbeat().heartbeat().dumps())
    assert len(cache) == 2 and cache(body) is not first  # the oldest was forgotten
    with pytest.raises(AttributeError):
        first.state = "x"  # type: ignore[misc]


def test_peer_from_a_read_is_the_peer_from_its_record() -> None:
    """``PeerInfo.from_read`` takes the record's part from the cache (strings shared by
    every observer); ``from_record`` of the parsed body is the referee."""
    from agent.group.membership import MemberRecord
    from agent.group.peers import PeerInfo, Read

    rec = MemberRecord("i-1", "g", 7, "degraded", az="az-b", private_ip="10.0.0.7",
                       endpoint="http://10.0.0.7:7467",
                       health={"status": "warning", "checks": {}})
    for body in (rec.dumps(), bytes(bytearray(rec.dumps()))):
        r = Read("changed", '"e7"', 1000.0, 1004.0, body)
        got = PeerInfo.from_read(r)
        assert got == PeerInfo.from_record(MemberRecord.loads(body), etag='"e7"',
                                           last_modified=1000.0, store_now=1004.0)
        assert (got.health, got.state, got.seq) == ("warning", "degraded", 7)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([f"i-{n}" for n in range(40)]), st.integers(0, 4),
       st.lists(st.sets(IDS, max_size=40), min_size=1, max_size=25))
def test_ring_kept_between_calls_is_watch_set(observer: str, k: int, rounds: list) -> None:
    """The ring a watcher keeps (only changes applied) answers what a fresh sort answers."""
    from agent.group.membership import Ring, watch_set

    ring = Ring(observer, k)
    for ids in rounds:
        assert ring.watch_set(frozenset(ids)) == watch_set(observer, ids, k)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(IDS, st.one_of(st.none(), st.tuples(
    st.sampled_from(["booting", "ready", "leaving", "superseded"]),
    st.sampled_from(["", "az-a", "az-b"]), st.sampled_from(["", "http://e"]))), max_size=12),
    min_size=1, max_size=20), st.sampled_from(["i-0", "i-1", "i-99"]))
def test_patched_roster_is_the_roster_of_the_view(edits: list, self_id: str) -> None:
    """Patching the roster with the changed ids gives ``Roster.of`` of the whole view; every
    older roster (and its zones, endpoints, counts) is left as it was."""
    from agent.group.peers import PeerInfo, Roster

    view: dict = {}
    roster = Roster.of(view, self_id)
    history = []
    for changes in edits:
        for m, v in changes.items():
            if v is None:
                view.pop(m, None)
            else:
                view[m] = PeerInfo(m, az=v[1], state=v[0], endpoint=v[2])
        roster.zones.counts()  # known counts are carried over by the patch
        roster = roster.patched(view, self_id, changes)
        want = Roster.of(view, self_id)
        assert (roster.members, roster.departing) == (want.members, want.departing)
        assert dict(roster.zones) == dict(want.zones)
        assert dict(roster.endpoints) == dict(want.endpoints)
        assert dict(roster.zones.counts()) == dict(want.zones.counts())
        history.append((roster, dict(roster.zones), dict(roster.endpoints)))
    for r, zones, endpoints in history:
        assert dict(r.zones) == zones and dict(r.endpoints) == endpoints


def test_frozen_map_updated_leaves_the_original() -> None:
    zones = FrozenMap({"a": "z1", "b": "z1", "c": "z2"})
    assert dict(zones.counts()) == {"z1": 2, "z2": 1}
    new = zones.updated({"a": None, "c": "z1", "d": "z3", "e": None})
    assert dict(new) == {"b": "z1", "c": "z1", "d": "z3"}
    assert dict(new.counts()) == {"z1": 2, "z3": 1}
    assert dict(zones) == {"a": "z1", "b": "z1", "c": "z2"}
    assert dict(zones.counts()) == {"z1": 2, "z2": 1}
