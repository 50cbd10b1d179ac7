"""Backup and restore of data dirs against a real moto_server."""

from __future__ import annotations

import os
import random
import stat
import threading
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from agent.aws.imds import Identity
from agent.aws.store import Store
from agent.bootctx import BootContext
from agent.clock import Deadline, FakeClock
from agent.config.model import load_layers
from agent.data import backup as B
from agent.data import plan as D
from agent.data import restore as R
from agent.errors import AgentError, IntegrityError, NotFound, StoreError
from agent.paths import Paths

CHUNK = 64 * 1024
G, N = "web", "app"


@pytest.fixture
def store(moto: Any) -> Store:
    s = Store("fleet-bucket", "prod")
    s.ensure_bucket()
    return s


def make_tree(root: Path, seed: int = 1) -> None:
    rnd = random.Random(seed)
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello\n")
    (root / "sub" / "big.bin").write_bytes(rnd.randbytes(3 * CHUNK + 123))
    (root / "sub" / "deep" / "exact.bin").write_bytes(rnd.randbytes(2 * CHUNK))
    (root / "sub" / "zeros.bin").write_bytes(bytes(4 * CHUNK))  # repeated identical chunks
    os.chmod(root / "small.txt", 0o600)
    os.chmod(root / "sub" / "deep", 0o750)
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("sub/big.bin", root / "rel-link")
    os.symlink("does-not-exist", root / "dangling")
    os.utime(root / "small.txt", (1_600_000_000, 1_600_000_000))


def describe(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode & 0o7777)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, p.read_bytes(), int(st.st_mtime))
    return out


def do_backup(store: Store, root: Path, **kw: Any) -> B.BackupResult:
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("instance_id", "i-1")
    return B.Backup(store, G, N, root, **kw).run()


