"""Health checks: this instance's OWN health, for the heartbeat, ``status`` and ``/health``.

Four probe types, each with ``timeout_s`` and ``failures_before_critical``:

    process   psutil: a process whose name, argv[0] basename or one argv word equals ``name``
    tcp       a TCP connect to ``host:port``
    http      a GET of ``url`` (urllib3, no retries, no redirects): 2xx passes, 429 warns
    command   a shell command (own session, killed as a group on timeout): exit 0 passes,
              exit 1 warns, anything else fails (the Nagios / Consul convention)

A failing probe is ``warning`` until it has failed ``failures_before_critical`` times
in a row, then ``critical``; one pass resets it. The summary's status is the worst
check's. The decision (``next_result``, ``summarize``) is pure; only ``probe`` does I/O.

What a check may look at (DESIGN.md invariant 10). A check reports whether *this
instance* can do its job: its own processes, its own ports, its own ``/healthz``.
Check authors must not check dependencies (the database, another service, an
upstream API): when a shared dependency goes down, every instance would turn
critical at once, and replacing healthy instances cures nothing. The summary is
information for operators, load balancers and peers; it never triggers a
replacement by itself (only a stale heartbeat, confirmed, does that).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from agent.errors import ConfigError

STATUSES = ("passing", "warning", "critical")
_RANK = {s: i for i, s in enumerate(STATUSES)}
OUTPUT_MAX = 200
DRAIN_S = 2.0  # after a command check's timeout: how long to wait for its output to end


@dataclass(frozen=True)
class CheckSpec:
    """One configured check (a ``health:`` list item)."""

    type: str
    name: str = ""
    url: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    command: str = ""
    timeout_s: float = 5.0
    failures_before_critical: int = 3

    @property
    def id(self) -> str:
        """A stable label: the key in the summary's ``checks``."""
        if self.type == "process":
            return f"process:{self.name}"
        if self.type == "tcp":
            return f"tcp:{self.host}:{self.port}"
        if self.type == "http":
            return f"http:{self.url}"
        return f"command:{self.command[:60]}"

    @classmethod
    def from_config(cls, item: Any, index: int = 0) -> CheckSpec:
        """A spec from a config item (mapping or object with attributes); names bad keys."""

        def get(key: str, default: Any = None) -> Any:
            if isinstance(item, Mapping):
                return item.get(key, default)
            return getattr(item, key, default)

        where = f"health[{index}]"
        kind = get("type")
        if kind not in ("process", "tcp", "http", "command"):
            raise ConfigError(
                f"type must be process, tcp, http or command, got {kind!r}", path=f"{where}.type"
            )
        need = {"process": "name", "tcp": "port", "http": "url", "command": "command"}[kind]
        if not get(need):
            raise ConfigError(f"a {kind} check needs {need}", path=f"{where}.{need}")
        timeout = float(get("timeout_s", 5.0) or 5.0)
        fbc = int(get("failures_before_critical", 3) or 3)
        if timeout <= 0 or fbc < 1:
            raise ConfigError("timeout_s must be > 0 and failures_before_critical >= 1", path=where)
        return cls(
            type=kind,
            name=str(get("name") or ""),
            url=str(get("url") or ""),
            host=str(get("host") or "127.0.0.1"),
            port=int(get("port") or 0),
            command=str(get("command") or ""),
            timeout_s=timeout,
            failures_before_critical=fbc,
        )


@dataclass(frozen=True)
class Probe:
    """One probe's raw outcome: ``ok``, ``warn`` or ``fail``, with a short reason."""

    outcome: str
    output: str = ""
    duration_s: float = 0.0


@dataclass(frozen=True)
class CheckResult:
    status: str
    failures: int
    output: str = ""
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "failures": self.failures,
            "output": self.output,
            "duration_s": round(self.duration_s, 4),
        }


# -- pure decisions ----------------------------------------------------------------------------


def next_result(prev_failures: int, probe: Probe, failures_before_critical: int) -> CheckResult:
    """Fold one probe into the check's state: consecutive failures decide warning vs critical."""
    if probe.outcome == "ok":
        return CheckResult("passing", 0, probe.output, probe.duration_s)
    if probe.outcome == "warn":
        return CheckResult("warning", prev_failures, probe.output, probe.duration_s)
    failures = prev_failures + 1
    status = "critical" if failures >= failures_before_critical else "warning"
    return CheckResult(status, failures, probe.output, probe.duration_s)


def worst(statuses: Iterable[str]) -> str:
    return max(statuses, key=lambda s: _RANK.get(s, 2), default="passing")


def summarize(results: Mapping[str, CheckResult]) -> dict[str, Any]:
    """The summary for the member record, ``status`` and ``/health``.

    Shape: ``{"status": worst, "checks": {id: {...}}}`` (what ``MemberRecord.health``
    expects). No checks configured means passing: the agent itself is up.
    """
    return {
        "status": worst(r.status for r in results.values()),
        "checks": {cid: r.to_json() for cid, r in sorted(results.items())},
    }


# -- probes (I/O) ------------------------------------------------------------------------------


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= OUTPUT_MAX else text[: OUTPUT_MAX - 3] + "..."


def probe_process(name: str) -> Probe:
    import psutil

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        info = proc.info
        if info.get("pid") == me:
            continue
        argv = info.get("cmdline") or []
        if (
            info.get("name") == name
            or (argv and os.path.basename(argv[0]) == name)
            or name in argv[1:]
        ):
            return Probe("ok", f"pid {info['pid']}")
    return Probe("fail", f"no process named {name}")


