"""Data snapshots: restore throughput against ``aws s3 sync``, and incremental backup size.

(1) 200 files totalling 200 MiB plus one 200 MiB file. The same tree is backed up by the
agent (chunks + manifest) and uploaded plainly by ``aws s3 sync``, to one moto server on
loopback; then both restore it into empty dirs. Ratio = awscli seconds / agent seconds
(goal >= 1.0). The agent also verifies every chunk and file checksum and fsyncs;
awscli does neither.
(2) A 200 MiB data set (100 files of 1 MiB, one 100 MiB file) is backed up, then 1 % of
it changes the way data dirs change: one small file rewritten (1 MiB), 512 KiB overwritten
in place mid-way through the big file (unaligned), 512 KiB appended to it. Bytes uploaded
by the next backup (chunks + manifest), as % of the data set (goal <= 3 %).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1024 * 1024
RESTORE_GOAL = 1.0
INCREMENTAL_GOAL = 3.0
TINY = {"small_files": 4, "small_total": 4 * MIB, "big": 4 * MIB}


def _fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


def _aws(args: list[str], endpoint: str, env: dict[str, str]) -> float:
    aws = str(Path(sys.executable).with_name("aws"))
    t0 = time.monotonic()
    subprocess.run([aws, "--endpoint-url", endpoint, "--only-show-errors", *args], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run(small_files: int = 200, small_total: int = 200 * MIB, big: int = 200 * MIB) -> dict:
    from agent import aws
    from agent import backup as B
    from agent import restore as R
    from agent.sim.moto import FAKE_CREDENTIALS, MotoServer
    from agent.store import Store

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    server = MotoServer(log_path=str(work / "moto.log"))
    saved = dict(os.environ)
    try:
        server.start()
        env = {**os.environ, **FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": server.url,
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
               "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "NO_PROXY": "*"}
        os.environ.update(env)

        def new_store() -> Store:
            client = aws.client("s3", max_pool_connections=B.DEFAULT_CONCURRENCY + 2,
                                read_timeout=60)
            return Store("bench", "b", client=client)

        store = new_store()
        store.ensure_bucket()

        # -- (1) restore throughput --------------------------------------------------------------
        src = work / "src"
        src.mkdir()
        for i in range(small_files):
            _fill(src / f"file-{i:03d}.bin", small_total // small_files)
        _fill(src / "big.bin", big)
        total = _tree_bytes(src)
        t0 = time.monotonic()
        bres = B.Backup(store, "bench", "restore", src, instance_id="i-bench").run()
        ours_backup = time.monotonic() - t0
        theirs_upload = _aws(["s3", "sync", str(src), "s3://bench/plain/"], server.url, env)
        ours_dst, theirs_dst = work / "ours" / "data", work / "theirs"
        t0 = time.monotonic()
        rres = R.restore(new_store(), "bench", "restore", ours_dst)
        ours = time.monotonic() - t0
        theirs = _aws(["s3", "sync", "s3://bench/plain/", str(theirs_dst)], server.url, env)
        assert _tree_bytes(ours_dst) == _tree_bytes(theirs_dst) == total
        ratio = theirs / ours
        shutil.rmtree(src)
        shutil.rmtree(ours_dst)
        shutil.rmtree(theirs_dst)

        # -- (2) incremental backup after a 1 % change ------------------------------------------
        inc = work / "inc"
        inc.mkdir()
        for i in range(100):
            _fill(inc / f"f-{i:03d}.bin", MIB)
        _fill(inc / "big.bin", 100 * MIB)
        size = _tree_bytes(inc)
        B.Backup(store, "bench", "inc", inc).run()
        _fill(inc / "f-042.bin", MIB)  # rewritten
        with open(inc / "big.bin", "r+b") as f:
            f.seek(37 * MIB + 12345)  # in place, not chunk-aligned
            f.write(os.urandom(MIB // 2))
        with open(inc / "big.bin", "ab") as f:
            f.write(os.urandom(MIB // 2))
        changed = 2 * MIB
        store2 = new_store()
        t0 = time.monotonic()
        ires = B.Backup(store2, "bench", "inc", inc).run()
        inc_s = time.monotonic() - t0
        uploaded = store2.usage.bytes_out
        pct = 100.0 * uploaded / size
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    met = ratio >= RESTORE_GOAL and pct <= INCREMENTAL_GOAL
    md = "\n".join([
        "## Data snapshots (`bench/bench_data.py`)",
        "",
        f"One moto_server on loopback; chunk size {B.D.DEFAULT_CHUNK_SIZE // MIB} MiB; agent "
        f"concurrency {B.DEFAULT_CONCURRENCY}, awscli defaults (10 threads, 8 MiB parts).",
        "",
        "| measure | agent | baseline | result | goal |",
        "|---|---|---|---|---|",
        f"| restore {small_files} files ({small_total // MIB} MiB) + 1 x {big // MIB} MiB "
        f"| {ours:.1f} s ({total / ours / MIB:.0f} MiB/s, verified, fsynced) "
        f"| `aws s3 sync` {theirs:.1f} s ({total / theirs / MIB:.0f} MiB/s) "
        f"| **{ratio:.2f}x** | >= {RESTORE_GOAL:.1f}x |",
        f"| incremental backup after a 1 % change ({changed // MIB} MiB of "
        f"{size / MIB:.0f} MiB) | {uploaded / MIB:.2f} MiB uploaded in "
        f"{ires.uploaded_chunks} chunks + manifest ({inc_s:.1f} s) | full data set "
        f"| **{pct:.2f} %** | <= {INCREMENTAL_GOAL:.0f} % |",
        "",
        f"For reference, first backup of the {total // MIB} MiB tree: agent {ours_backup:.1f} s "
        f"({bres.uploaded_chunks} chunks), `aws s3 sync` upload {theirs_upload:.1f} s. "
        f"Restored snapshot {rres.snapshot_id}. Goals {'met' if met else 'NOT met'}. "
        f"Bench wall time {time.monotonic() - started:.0f} s ({os.cpu_count()} CPUs; moto "
        "holds every object in memory, ~1 GiB here).",
    ])
    summary = (f"restore: agent {ours:.1f}s vs aws s3 sync {theirs:.1f}s -> {ratio:.2f}x "
               f"(goal >= {RESTORE_GOAL}); incremental: {uploaded / MIB:.2f} MiB of "
               f"{size / MIB:.0f} MiB = {pct:.2f} % (goal <= {INCREMENTAL_GOAL} %)")
    return {"ratio": ratio, "incremental_pct": pct, "met": met, "markdown": md,
            "summary": summary, "restore_s": ours, "awscli_s": theirs}


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["data"])


if __name__ == "__main__":
    sys.exit(main())
