"""The pure data-snapshot core: chunk grid, manifests, path safety, retention, GC, decisions."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.data import plan as D
from agent.errors import IntegrityError

SHA = "a" * 64
SHA2 = "b" * 64


def manifest(**over: object) -> dict:
    m = {"format": 1, "id": "20260101T000000Z-i-1-abcd", "group": "web", "name": "app",
         "created": 1.0, "instance_id": "i-1", "chunk_size": 4, "root_mode": 0o755,
         "files": [{"path": "a/b.txt", "mode": 0o644, "size": 6, "mtime": 2.0,
                    "sha256": SHA, "chunks": [SHA, SHA2]}],
         "dirs": [{"path": "a", "mode": 0o755, "mtime": 1.0}],
         "symlinks": [{"path": "l", "target": "/etc/passwd"}]}
    m.update(over)
    return m


def raw(m: dict) -> bytes:
    return json.dumps(m).encode()


@pytest.mark.parametrize(("size", "chunk", "expected"), [
    (0, 4, []), (1, 4, [1]), (4, 4, [4]), (5, 4, [4, 1]), (12, 4, [4, 4, 4]),
])
def test_chunk_lengths(size: int, chunk: int, expected: list[int]) -> None:
    assert D.chunk_lengths(size, chunk) == expected


@given(st.integers(0, 10**8), st.integers(10**4, 10**7))
def test_chunk_lengths_cover_the_file(size: int, chunk: int) -> None:
    lens = D.chunk_lengths(size, chunk)
    assert sum(lens) == size and all(0 < n <= chunk for n in lens)
    assert all(n == chunk for n in lens[:-1])


def test_chunk_size_bounds() -> None:
    assert D.check_chunk_size(D.DEFAULT_CHUNK_SIZE) == D.MIB // 4
    for bad in (0, 100, 8 * D.MIB + 1):
        with pytest.raises(ValueError):
            D.check_chunk_size(bad)


@pytest.mark.parametrize("path", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.",
                                  "", "a\x00b", "a\\b", 5, None])
def test_unsafe_paths_refused(path: object) -> None:
    with pytest.raises(IntegrityError):
        D.safe_rel(path)


@pytest.mark.parametrize("path", ["a", "a/b/c", ".hidden", "a..b", "...x"])
def test_safe_paths(path: str) -> None:
    assert D.safe_rel(path) == path


def test_manifest_roundtrip() -> None:
    m = D.parse_manifest(raw(manifest()))
    assert m.files[0].chunks == (SHA, SHA2) and m.total_bytes == 6 and m.format == 1
    assert m.objects() == {f"chunks/{SHA}", f"chunks/{SHA2}"}
    again = D.parse_manifest(m.dumps())
    assert again == m
    assert json.loads(m.dumps())["total_bytes"] == 6


@pytest.mark.parametrize(("change", "message"), [
    ({"format": 3}, "format"),
    ({"files": [{"path": "/abs", "mode": 420, "size": 0, "mtime": 0, "sha256": SHA,
                 "chunks": []}]}, "unsafe"),
    ({"files": [{"path": "x", "mode": 420, "size": 5, "mtime": 0, "sha256": SHA,
                 "chunks": [SHA]}]}, "1 chunks for 5 bytes"),
    ({"files": [{"path": "x", "mode": 420, "size": 1, "mtime": 0, "sha256": "zz",
                 "chunks": [SHA]}]}, "bad sha256"),
    ({"files": [{"path": "l/x", "mode": 420, "size": 0, "mtime": 0, "sha256": SHA,
                 "chunks": []}]}, "below the file or symlink 'l'"),
    ({"dirs": [{"path": "a", "mode": 493, "mtime": 0}, {"path": "a", "mode": 493, "mtime": 0}]},
     "twice"),
    ({"symlinks": [{"path": "s", "target": ""}]}, "symlink target"),
])
def test_bad_manifests_refused(change: dict, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        D.parse_manifest(raw(manifest(**change)))


def test_not_json() -> None:
    with pytest.raises(IntegrityError, match="JSON"):
        D.parse_manifest(b"{nope")


def test_snapshot_ids_sort_by_time_and_parse_from_listing() -> None:
    a = D.new_snapshot_id(1_700_000_000, "i-b", "ffff")
    b = D.new_snapshot_id(1_700_000_001, "i-a", "0000")
    assert a < b and a.startswith("20231114T221320Z-000-i-b-")
    c = D.new_snapshot_id(1_700_000_001, "i-a", after=b)
    d = D.new_snapshot_id(1_699_999_000, "i-a", after=c)  # store clock stepped back
    assert b < c < d and c[:20] == "20231114T221321Z-001" and d[:20] == "20231114T221321Z-002"
    keys = [D.snapshot_key("web", "app", b), D.snapshot_key("web", "app", a),
            "data/web/app/snapshots/junk.txt", "data/web/app/chunks/" + SHA]
    assert D.snapshot_ids(keys, "web", "app") == [a, b]
    assert "/" not in D.new_snapshot_id(0, "i/../x")


@pytest.mark.parametrize(("n", "keep", "kept", "retired"), [
    (0, 3, 0, 0), (2, 3, 2, 0), (3, 3, 3, 0), (5, 3, 3, 2), (5, 1, 1, 4),
])
def test_retire_keeps_newest(n: int, keep: int, kept: int, retired: int) -> None:
    ids = [f"2026010{i}T000000Z-x" for i in range(n)]
    k, r = D.retire(list(reversed(ids)), keep)
    assert len(k) == kept and len(r) == retired
    assert k == sorted(ids)[len(ids) - kept:]
    assert set(k) | set(r) == set(ids)


def test_retire_refuses_zero() -> None:
    with pytest.raises(ValueError):
        D.retire(["a"], 0)


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.floats(0, 200)), max_size=20),
       st.sets(st.sampled_from("abcdef")), st.floats(0, 100))
def test_collectable_never_touches_referenced_or_young(chunks: list, referenced: set,
                                                       min_age: float) -> None:
    now = 200.0
    doomed = D.collectable(chunks, referenced, now, min_age)
    for sha in doomed:
        assert sha not in referenced
        assert any(s == sha and now - lm >= min_age for s, lm in chunks)


def test_collectable_table() -> None:
    chunks = [("old-unref", 0.0), ("young-unref", 99.0), ("old-ref", 0.0)]
    assert D.collectable(chunks, {"old-ref"}, 100.0, 10.0) == ["old-unref"]
    assert D.collectable(chunks, set(), 100.0, 0.0) == ["old-ref", "old-unref", "young-unref"]


@pytest.mark.parametrize(("last", "interval", "now", "expected"), [
    (None, 300, 0, True), (0, 300, 299, False), (0, 300, 300, True), (100, 60, 50, False),
])
def test_due(last: float | None, interval: float, now: float, expected: bool) -> None:
    assert D.due(last, interval, now) is expected


@pytest.mark.parametrize(("kind", "local", "here", "action", "aside"), [
    ("first", "missing", False, "restore", False),
    ("first", "empty", False, "restore", False),
    ("reboot", "missing", False, "restore", False),
    ("reboot", "empty", True, "restore", False),
    ("reboot", "data", False, "keep", False),
    ("reboot", "data", True, "keep", False),
    ("first", "data", True, "keep", False),   # re-run of a first boot that already restored
    ("first", "data", False, "restore", True),  # seed content: moved aside, never deleted
])
def test_decide_restore(kind: str, local: str, here: bool, action: str, aside: bool) -> None:
    d = D.decide_restore(kind, local, here)
    assert (d.action, d.move_aside) == (action, aside)


def test_progress_ticks_and_rate() -> None:
    p = D.Progress(total=100, started=0.0, every_s=1.0)
    assert p.tick(0.0)
    p.add(10)
    assert not p.tick(0.5)
    assert p.tick(1.0)
    p.add(90)
    assert p.tick(1.1)  # done: always report
    assert p.info(2.0) == {"bytes": 100, "total": 100, "rate": 50.0, "files": 0,
                           "files_total": 0, "elapsed_s": 2.0, "eta_s": 0.0}
    half = D.Progress(total=100, started=0.0, files_total=4)
    half.add(25)
    assert half.info(5.0)["eta_s"] == 15.0  # 5 B/s, 75 B to go


def v2(**over: object) -> dict:
    m = manifest(format=2, chunker="fastcdc-1-4-16", since_full=3,
                 packs={"c" * 64: [[SHA, 0, 4], [SHA2, 4, 2]]})
    del m["files"][0]["sha256"]
    m["files"][0].update(mtime_ns=2_000_000_000, ctime_ns=5, ino=77)
    m.update(over)
    return m


def test_format2_manifest_roundtrip() -> None:
    m = D.parse_manifest(raw(v2()))
    assert m.format == 2 and m.since_full == 3 and m.total_bytes == 6
    assert m.blobs[SHA2] == D.Loc(f"packs/{'c' * 64}", 4, 2)
    assert m.objects() == {f"packs/{'c' * 64}"}
    f = m.files[0]
    assert (f.mtime_ns, f.ctime_ns, f.ino, f.sha256) == (2_000_000_000, 5, 77, "")
    packed = m.dumps()
    assert packed[:2] == b"\x1f\x8b"  # gzipped
    assert D.parse_manifest(packed) == m


@pytest.mark.parametrize(("change", "message"), [
    ({"packs": {"c" * 64: [[SHA, 0, 4]]}}, "is in no pack"),
    ({"packs": {"c" * 64: [[SHA, 0, 4], [SHA2, 4, 3]]}}, "chunks hold 7 bytes, the file 6"),
    ({"packs": {"../x": [[SHA, 0, 4], [SHA2, 4, 2]]}}, "bad pack entry"),
    ({"packs": {"c" * 64: [[SHA, -1, 4], [SHA2, 4, 2]]}}, "bad blob entry"),
    ({"packs": None}, "no pack table"),
])
def test_bad_format2_manifests_refused(change: dict, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        D.parse_manifest(raw(v2(**change)))


def test_unchanged_needs_every_field_to_match() -> None:
    prev = D.FileEntry("f", 0o644, 10, 1.0, "", (SHA,), mtime_ns=1, ctime_ns=2, ino=3)
    assert D.unchanged(prev, 10, 1, 2, 3)
    for args in ((11, 1, 2, 3), (10, 9, 2, 3), (10, 1, 9, 3), (10, 1, 2, 9)):
        assert not D.unchanged(prev, *args)
    assert not D.unchanged(None, 10, 1, 2, 3)
    assert not D.unchanged(D.FileEntry("f", 0o644, 10, 1.0, SHA, (SHA,)), 10, 1, 2, 3)


def test_full_rehash_due() -> None:
    assert D.full_rehash_due(None)  # nothing to compare with
    assert not D.full_rehash_due(0, every=3) and not D.full_rehash_due(1, every=3)
    assert D.full_rehash_due(2, every=3)
