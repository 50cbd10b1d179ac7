"""Packs and fetch plans (pure), and content-defined chunking against a plain re-chunk."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.data import chunking
from agent.data import packs as P


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_pack_builder_seals_with_locations() -> None:
    pb = P.PackBuilder(target=10)
    blobs = [b"hello", b"world!", b"x"]
    for b in blobs[:2]:
        pb.add(sha(b), b)
    assert pb.full and len(pb) == 2
    pid, body, locs = pb.seal()
    assert body == b"helloworld!" and pid == P.pack_id([sha(b) for b in blobs[:2]])
    for b in blobs[:2]:
        loc = locs[sha(b)]
        assert loc.obj == f"packs/{pid}" and body[loc.offset:loc.offset + loc.length] == b
    assert len(pb) == 0 and not pb.full


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 5000)), min_size=1, max_size=40),
       st.integers(0, 3000), st.integers(1, 20000))
def test_plan_reads_every_blob_once_within_bounds(spec: list, gap: int, max_range: int) -> None:
    locs: dict[str, P.Loc] = {}
    ends = [0, 0, 0, 0]
    for i, (pack, ln) in enumerate(spec):
        locs[f"{i:064x}"] = P.Loc(f"packs/{pack:064x}", ends[pack], ln)
        ends[pack] += ln + (i % 3) * 700  # gaps: blobs of other snapshots
    plan = P.plan_fetches(locs, locs, max_gap=gap, max_range=max_range)
    seen = [b for f in plan for b in f.blobs]
    assert sorted(s for s, _, _ in seen) == sorted(locs)
    for f in plan:
        for s, off, ln in f.blobs:
            assert (off, ln) == (locs[s].offset, locs[s].length) and f.obj == locs[s].obj
            assert f.start <= off and off + ln <= f.end
        assert f.end - f.start <= max_range or len(f.blobs) == 1


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 3000), st.integers(0, 900)),
                min_size=1, max_size=40),
       st.integers(0, 2000), st.integers(1, 12000), st.integers(1, 6000))
def test_pieces_hand_each_blob_its_own_bytes(spec: list, gap: int, max_range: int,
                                             max_piece: int) -> None:
    """Ground truth: packs of random bytes; every blob read piece by piece, as the restore
    reads a range, is the blob's bytes, and no piece holds more than it must."""
    packs = [bytearray(), bytearray(), bytearray()]
    locs: dict[str, P.Loc] = {}
    want: dict[str, bytes] = {}
    for i, (pack, ln, hole) in enumerate(spec):
        packs[pack] += random.Random(i).randbytes(hole)  # bytes of blobs not needed
        data = random.Random(-i - 1).randbytes(ln)
        locs[f"{i:064x}"] = P.Loc(f"packs/{pack}", len(packs[pack]), ln)
        want[f"{i:064x}"] = data
        packs[pack] += data
    got: dict[str, bytes] = {}
    for f in P.plan_fetches(locs, locs, max_gap=gap, max_range=max_range):
        body = bytes(packs[int(f.obj.split("/")[1])][f.start:f.end])
        cuts = P.pieces(f, max_piece)
        assert sum(n for n, _ in cuts) == f.end - f.start
        assert [b for _, blobs in cuts for b in blobs] == list(f.blobs)
        start = f.start
        for n, blobs in cuts:
            assert n <= max_piece or len(blobs) == 1
            piece = body[start - f.start:start - f.start + n]
            for s, off, ln in blobs:
                got[s] = piece[off - start:off - start + ln]
            start += n
    assert got == want


def test_plan_merges_neighbours_and_fetches_v1_chunks_whole() -> None:
    a, b, c, d = (f"{i:064x}" for i in range(4))
    locs = {a: P.Loc("packs/p", 0, 100), b: P.Loc("packs/p", 100, 50),
            c: P.Loc("packs/p", 10_000, 10), d: P.Loc(f"chunks/{d}", 0, 7)}
    plan = P.plan_fetches([a, b, c, d], locs, max_gap=1000)
    assert {(f.obj, f.start, f.end, f.whole) for f in plan} == {
        ("packs/p", 0, 150, False), ("packs/p", 10_000, 10_010, False),
        (f"chunks/{d}", 0, 7, True)}
    # only what is needed: a restore of one file does not read the rest of the pack
    assert [(f.start, f.end) for f in P.plan_fetches([c], locs)] == [(10_000, 10_010)]


def test_collectable_objects() -> None:
    objs = [("packs/a", 0.0), ("packs/b", 0.0), ("packs/c", 95.0), ("chunks/d", 0.0)]
    assert P.collectable_objects(objs, {"packs/a"}, 100.0, 10.0) == ["chunks/d", "packs/b"]


def _chunks_of(path: Path, avg: int, block: int) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [bytes(c) for c in chunking.chunks(fd, avg, block)]
    finally:
        os.close(fd)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 300_000), st.integers(0, 2**32), st.sampled_from([1024, 4096, 16384]))
def test_streamed_chunks_equal_whole_buffer_chunks(tmp_path_factory: pytest.TempPathFactory,
                                                   size: int, seed: int, avg: int) -> None:
    data = random.Random(seed).randbytes(size)
    path = tmp_path_factory.mktemp("c") / "f"
    path.write_bytes(data)
    got = _chunks_of(path, avg, block=1)  # the smallest block: the most carry-overs
    assert b"".join(got) == data
    lengths = chunking.boundaries(data, avg)
    assert [len(c) for c in got] == lengths
    lo, _, hi = chunking.spec(avg)
    assert all(len(c) <= hi for c in got) and all(len(c) >= lo for c in got[:-1])


def test_insertion_near_the_start_keeps_later_chunks(tmp_path: Path) -> None:
    """The point of content-defined chunking, against fixed-size chunks."""
    data = random.Random(5).randbytes(4 * 1024 * 1024)
    changed = data[:5000] + os.urandom(1024) + data[5000:]
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(changed)
    before = {sha(c) for c in _chunks_of(tmp_path / "a", 65536, 1 << 20)}
    after = [sha(c) for c in _chunks_of(tmp_path / "b", 65536, 1 << 20)]
    new = [c for c in after if c not in before]
    assert len(new) <= 2 and len(after) > 30
    fixed = {sha(data[i:i + 65536]) for i in range(0, len(data), 65536)}
    fixed_after = [sha(changed[i:i + 65536]) for i in range(0, len(changed), 65536)]
    assert sum(c not in fixed for c in fixed_after) == len(fixed_after)  # all shifted
