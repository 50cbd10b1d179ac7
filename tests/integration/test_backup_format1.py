"""Snapshots written before packs (format 1: one object per fixed-size chunk) still restore,
are collected like packs once retired, and a format-2 backup on top of them works.

``write_v1`` is the previous version's backup writer kept as a small legacy writer: it
stores exactly what main's ``agent/data/backup.py`` stored (``chunks/<sha256>`` per fixed-size
chunk, an uncompressed format-1 manifest with each file's whole sha256, written last).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from agent.aws.store import Store
from agent.data import backup as B
from agent.data import plan as D
from agent.data import restore as R
from agent.errors import IntegrityError
from tests.integration.test_backup_restore import describe, make_tree

G, N = "web", "app"
CHUNK = 64 * 1024


@pytest.fixture
def store(moto: Any) -> Store:
    s = Store("fleet-bucket", "prod")
    s.ensure_bucket()
    return s


def write_v1(store: Store, root: Path, snap_id: str, chunk_size: int = CHUNK) -> D.Manifest:
    files, dirs, links = [], [], []
    for rel, st in B._walk(root):
        if stat.S_ISDIR(st.st_mode):
            dirs.append(D.DirEntry(rel, st.st_mode & 0o7777, st.st_mtime, st.st_uid, st.st_gid))
        elif stat.S_ISLNK(st.st_mode):
            links.append(D.LinkEntry(rel, os.readlink(root / rel)))
        elif stat.S_ISREG(st.st_mode):
            data = (root / rel).read_bytes()
            shas = []
            for i in range(0, len(data), chunk_size):
                piece = data[i:i + chunk_size]
                sha = hashlib.sha256(piece).hexdigest()
                store.put(f"data/{G}/{N}/chunks/{sha}", piece)
                shas.append(sha)
            files.append(D.FileEntry(rel, st.st_mode & 0o7777, len(data), st.st_mtime,
                                     hashlib.sha256(data).hexdigest(), tuple(shas),
                                     st.st_uid, st.st_gid))
    rst = root.stat()
    m = D.Manifest(id=snap_id, group=G, name=N, created=1.0, instance_id="i-old",
                   chunk_size=chunk_size, files=tuple(files), dirs=tuple(dirs),
                   symlinks=tuple(links), root_mode=rst.st_mode & 0o7777, format=D.FORMAT_V1)
    body = m.dumps()
    assert json.loads(body)["format"] == 1 and "packs" not in json.loads(body)
    store.create(D.snapshot_key(G, N, snap_id), body)
    return m


def test_format1_snapshot_restores_exactly(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    write_v1(store, src, "20250101T000000Z-000-i-old-0000")
    res = R.restore(store, G, N, tmp_path / "r" / "app")
    assert res.snapshot_id == "20250101T000000Z-000-i-old-0000"
    assert describe(tmp_path / "r" / "app") == describe(src)


def test_format1_corruption_refused(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    m = write_v1(store, src, "20250101T000000Z-000-i-old-0000")
    f = next(f for f in m.files if f.path == "sub/big.bin")
    key = f"data/{G}/{N}/chunks/{f.chunks[1]}"
    body = store.get(key).body
    store.put(key, body[:-1])
    with pytest.raises(IntegrityError, match="truncated") as err:
        R.restore(store, G, N, tmp_path / "r" / "app")
    assert f.path in str(err.value) and f.chunks[1] in str(err.value)
    store.put(key, bytes([body[0] ^ 1]) + body[1:])
    with pytest.raises(IntegrityError, match="checksum"):
        R.restore(store, G, N, tmp_path / "r" / "app")
    store.delete(key)
    with pytest.raises(IntegrityError, match="missing"):
        R.restore(store, G, N, tmp_path / "r" / "app")
    assert not (tmp_path / "r" / "app").exists()


def test_format2_backups_on_top_then_format1_collected(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    make_tree(src)
    old = write_v1(store, src, "20250101T000000Z-000-i-old-0000")
    policy = D.GcPolicy(min_chunk_age_s=0, lock_ttl_s=3600)
    first = B.Backup(store, G, N, src, chunk_size=CHUNK, keep=2, policy=policy).run()
    assert first.collected == 0  # the old snapshot is kept: its chunks too
    assert B.list_snapshots(store, G, N) == [old.id, first.snapshot_id]
    R.restore(store, G, N, tmp_path / "old", snapshot_id=old.id)
    assert describe(tmp_path / "old") == describe(src)
    (src / "small.txt").write_text("changed\n")
    second = B.Backup(store, G, N, src, chunk_size=CHUNK, keep=2, policy=policy).run()
    assert old.id in second.retired and second.collected == len(old.objects())
    assert store.list(f"data/{G}/{N}/chunks/").entries == ()
    R.restore(store, G, N, tmp_path / "new")
    assert describe(tmp_path / "new") == describe(src)
