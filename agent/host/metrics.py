"""Prometheus metrics for the agent, on a registry of its own.

Why a private ``CollectorRegistry``: the global one also carries process and
platform collectors and is shared by anything else imported in-process (tests
build many agents in one interpreter); a registry per ``Metrics`` keeps series
separate and makes ``render()`` deterministic.

Why lazy imports: ``ec2-agent status`` must stay fast and never pays for
prometheus_client; nothing here imports it at module import time.

Two ways out: ``render()`` for the agent's HTTP endpoint, and
``write_boot_textfile(path, durations)`` for node_exporter's textfile collector (atomic, so the
collector never reads a half-written file).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from prometheus_client import CollectorRegistry

# Boot phases take from milliseconds (identity) to minutes (restore of a big data set).
NOTICE_KINDS = ("spot", "lifecycle", "rebalance", "maintenance")  # agent.departure notices()

BOOT_PHASE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    """All of the agent's series, created once, updated by the boot phases and the daemon."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.boot_phase_duration = Histogram(
            "ec2_agent_boot_phase_duration_seconds",
            "Duration of each boot phase.",
            ["phase"],
            buckets=BOOT_PHASE_BUCKETS,
            registry=r,
        )
        self.heartbeat_age = Gauge(
            "ec2_agent_heartbeat_age_seconds",
            "Seconds since this agent's own heartbeat was last written successfully.",
            registry=r,
        )
        self.peers = Gauge(
            "ec2_agent_peers",
            "Group members as this agent sees them, by liveness state.",
            ["state"],
            registry=r,
        )
        self.heal_frozen = Gauge(
            "ec2_agent_heal_frozen",
            "1 while replacement is frozen for this group (see ec2_agent_freezes_total).",
            registry=r,
        )
        self.replacements = Counter(
            "ec2_agent_replacements",
            "Replacement decisions taken by this agent, by action and result.",
            ["action", "result"],
            registry=r,
        )
        self.freezes = Counter(
            "ec2_agent_freezes",
            "Times replacement froze, by reason.",
            ["reason"],
            registry=r,
        )
        self.imds_notices = Gauge(
            "ec2_agent_imds_notice",
            "1 while IMDS shows a notice of this kind (spot, lifecycle, rebalance, maintenance).",
            ["kind"],
            registry=r,
        )
        for kind in NOTICE_KINDS:  # the series exist at 0 from the start, for alerts
            self.imds_notices.labels(kind=kind).set(0)

    # Small verbs so callers don't need to know label names.

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.boot_phase_duration.labels(phase=phase).observe(max(0.0, seconds))

    def set_heartbeat_age(self, seconds: float) -> None:
        self.heartbeat_age.set(max(0.0, seconds))

    def set_peers(self, counts: dict[str, int]) -> None:
        """Set every state's count; states seen before but absent now drop to 0."""
        known = {labels[0] for labels in _label_values(self.peers)}
        for state in known | set(counts):
            self.peers.labels(state=state).set(counts.get(state, 0))

    def set_frozen(self, frozen: bool) -> None:
        self.heal_frozen.set(1 if frozen else 0)

    def replacement(self, action: str, result: str) -> None:
        self.replacements.labels(action=action, result=result).inc()

    def freeze(self, reason: str) -> None:
        self.freezes.labels(reason=reason).inc()

    def set_notices(self, present: Iterable[str]) -> None:
        """1 for each notice kind present now, 0 for the others."""
        now = set(present)
        for kind in set(NOTICE_KINDS) | now:
            self.imds_notices.labels(kind=kind).set(1 if kind in now else 0)

    def render(self) -> bytes:
        """The exposition text format, for the HTTP endpoint."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def boot_text(self) -> bytes:
        """The boot phase histogram alone, in the exposition format (the boot's textfile).

        Only the boot histogram: in the boot the daemon's gauges would read 0, a lie.
        """
        from prometheus_client import CollectorRegistry, generate_latest

        reg = CollectorRegistry(auto_describe=True)
        reg.register(self.boot_phase_duration)
        return generate_latest(reg)


def _label_values(metric: Any) -> list[tuple[str, ...]]:
    """Label tuples a labelled metric has children for (prometheus_client keeps them private)."""
    lock = getattr(metric, "_lock", None)
    metrics = getattr(metric, "_metrics", {})
    if lock is None:
        return list(metrics)
    with lock:
        return list(metrics)


_default: Metrics | None = None
_default_lock = threading.Lock()


def get() -> Metrics:
    """The process-wide Metrics, created on first use (so importing this module is free).

    Under a lock: the daemon's loop and the endpoint's first scrape may both get here
    first, and two registries would split the series between them (seen: a scrape
    served a registry without the boot phases the loop had recorded in the other).
    """
    global _default
    with _default_lock:
        if _default is None:
            _default = Metrics()
        return _default


def render() -> bytes:
    """``get().render()``: the exposition text of the process-wide metrics."""
    return get().render()


def write_boot_textfile(path: str | os.PathLike[str],
                        durations: Iterable[tuple[str, float]]) -> None:
    """This boot's phase durations for node_exporter's textfile collector, atomically.

    The collector reads ``*.prom`` files at any moment, so the text goes to a
    hidden ``.<name>.*.tmp`` sibling (not matched by the collector), fsynced, then
    renamed over the target: ``agent.host.files.atomic_write`` does exactly that. A fresh
    ``Metrics``: this boot's observations only, even when run twice in one process.
    """
    from agent.host.files import atomic_write

    m = Metrics()
    for name, seconds in durations:
        m.observe_phase(name, seconds)
    atomic_write(path, m.boot_text(), mode=0o644)
