"""kill -9 a backup or a restore at random moments: nothing committed is ever lost or partial.

Each round starts a subprocess (imports done before it says "ready"), kills it with
SIGKILL at a random point of its work, and checks the invariants:
- backup: every snapshot listed restores completely and verified (an interrupted backup,
  or an interrupted collection, never breaks a committed snapshot); the format is the pack
  format, with small packs and files skipped unread as unchanged;
- restore: the target is exactly the old tree or exactly the snapshot, never a mix, and
  the old content is never lost (it is moved aside).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.aws.store import Store
from agent.data import backup as B
from agent.data import restore as R
from tests.integration.test_backup_restore import describe as _describe

G, N = "web", "app"
CHUNK = 4096
ROUNDS = 20

SCRIPT = r"""
import os, random, sys, traceback
from pathlib import Path
from agent.aws import session as aws
from agent.data import backup as B
from agent.data import plan as D
from agent.data import restore as R
from agent.aws.store import Store
mode, path = sys.argv[1], Path(sys.argv[2])
aws.client("s3")   # load botocore's models once; children only build a client
print("ready", flush=True)

def work(seed):
    store = Store("fleet-bucket", "prod")
    if mode == "backup":
        rnd = random.Random(seed)
        for i in range(8):  # some files change each round, the rest are skipped unread
            if i == 0 or rnd.random() < 0.5:
                (path / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(0, 6 * 4096)))
        # small packs: a round uploads several, so kills land between pack uploads too
        B.Backup(store, "web", "app", path, chunk_size=4096, keep=3, instance_id="i-1",
                 concurrency=4, pack_target=8192, rehash_every=3,
                 policy=D.GcPolicy(min_chunk_age_s=0, lock_ttl_s=1)).run()
    else:
        R.restore(store, "web", "app", path, force=True, concurrency=4)

for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            work(int(line))
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"exit {status}", flush=True)
"""


def describe(root: Path) -> dict[str, tuple]:
    """The tree without file mtimes (the old tree is re-created each round)."""
    return {k: v[:3] for k, v in _describe(root).items()}


class Workers:
    """A fork server: one process pays for the imports once and forks a worker per round,
    which the test kills with SIGKILL by its PID. The server is stopped by its PID too."""

    def __init__(self, mode: str, path: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, mode, str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.buf = b""
        self.last = 0.0
        assert self._line(60) == "ready"

    def _line(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError("fork server died")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()

    def run(self, seed: int, kill_after: float | None) -> str:
        """One round: 'killed' if SIGKILLed after ``kill_after`` s, else 'done'."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seed}\n".encode())
        self.proc.stdin.flush()
        pid = int(self._line(30) or 0)
        t0 = time.monotonic()
        status = self._line(60 if kill_after is None else kill_after)
        if status is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished (and was reaped) just before the kill
                status = self._line(30)
            else:
                status = self._line(30)
                assert status is not None
                return "killed"
        self.last = time.monotonic() - t0
        assert status == "exit 0", f"worker failed: {status}"
        return "done"

    def timed(self, seed: int) -> float:
        """Seconds one uninterrupted round takes."""
        self.run(seed, None)
        return self.last

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def store(moto: Any) -> Store:
    s = Store("fleet-bucket", "prod")
    s.ensure_bucket()
    return s


def test_killed_backups_never_break_a_committed_snapshot(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(42)
    workers = Workers("backup", src)
    killed = 0
    try:
        span = workers.timed(0)
        for i in range(1, ROUNDS + 1):
            if workers.run(i, rnd.uniform(0, span * 1.2)) == "killed":
                killed += 1
            else:  # warm caches make later rounds faster: aim the kills at the real duration
                span = min(span, workers.last)
            latest = B.latest_snapshot(store, G, N)
            assert latest is not None  # the first, uninterrupted backup at least
            R.restore(store, G, N, tmp_path / f"check-{i}", snapshot_id=latest)
    finally:
        workers.close()
    assert killed >= ROUNDS // 2
    for sid in B.list_snapshots(store, G, N):  # every committed snapshot is whole
        R.restore(store, G, N, tmp_path / f"final-{sid}", snapshot_id=sid)


def _old_tree(target: Path) -> None:
    target.mkdir(parents=True)
    for i in range(5):
        (target / f"old{i}").write_bytes(bytes([i]) * 5000)


def test_killed_restores_leave_old_or_new_never_partial(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(7)
    for i in range(20):
        (src / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 8 * CHUNK)))
    (src / "d").mkdir()
    os.symlink("../f1", src / "d" / "link")
    B.Backup(store, G, N, src, chunk_size=CHUNK).run()
    new = describe(src)
    reference = tmp_path / "reference-old"
    _old_tree(reference)
    old = describe(reference)

    parent = tmp_path / "srv"
    target = parent / "app"
    _old_tree(target)
    workers = Workers("restore", target)
    try:
        span = workers.timed(0)
        _rounds(workers, span, parent, target, old, new, rnd)
    finally:
        workers.close()


def _rounds(workers: Workers, span: float, parent: Path, target: Path, old: dict, new: dict,
            rnd: random.Random) -> None:
    killed = 0
    for i in range(1, ROUNDS + 1):
        # put the old tree back in place (whatever the last round left)
        for p in list(parent.iterdir()):
            if p.name != ".app.restore.lock":
                subprocess.run(["rm", "-rf", str(p)], check=True)
        _old_tree(target)
        if workers.run(i, rnd.uniform(0, span * 1.2)) == "killed":
            killed += 1
        else:  # warm caches make later rounds faster: aim the kills at the real duration
            span = min(span, workers.last)
        now = describe(target)
        assert now in (old, new), f"round {i}: partial data dir"
        if now == new:
            # the old content was moved aside (or sits under an interrupted swap's name,
            # which the next restore moves aside): never lost
            R._clean_stale(parent, "app")
            asides = list(parent.glob(".app.replaced-*"))
            assert any(describe(a) == old for a in asides), f"round {i}: old content lost"
    assert killed >= ROUNDS // 2