def test_roundtrip_is_exact(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.chmod(src, 0o710)
    make_tree(src)
    res = do_backup(store, src)
    assert res.files == 5 and res.total_bytes == 6 + 9 * CHUNK + 123
    # zeros.bin's 4 identical chunks are stored once
    assert res.uploaded_chunks == len({c for f in B.load_manifest(
        store, G, N, res.snapshot_id).files for c in f.chunks})
    seen: list[dict] = []
    dst = tmp_path / "restore" / "app"
    out = R.restore(store, G, N, dst, progress=seen.append, concurrency=3)
    assert out.snapshot_id == res.snapshot_id and out.moved_aside is None
    assert describe(dst) == describe(src)
    assert dst.stat().st_mode & 0o7777 == 0o710
    assert seen and seen[-1]["bytes"] == seen[-1]["total"] == res.total_bytes
    assert sorted(p.name for p in dst.parent.iterdir()) == [".app.restore.lock", "app"]


def test_background_flushes_during_a_restore(store: Store, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Small files are written back by a background syncfs (here woken by every write) while
    the fetch threads still create and write: the tree is still exact, the flusher's own
    handle of the staging dir is closed, and it really ran."""
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    for i in range(40):
        (src / f"f{i:02d}").write_bytes(random.Random(i).randbytes(100 + i))
    do_backup(store, src)
    ran: list[int] = []
    real, close = R._syncfs, R._Flusher.close
    flushed = threading.Event()  # before the flusher closes, only it calls syncfs

    def syncfs(fd: int) -> bool:
        ran.append(fd)
        flushed.set()
        return real(fd)

    def wait_then_close(self: Any) -> None:
        flushed.wait(30)
        close(self)

    monkeypatch.setattr(R, "FLUSH_EVERY", 1)
    monkeypatch.setattr(R, "_syncfs", syncfs)
    monkeypatch.setattr(R._Flusher, "close", wait_then_close)
    fds = set(os.listdir("/proc/self/fd"))
    dst = tmp_path / "restore" / "app"
    R.restore(store, G, N, dst, concurrency=4)
    assert describe(dst) == describe(src)
    assert len(set(ran)) == 2  # the flusher's own handle (at least once), then the final one
    assert set(os.listdir("/proc/self/fd")) == fds


def test_each_file_is_opened_once_and_written_back_in_batches(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file is created by its first write and stays open until its last: one open per
    file, not one per chunk; chunks that follow each other in a pack and in the file go out
    in one write; a large file's writeback starts each ``WRITEBACK_EVERY`` bytes and once
    complete, not per chunk. The tree is exact and no file is left open."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(5)
    for i in range(3):  # above WRITEBACK_MIN, about 20 chunks each
        (src / f"big{i}.bin").write_bytes(rnd.randbytes(20 * CHUNK + i))
    (src / "small").write_bytes(b"x" * 10)
    (src / "empty").write_bytes(b"")
    do_backup(store, src)
    m = B.load_manifest(store, G, N, B.latest_snapshot(store, G, N))
    blobs = {f.path: len(f.chunks) for f in m.files}
    assert all(blobs[f"big{i}.bin"] >= 10 for i in range(3))

    opens: dict[str, int] = {}
    writes: dict[str, int] = {}
    writebacks: dict[str, int] = {}
    real_open, real_pwrite = os.open, os.pwrite

    def name(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1]

    def counting_open(path: Any, flags: int, mode: int = 0o777, *,
                      dir_fd: int | None = None) -> int:
        if isinstance(path, str) and path in blobs:
            opens[path] = opens.get(path, 0) + 1
        return real_open(path, flags, mode, dir_fd=dir_fd)

    def counting_pwrite(fd: int, data: Any, offset: int) -> int:
        writes[name(fd)] = writes.get(name(fd), 0) + 1
        return real_pwrite(fd, data, offset)

    def counting_writeback(fd: int) -> None:
        writebacks[name(fd)] = writebacks.get(name(fd), 0) + 1

    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "pwrite", counting_pwrite)
    monkeypatch.setattr(R, "_start_writeback", counting_writeback)
    monkeypatch.setattr(R, "WRITEBACK_EVERY", 8 * CHUNK)
    fds = set(os.listdir("/proc/self/fd"))
    dst = tmp_path / "restore" / "app"
    R.restore(store, G, N, dst, concurrency=4)
    monkeypatch.undo()
    assert describe(dst) == describe(src)
    assert set(os.listdir("/proc/self/fd")) == fds
    assert opens == dict.fromkeys(blobs, 1)
    for i in range(3):
        f = f"big{i}.bin"
        assert writes[f] <= blobs[f] // 2, (writes, blobs)
        assert 1 <= writebacks[f] <= 20 * CHUNK // (8 * CHUNK) + 1, writebacks
    assert "small" not in writebacks  # small files: the background syncfs


def test_more_files_in_progress_than_kept_open(store: Store, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``MAX_OPEN`` files in progress, a write opens and closes its file itself: the
    tree is still exact, and nothing is left open."""
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(6)
    for i in range(8):
        (src / f"f{i}").write_bytes(rnd.randbytes(5 * CHUNK + i))
    do_backup(store, src, pack_target=3 * CHUNK)  # files span packs, fetched in parallel
    monkeypatch.setattr(R, "MAX_OPEN", 1)
    fds = set(os.listdir("/proc/self/fd"))
    dst = tmp_path / "restore" / "app"
    R.restore(store, G, N, dst, concurrency=4)
    assert describe(dst) == describe(src)
    assert set(os.listdir("/proc/self/fd")) == fds


@pytest.mark.skipif(os.geteuid() != 0, reason="restores owners only as root")
def test_setuid_and_setgid_bits_survive_the_owner_restore(store: Store, tmp_path: Path) -> None:
    """A chown clears a file's setuid/setgid bits, even as root: the owner goes first."""
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    tool = src / "bin" / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    os.chown(tool, 1234, 2345)
    os.chmod(tool, 0o6755)
    big = src / "bin" / "big"  # more than one chunk: created before its bytes arrive
    big.write_bytes(random.Random(3).randbytes(3 * CHUNK))
    os.chown(big, 1234, 2345)
    os.chmod(big, 0o4750)
    os.chown(src / "bin", 1234, 2345)
    os.chmod(src / "bin", 0o2775)
    do_backup(store, src)
    dst = tmp_path / "restore" / "app"
    R.restore(store, G, N, dst)
    for rel, mode in (("bin/tool", 0o6755), ("bin/big", 0o4750), ("bin", 0o2775)):
        st = (dst / rel).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (mode, 1234, 2345), rel
    assert describe(dst) == describe(src)


def test_unchanged_data_uploads_no_chunks_and_small_change_one(store: Store,
                                                               tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    first = do_backup(store, src)
    again = do_backup(store, src)
    assert again.uploaded_chunks == 0
    assert again.uploaded_bytes < 4096  # the manifest only
    with open(src / "sub" / "big.bin", "r+b") as f:
        f.seek(CHUNK + 10)
        f.write(b"changed")
    third = do_backup(store, src)
    assert third.uploaded_chunks == 1
    assert third.snapshot_id > again.snapshot_id > first.snapshot_id
    assert B.latest_snapshot(store, G, N) == third.snapshot_id


def test_retention_and_collection(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    policy = D.GcPolicy(min_chunk_age_s=0, lock_ttl_s=3600)
    ids = []
    for i in range(4):
        (src / "f.bin").write_bytes(random.Random(i).randbytes(2 * CHUNK))
        ids.append(do_backup(store, src, keep=2, policy=policy).snapshot_id)
    assert B.list_snapshots(store, G, N) == ids[-2:]
    packs = {e.key.split("/", 3)[-1] for e in store.list(f"data/{G}/{N}/packs/").entries}
    wanted = set()
    for sid in ids[-2:]:
        wanted |= B.load_manifest(store, G, N, sid).objects()
    assert packs == wanted and all(p.startswith("packs/") for p in packs)
    R.restore(store, G, N, tmp_path / "r1", snapshot_id=ids[-2])
    assert (tmp_path / "r1" / "f.bin").read_bytes() == random.Random(2).randbytes(2 * CHUNK)
    assert store.list(f"data/{G}/{N}/locks/").entries == ()


def test_young_unreferenced_chunks_survive_collection(store: Store, tmp_path: Path) -> None:
    """A concurrent backup's uploaded-but-uncommitted chunks are young: not collected."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_bytes(b"a" * 1000)
    (b / "y").write_bytes(b"b" * 3 * CHUNK)
    other = B.Backup(store, G, N, b, chunk_size=CHUNK, instance_id="i-b")
    other.begin()
    other.upload()
    other.end()  # even with its lock gone (say it stalled past the TTL), age protects it
    do_backup(store, a, keep=1, policy=D.GcPolicy(min_chunk_age_s=3600, lock_ttl_s=3600))
    assert other.manifest.objects()
    for obj in other.manifest.objects():
        assert store.head(f"data/{G}/{N}/{obj}") is not None
    # with no age protection and no lock, they are garbage: collected
    do_backup(store, a, keep=1, policy=D.GcPolicy(min_chunk_age_s=0, lock_ttl_s=3600))
    for obj in other.manifest.objects():
        assert store.head(f"data/{G}/{N}/{obj}") is None


def test_reused_old_chunk_is_not_collected_under_a_live_backup(store: Store,
                                                              tmp_path: Path) -> None:
    """The race age cannot cover: backup B reuses an *old* chunk that only a snapshot being
    retired references. B's lock makes the collector defer chunk deletion."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    shared = random.Random(7).randbytes(CHUNK)
    (a / "x").write_bytes(shared)
    old = do_backup(store, a)
    (b / "x").write_bytes(shared)
    live = B.Backup(store, G, N, b, chunk_size=CHUNK, instance_id="i-b")
    live.begin()
    live.upload()
    assert live.reused_chunks >= 1 and live.uploaded_chunks == 0
    (a / "x").write_bytes(b"new content")
    res = do_backup(store, a, keep=1, policy=D.GcPolicy(min_chunk_age_s=0, lock_ttl_s=3600))
    assert old.snapshot_id in res.retired
    assert "deferred" in res.gc_note and res.collected == 0
    live.commit()
    live.end()
    out = R.restore(store, G, N, tmp_path / "r", snapshot_id=live.snapshot_id)
    assert (out.target / "x").read_bytes() == shared


def test_backup_waits_for_a_live_collector(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"1")
    store.put(f"data/{G}/{N}/locks/gc-other", b"gc")
    clock = FakeClock()
    bk = B.Backup(store, G, N, src, chunk_size=CHUNK, clock=clock, gc_wait_s=2)
    with pytest.raises(StoreError, match="chunk collection"):
        bk.begin()
    assert clock.slept and sum(clock.slept) > 2
    assert [e.key for e in store.list(f"data/{G}/{N}/locks/").entries] == [
        f"prod/data/{G}/{N}/locks/gc-other".split("/", 1)[1]]
    # a crashed collector's lock is stale after the TTL: ignored
    bk = B.Backup(store, G, N, src, chunk_size=CHUNK, clock=clock,
                  policy=D.GcPolicy(lock_ttl_s=0))
    assert bk.run().files == 1


def test_stale_backup_lock_does_not_block_collection(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"1" * 100)
    do_backup(store, src)
    store.put(f"data/{G}/{N}/packs/{'0' * 64}", b"orphan")
    store.put(f"data/{G}/{N}/locks/backup-crashed", b"x")
    res = do_backup(store, src, policy=D.GcPolicy(min_chunk_age_s=0, lock_ttl_s=0))
    assert res.collected == 1 and not res.gc_note


def test_empty_dir_never_replaces_a_real_snapshot(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    do_backup(store, src)
    (src / "f").unlink()
    with pytest.raises(AgentError, match="empty"):
        do_backup(store, src)
    assert len(B.list_snapshots(store, G, N)) == 1
    assert do_backup(store, src, allow_empty=True).files == 0
    with pytest.raises(AgentError, match="not a directory"):
        do_backup(store, tmp_path / "missing")


def test_no_snapshot(store: Store, tmp_path: Path) -> None:
    res = R.restore(store, G, N, tmp_path / "t")
    assert res.snapshot_id is None and not (tmp_path / "t").exists()
    assert res.summary() == "app: no snapshot"


def test_existing_empty_dir_is_replaced_and_nonempty_refused(store: Store,
                                                            tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    do_backup(store, src)
    dst = tmp_path / "d" / "app"
    dst.mkdir(parents=True)
    res = R.restore(store, G, N, dst)
    assert res.moved_aside is None and describe(dst) == describe(src)
    assert sorted(p.name for p in dst.parent.iterdir()) == [".app.restore.lock", "app"]
    with pytest.raises(AgentError, match="not empty"):
        R.restore(store, G, N, dst)
    (dst / "local-only").write_text("mine")
    res = R.restore(store, G, N, dst, force=True)
    assert res.moved_aside is not None
    assert (res.moved_aside / "local-only").read_text() == "mine"
    assert describe(dst) == describe(src)


def _corrupt(store: Store, how: str) -> tuple[str, str]:
    """Damage the pack holding big.bin's last blob: the error must name that file and blob
    (missing: the pack, which the error names)."""
    sid = B.latest_snapshot(store, G, N)
    m = B.load_manifest(store, G, N, sid)
    f = next(f for f in m.files if f.path == "sub/big.bin")
    sha = f.chunks[-1]
    loc = m.blobs[sha]
    key = f"data/{G}/{N}/{loc.obj}"
    body = store.get(key).body
    if how == "missing":
        store.delete(key)
        return f.path if loc.offset == 0 else "", loc.obj.split("/")[1]
    if how == "truncated":
        store.put(key, body[:loc.offset + loc.length - 1])
    else:
        i = loc.offset + loc.length // 2
        store.put(key, body[:i] + bytes([body[i] ^ 1]) + body[i + 1:])
    return f.path, sha


@pytest.mark.parametrize(("how", "message"), [
    ("missing", "missing from the store"), ("truncated", "truncated"),
    ("flipped", "failed its checksum"),
])
@pytest.mark.parametrize("existing", ["missing", "empty"])
def test_corruption_is_refused_and_target_untouched(store: Store, tmp_path: Path, how: str,
                                                    message: str, existing: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    do_backup(store, src)
    path, sha = _corrupt(store, how)
    dst = tmp_path / "d" / "app"
    dst.parent.mkdir()
    if existing == "empty":
        dst.mkdir()
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(IntegrityError, match=message) as err:
        R.restore(store, G, N, dst)
    assert path in str(err.value) and sha in str(err.value)
    assert set(os.listdir("/proc/self/fd")) == fds  # the files in progress were closed
    assert dst.exists() is (existing == "empty")
    if existing == "empty":
        assert list(dst.iterdir()) == []
    assert sorted(p.name for p in dst.parent.iterdir() if p.name != ".app.restore.lock") == (
        ["app"] if existing == "empty" else [])


def test_read_range_streams_pieces(store: Store) -> None:
    """One ranged GET handed over piece by piece; a shorter object ends it with a short
    piece, a range past the end is none, a missing object NotFound; a stream let go half
    read leaves the store usable."""
    body = random.Random(5).randbytes(10_000)
    store.put("obj", body)
    assert list(store.read_range("obj", 100, 3100, [1000, 1500, 500])) == [
        body[100:1100], body[1100:2600], body[2600:3100]]
    assert list(store.read_range("obj", 9000, 12_000, [500, 2500])) == [
        body[9000:9500], body[9500:]]
    assert list(store.read_range("obj", 10_000, 10_500, [500])) == []
    with pytest.raises(NotFound):
        list(store.read_range("nope", 0, 10, [10]))
    for _ in range(12):  # more than the pool holds: an abandoned body must not pin one
        stream = store.read_range("obj", 0, 10_000, [10, 9990])
        assert next(stream) == body[:10]
        stream.close()
    assert list(store.read_range("obj", 0, 10, [10])) == [body[:10]]


def test_unsafe_manifest_writes_nothing(store: Store, tmp_path: Path) -> None:
    bad = {"format": 1, "chunk_size": CHUNK, "files": [
        {"path": "../escape", "mode": 420, "size": 0, "mtime": 0, "sha256": "0" * 64,
         "chunks": []}]}
    import json

    store.put(D.snapshot_key(G, N, "20990101T000000Z-i-x-0000"), json.dumps(bad).encode())
    with pytest.raises(IntegrityError, match="unsafe path"):
        R.restore(store, G, N, tmp_path / "d" / "app")
    assert not (tmp_path / "d").exists()
    assert not (tmp_path / "escape").exists()


def test_leftovers_of_a_killed_restore(tmp_path: Path) -> None:
    tmp_path = tmp_path / "p"
    tmp_path.mkdir()
    partial = tmp_path / ".app.restore-1-1"
    partial.mkdir()
    (partial / "half").write_text("x")
    (tmp_path / ".app.restore-1-1.building").touch()
    swapped_old = tmp_path / ".app.restore-2-2"  # old content after an interrupted exchange
    swapped_old.mkdir()
    (swapped_old / "precious").write_text("keep me")
    R._clean_stale(tmp_path, "app")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".app.replaced-2-2"]
    assert (tmp_path / ".app.replaced-2-2" / "precious").read_text() == "keep me"


def test_deadline_leaves_target_untouched(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    do_backup(store, src)
    clock = FakeClock()
    deadline = Deadline.after(0, "boot", clock)
    from agent.errors import DeadlineExceeded

    with pytest.raises(DeadlineExceeded):
        R.restore(store, G, N, tmp_path / "d" / "app", deadline=deadline, clock=clock)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".app.restore.lock"]


# -- boot phase --------------------------------------------------------------------------------

def Ctx(store: Store, boot_kind: str, data: list[dict[str, Any]],
        progressed: list[dict] | None = None) -> BootContext:
    """A real boot context after the config phase: real Config (schema defaults), identity."""
    cfg = load_layers(None, {"group": G, "store": {"bucket": "fleet-bucket", "prefix": "prod"},
                             "data": data})
    clock = FakeClock()
    ident = Identity("i-new", "ami-1", "t3.micro", "eu-west-1", "eu-west-1a", "10.0.0.1", "1")
    return BootContext(paths=Paths.from_env(), clock=clock,
                       deadline=Deadline.after(60, "boot", clock), started_wall=0.0,
                       previous={}, boot_id="b-1", identity=ident, boot_kind=boot_kind,
                       config=cfg, store=store,
                       progress=progressed.append if progressed is not None else lambda i: None)


def spec(**kw: Any) -> dict[str, Any]:
    return {"name": N, "path": "/var/lib/app", "keep": 10, "chunk_size": CHUNK,
            "backup_interval_s": 300, **kw}


def test_phase_restore_first_boot_then_reboot_keeps(store: Store, tmp_path: Path,
                                                    root: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    do_backup(store, src)
    progressed: list[dict] = []
    done = R.phase_restore(Ctx(store, "first", [spec()], progressed))
    target = root / "var" / "lib" / "app"
    assert "restored" in done.detail and describe(target) == describe(src)
    assert progressed and not done.ctx.degraded
    (target / "new-local").write_text("written by the service")
    # the same first boot, run again (a crash before it finished): local data kept
    assert R.phase_restore(Ctx(store, "first", [spec()])).detail == "app: kept local data"
    assert R.phase_restore(Ctx(store, "reboot", [spec()])).detail == "app: kept local data"
    assert (target / "new-local").exists()


def test_phase_restore_seed_content_moved_aside(store: Store, tmp_path: Path,
                                                root: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    do_backup(store, src)
    target = root / "var" / "lib" / "app"
    target.mkdir(parents=True)
    (target / "seed").write_text("from the image")
    detail = R.phase_restore(Ctx(store, "first", [spec()])).detail
    assert "moved to" in detail and describe(target) == describe(src)
    aside = next(target.parent.glob(".app.replaced-*"))
    assert (aside / "seed").read_text() == "from the image"


def test_phase_restore_no_snapshot_and_no_entries(store: Store) -> None:
    assert R.phase_restore(Ctx(store, "first", [spec()])).detail == "app: no snapshot"
    assert R.phase_restore(Ctx(store, "first", [])).detail == "no data entries"


def test_phase_restore_store_down(root: Path) -> None:
    down = Store("fleet-bucket", "prod", client=boto3.client(
        "s3", endpoint_url="http://127.0.0.1:9", config=Config(
            retries={"max_attempts": 1}, connect_timeout=0.5, read_timeout=0.5)))
    with pytest.raises(StoreError, match="required"):
        R.phase_restore(Ctx(down, "first", [spec()]))
    degraded = R.phase_restore(Ctx(down, "first", [spec(required=False)])).ctx.degraded
    assert degraded and "starting with missing dir" in degraded[0]
    target = root / "var" / "lib" / "app"
    target.mkdir(parents=True)
    (target / "f").write_text("local")
    degraded = R.phase_restore(Ctx(down, "first", [spec()])).ctx.degraded
    assert degraded and "kept local data" in degraded[0]
    assert (target / "f").read_text() == "local"


def test_run_backups_and_due(store: Store, root: Path) -> None:
    target = root / "var" / "lib" / "app"
    target.mkdir(parents=True)
    (target / "f").write_text("x")
    cfg = load_layers(None, {"group": G, "store": {"bucket": "fleet-bucket"},
                             "data": [spec(), spec(name="gone", path="/nope")]})
    out = B.run_backups(store, cfg, Paths.from_env(), instance_id="i-1", final=True)
    assert out[0].result is not None and out[0].result.files == 1
    assert out[1].result is None and "not a directory" in out[1].error
    m = B.load_manifest(store, G, N, out[0].result.snapshot_id)
    assert m.final and m.instance_id == "i-1"
    assert [s.name for s in B.backup_due(cfg, {"app": 100.0}, 200.0)] == ["gone"]


def test_unchanged_files_skipped_unread_and_changes_never_missed(store: Store,
                                                                 tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    first = do_backup(store, src)
    assert first.skipped_files == 0
    again = do_backup(store, src)
    assert again.skipped_files == 5 and again.uploaded_chunks == 0
    # same size, same mtime (set back): ctime still moves, so the file is read again
    big = src / "sub" / "big.bin"
    st = big.stat()
    data = bytearray(big.read_bytes())
    data[5] ^= 0xFF
    big.write_bytes(bytes(data))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    (src / "small.txt").write_bytes(b"HELLO\n")  # same size
    (src / "sub" / "zeros.bin").unlink()  # a new inode with the same content and size
    (src / "sub" / "zeros.bin").write_bytes(bytes(4 * CHUNK))
    third = do_backup(store, src)
    assert third.skipped_files == 2 and third.uploaded_chunks >= 2
    out = R.restore(store, G, N, tmp_path / "r" / "app")
    assert describe(out.target) == describe(src)


def test_periodic_full_read(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 1000)
    skipped = [do_backup(store, src, rehash_every=3).skipped_files for _ in range(7)]
    assert skipped == [0, 1, 1, 0, 1, 1, 0]
    # another instance's snapshot is no basis for skipping (its inodes are not ours)
    assert do_backup(store, src, instance_id="i-2").skipped_files == 0


def test_files_swapped_during_the_walk_are_left_out(store: Store, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the walk and the read a file can vanish or become a symlink or a FIFO: it is
    left out of the snapshot (it is not a regular file any more), never read, never hangs."""
    src = tmp_path / "src"
    src.mkdir()
    for n in ("gone", "link", "fifo", "kept"):
        (src / n).write_bytes(n.encode())
    walked = list(B._walk(src))
    (src / "gone").unlink()
    (src / "link").unlink()
    os.symlink("kept", src / "link")
    (src / "fifo").unlink()
    os.mkfifo(src / "fifo")
    monkeypatch.setattr(B, "_walk", lambda root: iter(walked))
    res = do_backup(store, src)
    m = B.load_manifest(store, G, N, res.snapshot_id)
    assert [f.path for f in m.files] == ["kept"]


def test_a_restore_does_not_import_s3transfer() -> None:
    """Restore and backup use the botocore client only: s3transfer (and the multiprocessing
    it imports, ~10 ms of CPU at every start) is imported by the callers that use it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from agent.data import backup, restore\n"
            "from agent.aws import session, store\n"
            "session.client('s3', 'us-east-1')\n"
            "print(sorted(m for m in ('s3transfer', 'boto3') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "AWS_EC2_METADATA_DISABLED": "true"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