def probe_tcp(host: str, port: int, timeout: float) -> Probe:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return Probe("ok", f"connected to {host}:{port}")
    except OSError as exc:
        return Probe("fail", f"{host}:{port}: {exc}")


_POOL: Any = None


def _http_pool() -> Any:
    global _POOL
    if _POOL is None:
        import urllib3

        _POOL = urllib3.PoolManager(num_pools=4, maxsize=4, retries=False)
    return _POOL


def probe_http(url: str, timeout: float) -> Probe:
    import urllib3

    try:
        resp = _http_pool().request(
            "GET", url, timeout=urllib3.Timeout(total=timeout), redirect=False, preload_content=True
        )
    except urllib3.exceptions.HTTPError as exc:
        return Probe("fail", f"GET {url}: {type(exc).__name__}: {exc}")
    if 200 <= resp.status < 300:
        return Probe("ok", f"HTTP {resp.status}")
    if resp.status == 429:
        return Probe("warn", "HTTP 429")
    return Probe("fail", f"HTTP {resp.status}: {resp.data[:80]!r}")


def probe_command(command: str, timeout: float) -> Probe:
    """Run in its own session so a timeout kills the whole group, not just the shell."""
    try:
        proc = subprocess.Popen(
            command,
            shell=True,
            stdout=subprocess.PIPE,  # noqa: S602
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        return Probe("fail", f"cannot start: {exc}")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the check's own session: all of it
        except ProcessLookupError:
            pass
        # Bounded: a process that left the check's session (``setsid daemon &``) may hold
        # the output pipe open forever; waiting for its EOF wedged the heartbeat for good.
        try:
            out, _ = proc.communicate(timeout=DRAIN_S)
        except subprocess.TimeoutExpired:
            _abandon(proc)
            out = b""
        if proc.returncode is None or proc.returncode < 0:
            return Probe("fail", f"timed out after {timeout:g}s")
        out += f" (after {timeout:g}s: output held open by a process left running)".encode()
    text = _clip(out.decode(errors="replace"))
    if proc.returncode == 0:
        return Probe("ok", text)
    if proc.returncode == 1:
        return Probe("warn", f"exit 1: {text}")
    return Probe("fail", f"exit {proc.returncode}: {text}")


def _abandon(proc: subprocess.Popen) -> None:
    """Stop reading a check whose output pipe someone else holds; reap the shell itself."""
    if proc.stdout is not None:
        proc.stdout.close()
    try:
        proc.wait(timeout=DRAIN_S)
    except subprocess.TimeoutExpired:
        pass


def probe(spec: CheckSpec) -> Probe:
    """Run one probe; never raises (a probe that crashes is a failed probe)."""
    t0 = time.monotonic()
    try:
        if spec.type == "process":
            p = probe_process(spec.name)
        elif spec.type == "tcp":
            p = probe_tcp(spec.host, spec.port, spec.timeout_s)
        elif spec.type == "http":
            p = probe_http(spec.url, spec.timeout_s)
        else:
            p = probe_command(spec.command, spec.timeout_s)
    except Exception as exc:  # a bug in a probe must read as a failure, not kill the daemon
        p = Probe("fail", f"probe error: {type(exc).__name__}: {exc}")
    return Probe(p.outcome, _clip(p.output), time.monotonic() - t0)


@dataclass
class HealthChecker:
    """Runs the configured checks (in parallel) and remembers consecutive failures."""

    specs: tuple[CheckSpec, ...] = ()
    prober: Callable[[CheckSpec], Probe] = probe
    results: dict[str, CheckResult] = field(default_factory=dict)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)
    _running: dict[str, Future[Probe]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, items: Iterable[Any] | None) -> HealthChecker:
        return cls(tuple(CheckSpec.from_config(it, i) for i, it in enumerate(items or ())))

    def run(self, budget_s: float | None = None) -> dict[str, Any]:
        """Probe everything once; the summary.

        Without a budget (the boot) it takes about the slowest check's timeout. With one
        (the daemon's heartbeat) it waits at most ``budget_s``: a check still running
        keeps its last result (``warning``, "still running", if it has none yet), is not
        started again meanwhile, and is folded in by a later run once it finishes. So a
        slow check - a hung application, a starved CPU - never delays the heartbeat by
        more than the budget, and a member is not made to look dead by its own checks.
        """
        if not self.specs:
            return self.summary()
        if budget_s is None and not self._running:
            with ThreadPoolExecutor(max_workers=min(8, len(self.specs))) as pool:
                probes = list(pool.map(self.prober, self.specs))
            for spec, p in zip(self.specs, probes, strict=True):
                self._fold(spec, p)
            return self.summary()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(8, len(self.specs)),
                                            thread_name_prefix="health-check")
        for spec in self.specs:
            if spec.id not in self._running:
                self._running[spec.id] = self._pool.submit(self.prober, spec)
        wait(list(self._running.values()), timeout=budget_s)
        for spec in self.specs:
            fut = self._running[spec.id]
            if fut.done():
                del self._running[spec.id]
                self._fold(spec, fut.result())  # probe() never raises
            elif spec.id not in self.results:
                self.results[spec.id] = CheckResult(
                    "warning", 0, f"still running after {budget_s:g}s (first run)")
        return self.summary()

    def _fold(self, spec: CheckSpec, p: Probe) -> None:
        prev = self.results.get(spec.id)
        self.results[spec.id] = next_result(
            prev.failures if prev else 0, p, spec.failures_before_critical
        )

    def close(self) -> None:
        """Stop the pool (running checks end by their own timeouts)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def summary(self) -> dict[str, Any]:
        return summarize(self.results)
