"""Data snapshots against restic, rclone and ``aws s3 sync``, on one moto server.

Data sets (issue #15): (a) 200 x 1 MiB + 1 x 200 MiB: first backup, restore; (c) the
incremental backup after a 1 % in-place change of (a) (two 1 MiB files rewritten, 1 MiB
overwritten mid-way through the big file, 1 MiB appended to it); (d) the incremental after
inserting 1 KiB near the start of the big file; (b) 10,000 x 4 KiB in 100 dirs: first
backup, restore.

Every tool runs as its own process against the same moto server, through a counting TCP
proxy (``agent.sim.proxy``): wall time, CPU seconds and peak RSS of the process (``wait4``),
requests (the moto server's request log) and bytes sent (the proxy's client-to-server
bytes, HTTP included). Each repetition starts from an empty store and fresh repositories,
the tools alternate (the order rotates each repetition), each run starts after a ``sync``
(no tool pays for the writeback of the one before it), and the tables give medians.
Every restore is checked against the source (the multiset of file sizes and sha256).
The trees restored in (b) stay until the bench ends, so no tool's restore comes right
after 10,000 files were deleted: on ext4 without a journal (this VM's root) every create
then skips the inodes freed in the last minute or so (``recently_deleted`` in
fs/ext4/ialloc.c), which cost the next tool up to 4 s of system CPU, whichever it was.

The agent runs ``agent.data.backup.Backup`` / ``agent.data.restore.restore`` with ``store_for``'s
client and the lean botocore data the daemon builds (what ``ec2-agent backup`` / ``restore``
use on an instance), from ``bench/data_agent.py``: the harness's imports stay out of it.
restic uses its defaults (a local cache in a fresh dir per repetition, as an operator's
host has), rclone and awscli theirs.
A missing tool is skipped, and the section says so.

``python -m bench.bench_data restore-a [ROUNDS]`` measures restore (a) alone (agent, restic,
rclone; one backup each, then ROUNDS rounds of restores), the close call, in ~90 s: short
enough to run on a machine made quiet for it. It prints and writes nothing.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.data_agent import BUCKET

MIB = 1024 * 1024
KIB = 1024
TOOLS = ("agent", "restic", "rclone", "aws")
LABEL = {"agent": "agent", "restic": "restic", "rclone": "rclone", "aws": "aws s3 sync"}
TINY = {"small_files": 4, "small_size": 64 * KIB, "big": 2 * MIB, "tiny_files": 50, "reps": 1,
        "restores": 1,
        "rival_phases": ("a-backup", "a-restore")}
TIME = "/usr/bin/time"  # GNU time (Debian package time)
REQ_LINE = re.compile(rb'"(GET|PUT|POST|HEAD|DELETE) ')


@dataclass(frozen=True)
class Run:
    wall: float
    cpu: float
    rss: int
    requests: int
    sent: int


# -- data ----------------------------------------------------------------------------------------

def _rand(seed: int, n: int) -> bytes:
    """Bytes no other call makes: every seed is distinct and >= 0 (``Random(-k)`` is
    ``Random(k)``), so a "change" can never dedup against data already stored."""
    assert seed >= 0
    return random.Random(seed).randbytes(n)


def make_a(root: Path, small_files: int, small_size: int, big: int) -> None:
    root.mkdir(parents=True)
    for i in range(small_files):
        (root / f"small-{i:03d}.bin").write_bytes(_rand(i, small_size))
    with open(root / "big.bin", "wb") as f:
        for i in range(0, big, 8 * MIB):
            f.write(_rand(10_000 + i, min(8 * MIB, big - i)))


def change_in_place(root: Path, small_size: int, big: int) -> int:
    """~1 % of (a), the way data dirs change: rewrites, an in-place overwrite, an append."""
    (root / "small-001.bin").write_bytes(_rand(7_000_001, small_size))
    (root / "small-002.bin").write_bytes(_rand(7_000_002, small_size))
    piece = max(small_size, big // 200)
    with open(root / "big.bin", "r+b") as f:
        f.seek(big // 2 + 12345)  # not aligned to anything
        f.write(_rand(7_000_003, piece))
    with open(root / "big.bin", "ab") as f:
        f.write(_rand(7_000_004, piece))
    return 2 * small_size + 2 * piece


def insert_near_start(root: Path) -> int:
    path = root / "big.bin"
    data = path.read_bytes()
    path.write_bytes(data[:4096 + 7] + _rand(7_000_005, KIB) + data[4096 + 7:])
    return KIB


def make_b(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{i:05d}").write_bytes(_rand(100_000 + i, 4 * KIB))


def content(root: Path) -> list[tuple[int, str]]:
    """The multiset of (size, sha256) of the files below ``root`` (tools nest paths
    differently, the bytes must be the same)."""
    from agent.host.files import sha256_file

    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            sha, size = sha256_file(Path(dirpath) / n)
            out.append((size, sha))
    return sorted(out)


# -- tools ---------------------------------------------------------------------------------------

class Bench:
    def __init__(self, work: Path, server: Any, proxy: Any, log: Path) -> None:
        from agent.sim.moto import FAKE_CREDENTIALS

        self.work = work
        self.server = server
        self.proxy = proxy
        self.log = log
        url = proxy.url
        self.env = {**os.environ, **FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": url,
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null",
                    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "NO_PROXY": "*",
                    "RESTIC_PASSWORD": "bench", "RCLONE_CONFIG_MOTO_TYPE": "s3",
                    "RCLONE_CONFIG_MOTO_PROVIDER": "Other", "RCLONE_CONFIG_MOTO_ENDPOINT": url,
                    "RCLONE_CONFIG_MOTO_ACCESS_KEY_ID": FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                    "RCLONE_CONFIG_MOTO_SECRET_ACCESS_KEY":
                        FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                    "RCLONE_CONFIG_MOTO_REGION": "us-east-1", "RCLONE_CONFIG": "/dev/null",
                    "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        for k in ("AWS_PROFILE", "AWS_CA_BUNDLE"):  # plain http on loopback; rclone chokes on it
            self.env.pop(k, None)
        # An installed agent has its bytecode (pip compiles it); this tree's is written once,
        # before the runs (``compile_agent``), never compiled again in a measured one.
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.url = url
        self.settled: int | None = None  # the request count once the last run's were logged

    @staticmethod
    def compile_agent() -> None:
        """Bytecode for the agent and this harness, as an installed agent has (the
        environment may say ``PYTHONDONTWRITEBYTECODE``, which compileall does not heed)."""
        import compileall

        repo = Path(__file__).resolve().parents[1]
        for pkg in ("agent", "bench"):
            compileall.compile_dir(repo / pkg, quiet=1)

    def available(self) -> dict[str, str]:
        """tool -> "" if usable, else why not."""
        out = {"agent": ""}
        for exe in ("restic", "rclone"):
            out[exe] = "" if shutil.which(exe) else f"`{exe}` not installed (apt-get install it)"
        out["aws"] = "" if Path(sys.executable).with_name("aws").exists() else "awscli missing"
        return out

    def _requests(self) -> int:
        return len(REQ_LINE.findall(self.log.read_bytes()))

    def _settled_requests(self) -> int:
        last, stable = -1, 0
        while stable < 2:  # the server logs a request after answering it
            n = self._requests()
            stable = stable + 1 if n == last else 0
            last = n
            time.sleep(0.02)
        self.settled = last
        return last

    def run(self, argv: list[str], cwd: Path | None = None) -> Run:
        """Run one tool; GNU time measures it (``wait4`` in our own process would count
        the forked copy of this Python process in the child's peak RSS)."""
        req0 = self.settled if self.settled is not None else self._settled_requests()
        # No tool pays for the writeback of what came before it (the data set just made, the
        # previous tool's backup into moto's spool files, the previous restore): a restore
        # on a replacement instance starts on a settled machine too.
        os.sync()
        up0 = self.proxy.counters.bytes_up
        err = self.work / "stderr.txt"
        tfile = self.work / "time.txt"
        with open(err, "wb") as ef:
            proc = subprocess.run([TIME, "-f", "%e %U %S %M", "-o", str(tfile), *argv],
                                  env=self.env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=ef,
                                  stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}): "
                               f"{err.read_text(errors='replace')[-2000:]}")
        wall, user, system, rss_kb = tfile.read_text().split()[-4:]
        return Run(float(wall), float(user) + float(system), int(rss_kb) * 1024,
                   self._settled_requests() - req0, self.proxy.counters.bytes_up - up0)

    # one repository per (tool, repetition, data set)
    def _restic(self, repo: str, *args: str) -> list[str]:
        return ["restic", "-q", "-r", f"s3:{self.url}/{BUCKET}/{repo}",
                "--cache-dir", str(self.work / f"cache-{repo}"), *args]

    def _aws_sync(self, src: str, dst: str) -> list[str]:
        return [str(Path(sys.executable).with_name("aws")), "--endpoint-url", self.url,
                "--only-show-errors", "s3", "sync", src, dst]

    def backup(self, tool: str, src: Path, repo: str) -> Run:
        if tool == "agent":
            return self.run([sys.executable, "-m", "bench.data_agent", "backup", str(src), repo])
        if tool == "restic":
            return self.run(self._restic(repo, "backup", "."), cwd=src)
        if tool == "rclone":
            return self.run(["rclone", "sync", str(src), f"moto:{BUCKET}/{repo}"])
        return self.run(self._aws_sync(str(src), f"s3://{BUCKET}/{repo}/"))

    def restore(self, tool: str, repo: str, dst: Path) -> Run:
        if tool == "agent":
            return self.run([sys.executable, "-m", "bench.data_agent", "restore", str(dst), repo])
        if tool == "restic":
            return self.run(self._restic(repo, "restore", "latest", "--target", str(dst)))
        if tool == "rclone":
            return self.run(["rclone", "sync", f"moto:{BUCKET}/{repo}", str(dst)])
        return self.run(self._aws_sync(f"s3://{BUCKET}/{repo}/", str(dst)))

    def prepare(self, tool: str, repo: str) -> None:
        if tool == "restic":
            subprocess.run(self._restic(repo, "init"), env=self.env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.settled = None  # its requests are no tool's measurement


# -- the run -------------------------------------------------------------------------------------

@contextlib.contextmanager
def _harness() -> Iterator[tuple[Path, Any, Bench]]:
    """A moto server behind the counting proxy, the agent compiled and its lean botocore data
    built, and this process's ``AWS_*`` pointed at it; all undone on the way out."""
    from agent.aws import botodata as awsdata
    from agent.sim.moto import MotoServer
    from agent.sim.proxy import TcpProxy

    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    log = work / "moto.log"
    server = MotoServer(log_path=str(log))
    saved = dict(os.environ)
    try:
        server.start()
        with TcpProxy.to_url(server.url, name="bench-count") as proxy:
            b = Bench(work, server, proxy, log)
            b.compile_agent()
            b.env["BENCH_AWS_DATA"] = str(awsdata.build(work / "aws-data"))
            os.environ.update({k: v for k, v in b.env.items() if k.startswith("AWS_")})
            yield work, server, b
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(small_files: int = 200, small_size: int = MIB, big: int = 200 * MIB,
        tiny_files: int = 10_000, reps: int = 3, restores: int = 3,
        only: tuple[str, ...] = TOOLS, rival_phases: tuple[str, ...] | None = None) -> dict:
    """The bench; ``rival_phases`` limits the other tools to those phases (all by default:
    the tiny run gives them (a) only: every command of every tool still runs).

    Each tool restores (a) ``restores`` times per repetition (one sample each): its
    restores take 1-4 s, and a median of 3 single runs swung with the machine's noise (the
    same restore took 1.0-1.3 s, and now and then 1.7 s, with moto spending twice its usual
    CPU). (b)'s rival restores take 35-40 s each, so (b) is restored once per repetition."""
    from agent.aws.store import Store

    started = time.monotonic()
    load0 = os.getloadavg()[0]
    results: dict[tuple[str, str], list[Run]] = {}
    notes: list[str] = []
    with _harness() as (work, server, b):
        avail = b.available()
        tools = [t for t in TOOLS if not avail[t] and t in only]
        notes += [f"{LABEL[t]} skipped: {why}" for t, why in avail.items() if why]

        def new_bucket() -> None:
            server.reset()
            Store(BUCKET, "", region="us-east-1").ensure_bucket()
            b.settled = None

        def runs(phase: str, order: list[str]) -> list[str]:
            return [t for t in order if t == "agent" or rival_phases is None
                    or phase in rival_phases]

        def first_and_restore(name: str, src: Path, rep: int, order: list[str]) -> None:
            """First backup of ``src`` by each tool, then its restore, checked."""
            want = content(src)
            for tool in runs(f"{name}-backup", order):
                repo = f"{tool}-{name}-{rep}"
                b.prepare(tool, repo)
                results.setdefault((f"{name}-backup", tool), []).append(
                    b.backup(tool, src, repo))
                for k in range(restores if name == "a" else 1):
                    dst = work / f"restore-{repo}-{k}" / "data"
                    results.setdefault((f"{name}-restore", tool), []).append(
                        b.restore(tool, repo, dst))
                    assert content(dst) == want, f"{tool}: restore differs"
                    if name == "a":  # (b)'s 10,000 files stay (module docstring)
                        shutil.rmtree(dst.parent)

        def again(phase: str, src: Path, rep: int, order: list[str]) -> None:
            """Another backup of (a), changed, into each tool's repository of (a)."""
            for tool in runs(phase, order):
                results.setdefault((phase, tool), []).append(
                    b.backup(tool, src, f"{tool}-a-{rep}"))

        for rep in range(reps):
            order = tools[rep % len(tools):] + tools[:rep % len(tools)]
            new_bucket()
            src = work / "a"
            make_a(src, small_files, small_size, big)
            first_and_restore("a", src, rep, order)
            changed = change_in_place(src, small_size, big)
            again("c-incremental", src, rep, order)
            insert_near_start(src)
            again("d-insert", src, rep, order)
            shutil.rmtree(src)
            new_bucket()  # moto keeps every object in memory
            src = work / "b"
            make_b(src, tiny_files)
            first_and_restore("b", src, rep, order)
            shutil.rmtree(src)
            for cache in work.glob("cache-*"):
                shutil.rmtree(cache)
    notes.append(f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at "
                 "the end: on a busy machine wall times are noisy (CPU seconds less so).")
    return _report(results, tools, notes, small_files, small_size, big, tiny_files, reps,
                   restores, changed, time.monotonic() - started)


def restore_a(rounds: int = 9, tools: tuple[str, ...] = ("agent", "restic", "rclone"),
              small_files: int = 200, small_size: int = MIB, big: int = 200 * MIB) -> str:
    """Restore (a) alone, the close call: one backup per tool, then ``rounds`` rounds of
    restores (order rotating, ``sync`` before each, each checked against the source).
    ``python -m bench.bench_data restore-a [ROUNDS]``; prints, writes nothing."""
    from agent.aws.store import Store

    with _harness() as (work, _, b):
        avail = b.available()
        tools = tuple(t for t in tools if not avail[t])
        Store(BUCKET, "", region="us-east-1").ensure_bucket()
        src = work / "a"
        make_a(src, small_files, small_size, big)
        want = content(src)
        for t in tools:
            b.prepare(t, f"{t}-a")
            b.backup(t, src, f"{t}-a")
        res: dict[str, list[Run]] = {t: [] for t in tools}
        for r in range(rounds):
            for t in tools[r % len(tools):] + tools[:r % len(tools)]:
                dst = work / f"restore-{t}" / "data"
                res[t].append(b.restore(t, f"{t}-a", dst))
                assert content(dst) == want, f"{t}: restore differs"
                shutil.rmtree(dst.parent)
    lines = [f"{LABEL[t]}: {_med(rs, 'wall'):.2f} s (CPU {_med(rs, 'cpu'):.2f} s, "
             f"{_med(rs, 'rss') / 1e6:.0f} MB, {rs[0].requests} requests; runs "
             f"{min(r.wall for r in rs):.2f}-{max(r.wall for r in rs):.2f} s)"
             for t, rs in res.items()]
    rivals = [_med(res[t], "wall") for t in ("restic", "rclone") if t in res]
    if rivals and "agent" in res:
        ratio = min(rivals) / _med(res["agent"], "wall")
        lines.append(f"ratio (faster rival / agent): {ratio:.2f}x")
    return "\n".join(lines)


def _med(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


PHASES = [
    ("a-backup", "(a) {sf} x {ss} + 1 x {big}: first backup"),
    ("a-restore", "(a) same: restore"),
    ("c-incremental", "(c) incremental after a 1 % in-place change ({changed})"),
    ("d-insert", "(d) incremental after inserting 1 KiB near the start of the big file"),
    ("b-backup", "(b) {tf} x 4 KiB: first backup"),
    ("b-restore", "(b) same: restore"),
]


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB and n % MIB == 0 else f"{n // KIB} KiB"


def _report(results: dict[tuple[str, str], list[Run]], tools: list[str], notes: list[str],
            sf: int, ss: int, big: int, tf: int, reps: int, restores: int, changed: int,
            took: float) -> dict:
    names = {k: v.format(sf=sf, ss=_size(ss), big=_size(big), tf=f"{tf:,}",
                         changed=_size(changed)) for k, v in PHASES}
    lines = [
        "## Data snapshots against restic, rclone and `aws s3 sync` (`bench/bench_data.py`)",
        "",
        f"One moto_server on loopback behind a counting proxy; every tool its own process; "
        f"medians of {reps} repetitions ({reps * restores} restores of (a): {restores} per "
        f"repetition), tools alternating, `sync` before every run. Wall time in seconds; "
        f"**ratio** = the faster of restic and rclone / agent (>= 1.0: the agent is at "
        f"least as fast), and for (c)/(d) agent bytes sent / restic's (<= 1.0).",
        "",
        "| data set (medians) | " + " | ".join(LABEL[t] for t in tools) + " | ratio |",
        "|---|" + "---|" * (len(tools) + 1),
    ]
    ratios: dict[str, float] = {}
    for key, _ in PHASES:
        cells = []
        for t in tools:
            runs = results.get((key, t), [])
            if not runs:
                cells.append("-")
                continue
            cell = f"{_med(runs, 'wall'):.1f} s"
            if key in ("c-incremental", "d-insert"):
                cell += f", {_med(runs, 'sent') / 1e6:.1f} MB"
            cells.append(cell)
        ratio = ""
        rivals = [t for t in ("restic", "rclone") if t in tools and results.get((key, t))]
        if rivals and results.get((key, "agent")):
            agent = results[(key, "agent")]
            if key in ("c-incremental", "d-insert") and "restic" in rivals:
                r = _med(agent, "sent") / max(_med(results[(key, "restic")], "sent"), 1)
                ratios[key] = r
                ratio = f"**{r:.2f}x** bytes; "
            best = min(_med(results[(key, t)], "wall") for t in rivals)
            r = best / _med(agent, "wall")
            if key not in ratios:
                ratios[key] = r
            ratio += f"**{r:.2f}x**"
        lines.append(f"| {names[key]} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "Per tool: CPU seconds, peak RSS, requests, bytes sent (medians).", "",
              "| data set | tool | wall s | CPU s | peak RSS MB | requests | MB sent |",
              "|---|---|---|---|---|---|---|"]
    for key, _ in PHASES:
        for t in tools:
            runs = results.get((key, t), [])
            if runs:
                lines.append(f"| {names[key]} | {LABEL[t]} | {_med(runs, 'wall'):.1f} | "
                             f"{_med(runs, 'cpu'):.1f} | {_med(runs, 'rss') / 1e6:.0f} | "
                             f"{_med(runs, 'requests'):,.0f} | {_med(runs, 'sent') / 1e6:.1f} |")
    both = [k for k, _ in PHASES if results.get((k, "agent")) and results.get((k, "restic"))]
    if both:
        rss = max(_med(results[(k, "agent")], "rss") / _med(results[(k, "restic")], "rss")
                  for k in both)
        lines += ["", f"Peak RSS, agent / restic, worst data set: **{rss:.2f}x** (goal <= 1.0)."]
    lines += ["", f"{os.cpu_count()} CPUs; bench wall time {took:.0f} s."]
    lines += [f"{n}." if not n.endswith(".") else n for n in notes]
    summary = "data: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
    return {"markdown": "\n".join(lines), "summary": summary, "ratios": ratios,
            "results": results}


def main() -> int:
    from bench.__main__ import main as bench_main

    return bench_main(["data"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["restore-a"]:
        print(restore_a(*(int(a) for a in sys.argv[2:3])))
        sys.exit(0)
    sys.exit(main())
