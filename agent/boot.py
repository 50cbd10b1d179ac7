"""``ec2-agent boot``: ordered phases, each timed and recorded, under one deadline.

identity -> userdata -> config -> pull -> restore -> render -> register

Each phase is a function of a shared ``BootContext``. A phase that raises an
``AgentError`` marks itself ``error``, the boot ``error``, and every later phase
``skipped``: nothing after a failure pretends to have run. A phase may instead
call ``ctx.degrade(reason)`` (for example: S3 unreachable, last-known-good used)
and the boot goes on, ending ``degraded``. State is written at every transition
so ``status`` can show a boot in progress, and a crashed boot is visible.

The deadline bounds waiting (every IMDS and S3 call is capped by it) and when a phase
may start: no phase starts after it. A phase that started in time and finishes is not
failed for finishing late; its detail says how late (a slow instance is slow, not broken).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import state as statefile
from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.errors import AgentError, StateError
from agent.paths import Paths

DEFAULT_DEADLINE_S = 120.0
CARRIED = (
    "first_boot_done",
    "first_boot_at",
    "boot_count",
    "membership",
    "heartbeat",
    "peers",
    "heal",
    "health",
    "group",
)

# name -> "module:function"; each takes the BootContext and returns a detail string or None.
PHASES: list[tuple[str, str]] = [
    ("identity", "agent.boot:phase_identity"),
    ("userdata", "agent.boot:phase_userdata"),
    ("config", "agent.boot:phase_config"),
    ("pull", "agent.pull:phase_pull"),
    ("restore", "agent.restore:phase_restore"),
    ("render", "agent.apply:phase_render"),
    ("register", "agent.heartbeat:phase_register"),
]


@dataclass
class BootContext:
    paths: Paths
    clock: Clock
    deadline: Deadline
    started_wall: float
    previous: dict[str, Any]
    boot_id: str
    imds: Any = None
    identity: Any = None
    raw_user_data: bytes | None = None
    user_config: dict[str, Any] | None = None
    baked_config: dict[str, Any] | None = None
    config: Any = None
    boot_kind: str = "first"
    bundle_dir: Path | None = None
    bundle_config: dict[str, Any] | None = None
    store: Any = None
    degraded: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    phase_degraded: list[str] = field(default_factory=list)
    # The daemon validates new config in a child process (``agent.configcache``).
    isolate_validation: bool = False
    baked_sha256: str | None = None  # of the bytes baked_config was parsed from
    _progress: Callable[[dict[str, Any]], None] | None = None

    def degrade(self, reason: str) -> None:
        self.degraded.append(reason)
        self.phase_degraded.append(reason)

    def progress(self, info: dict[str, Any]) -> None:
        """Bytes and rate of the running phase, for ``status``."""
        if self._progress:
            self._progress(info)

    def get_store(self) -> Any:
        if self.store is None:
            from agent.store import Store

            cfg = self.config
            region = cfg.store.region or (self.identity.region if self.identity else None)
            self.store = Store(cfg.store.bucket, cfg.store.prefix, region=region)
        return self.store


def kernel_boot_id() -> str:
    """This kernel boot's id; ``EC2_AGENT_BOOT_ID`` overrides it for simulated instances."""
    override = os.environ.get("EC2_AGENT_BOOT_ID")
    if override:
        return override
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


# -- phases ---------------------------------------------------------------------------------


def phase_identity(ctx: BootContext) -> str:
    from agent.imds import ImdsClient

    ctx.imds = ImdsClient(deadline=ctx.deadline, clock=ctx.clock)
    ident = ctx.imds.identity()
    ctx.identity = ident
    for note in ident.disagreements:  # the document is used; a human should look
        ctx.degrade(f"identity: {note}")
    prev = ctx.previous
    same_instance = prev.get("instance_id") == ident.instance_id
    if same_instance and prev.get("first_boot_done"):
        if prev.get("boot_id") == ctx.boot_id and prev.get("boot_kind"):
            ctx.boot_kind = prev["boot_kind"]  # the same boot, run again: idempotent
        else:
            ctx.boot_kind = "reboot"
    else:
        ctx.boot_kind = "first"
    return f"{ident.instance_id} {ident.instance_type} {ident.availability_zone} ({ctx.boot_kind})"


class ImdsMetadata:
    """What user-data may need from IMDS (``agent.userdata.Metadata``), asked lazily:
    the launch index only for user-data with ``Launch-Index`` parts, the instance
    data only for ``## template: jinja`` parts."""

    def __init__(self, imds: Any, identity: Any = None) -> None:
        self.imds, self.identity = imds, identity

    def launch_index(self) -> int | None:
        raw = self.imds.get("ami-launch-index", optional=True)
        try:
            return int(raw.strip()) if raw is not None else None
        except ValueError:
            return None

    def instance_data(self) -> dict[str, Any]:
        from agent.udtemplate import instance_data_from_identity

        if self.identity is None:
            self.identity = self.imds.identity()
        hostname = self.imds.get("local-hostname", optional=True)
        return instance_data_from_identity(self.identity, hostname.strip() if hostname else None)


def phase_userdata(ctx: BootContext) -> str:
    from agent.userdata import read_user_data

    ctx.raw_user_data = ctx.imds.user_data()
    got = read_user_data(ctx.raw_user_data, ImdsMetadata(ctx.imds, ctx.identity))
    ctx.user_config = got.config
    size = len(ctx.raw_user_data or b"")
    ctx.extras.setdefault("state_updates", {})["user_data_notes"] = list(got.notes)
    notes = f"; {len(got.notes)} note(s): " + "; ".join(got.notes) if got.notes else ""
    if ctx.user_config is None:
        return f"{size} bytes, no ec2_agent config{notes}"
    return f"{size} bytes, ec2_agent config with {len(ctx.user_config)} keys{notes}"


def phase_config(ctx: BootContext) -> str:
    from agent.configcache import validated_config

    ctx.config = validated_config(ctx.paths.state_dir, ctx.baked_config, ctx.user_config,
                                  ctx.bundle_config, isolate=ctx.isolate_validation)
    _retarget_deadline(ctx)
    return (
        f"group {ctx.config.group}, store s3://{ctx.config.store.bucket}/{ctx.config.store.prefix}"
    )


def _retarget_deadline(ctx: BootContext) -> None:
    deadline_s = getattr(getattr(ctx.config, "boot", None), "deadline_s", None)
    if deadline_s:
        ctx.deadline.at = ctx.deadline.at - _deadline_s(ctx.baked_config) + float(deadline_s)


def _deadline_s(baked: dict[str, Any] | None) -> float:
    try:
        return float((baked or {}).get("boot", {}).get("deadline_s", DEFAULT_DEADLINE_S))
    except (TypeError, ValueError, AttributeError):
        return DEFAULT_DEADLINE_S


def _overrun(ctx: BootContext) -> str:
    """A note for a phase that finished after the boot deadline (empty if it did not)."""
    over = ctx.clock.monotonic() - ctx.deadline.at
    if over <= 0:
        return ""
    return f"finished {over:.1f}s after the {ctx.deadline.what} deadline (slow, not failed)"


# -- driver -----------------------------------------------------------------------------------


def _resolve(ref: str) -> Callable[[BootContext], str | None]:
    mod, fn = ref.split(":")
    return getattr(importlib.import_module(mod), fn)


def _load_baked(paths: Paths) -> tuple[dict[str, Any] | None, str | None]:
    """The baked config and the sha256 of the bytes it was parsed from (for ``run``)."""
    import hashlib

    try:
        raw = paths.config_file.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        from agent.errors import ConfigError

        raise ConfigError(f"cannot read: {exc.strerror or exc}",
                          layer=str(paths.config_file)) from exc
    from agent.config import load_yaml_bytes

    return load_yaml_bytes(raw, paths.config_file), hashlib.sha256(raw).hexdigest()


METRICS_TEXTFILE = "metrics.prom"


def _write_boot_metrics(paths: Paths, st: dict[str, Any]) -> None:
    """Phase durations for node_exporter's textfile collector (``<state_dir>/metrics.prom``).

    A file, not only the daemon's ``/metrics``, because the boot that most needs
    looking at is the one that failed, after which no daemon runs. Only the boot
    histogram goes in: the daemon's gauges would read 0 here, which is a lie.
    A metrics failure is recorded, never a boot failure.
    """
    path = paths.state_dir / METRICS_TEXTFILE
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from agent.files import atomic_write
        from agent.metrics import Metrics

        m = Metrics()  # this boot's observations only, even when run twice in one process
        for p in st["phases"]:
            if isinstance(p.get("duration_s"), (int, float)):
                m.observe_phase(p["name"], p["duration_s"])
        reg = CollectorRegistry(auto_describe=True)
        reg.register(m.boot_phase_duration)
        atomic_write(path, generate_latest(reg), mode=0o644)
        st["metrics_textfile"] = str(path)
    except Exception as exc:  # metrics are never a reason for a boot to fail
        st["metrics_textfile_error"] = f"{path}: {type(exc).__name__}: {exc}"


def run_boot(
    paths: Paths | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    phases: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Run every phase; returns the final state. Never raises for a phase failure."""
    paths = paths or Paths.from_env()
    phases = PHASES if phases is None else phases
    try:
        previous = statefile.read(paths.state_file) or {}
    except StateError:
        # Unreadable old state must not stop a boot; keep it aside for a human, start clean.
        previous = {}
        with contextlib.suppress(OSError):
            os.replace(paths.state_file, paths.state_file.with_suffix(".json.corrupt"))
    started = clock.time()
    st: dict[str, Any] = {
        "status": "running",
        "pid": os.getpid(),
        "boot_id": kernel_boot_id(),
        "started": started,
        "updated": started,
        "phases": [{"name": n, "status": "pending"} for n, _ in phases],
        "errors": [],
        "degraded": [],
    }

    def save() -> None:
        st["updated"] = clock.time()
        statefile.replace(paths.state_file, st)

    baked: dict[str, Any] | None = None
    baked_sha: str | None = None
    baked_error: AgentError | None = None
    try:
        baked, baked_sha = _load_baked(paths)
    except AgentError as exc:
        baked_error = exc
    ctx = BootContext(
        paths=paths,
        clock=clock,
        deadline=Deadline.after(_deadline_s(baked), "boot", clock),
        started_wall=started,
        previous=previous,
        boot_id=st["boot_id"],
        baked_config=baked,
        baked_sha256=baked_sha,
    )
    save()
    if any(ref.startswith(("agent.pull:", "agent.heartbeat:")) for _, ref in phases):
        from agent import aws, awsdata

        # Lean model copies when a daemon has built them (a reboot): less to parse.
        aws.use_data(awsdata.find(paths.aws_data_dir))
        # CPU work (imports, S3 model loading) overlaps the identity phase's IMDS round trips.
        aws.prewarm(modules=("agent.config", "agent.apply", "agent.restore"))
    failed = False
    for i, (name, ref) in enumerate(phases):
        rec = st["phases"][i]
        if failed:
            rec["status"] = "skipped"
            continue
        t0 = clock.monotonic()
        rec.update(status="running", started=clock.time())

        def on_progress(info: dict[str, Any], rec: dict[str, Any] = rec) -> None:
            rec["progress"] = info
            save()

        ctx._progress = on_progress
        ctx.phase_degraded = []
        save()
        try:
            if name == "config" and baked_error is not None:
                raise baked_error
            ctx.deadline.check(f"starting phase {name}")
            detail = _resolve(ref)(ctx)
            # A phase that finished is not failed after the fact for finishing late: its
            # waits were capped by the deadline, only its work was slow (a busy or throttled
            # instance). Failing it would undo work already done - a ``register`` that wrote
            # the record ``ready`` then said ``error``, and ``run`` refused to start, so the
            # member went stale and was replaced. The next phase still does not start late.
            late = _overrun(ctx)
            rec["status"] = "degraded" if ctx.phase_degraded else "ok"
            rec["detail"] = "; ".join(filter(None, [detail, *ctx.phase_degraded, late]))
        except AgentError as exc:
            failed = True
            rec["status"] = "error"
            rec["detail"] = str(exc)
            st["errors"].append(f"{name}: {exc}")
        except Exception as exc:  # a bug must still leave an honest state behind
            failed = True
            rec["status"] = "error"
            rec["detail"] = f"internal error: {type(exc).__name__}: {exc}"
            st["errors"].append(f"{name}: internal error: {type(exc).__name__}: {exc}")
        rec["duration_s"] = round(clock.monotonic() - t0, 6)
        if (
            ctx.identity is not None
            and "instance_id" not in st
            and previous.get("instance_id") == ctx.identity.instance_id
        ):
            # Same instance: what the daemon recorded stays; a new instance-id starts clean
            # (an image baked from a used instance must not inherit its membership).
            for keep in CARRIED:
                if keep in previous:
                    st[keep] = previous[keep]
        if ctx.identity is not None:
            st["instance_id"] = ctx.identity.instance_id
            st["identity"] = ctx.identity.as_context()
            st["boot_kind"] = ctx.boot_kind
        if ctx.config is not None:
            st["group"] = ctx.config.group
        st["degraded"] = list(ctx.degraded)
        st.update(ctx.extras.get("state_updates", {}))
        save()
    if failed:
        st["status"] = "error"
    else:
        st["status"] = "degraded" if ctx.degraded else "done"
        st.setdefault("first_boot_at", started)
        st["first_boot_done"] = True
    same_boot = previous.get("boot_id") == st["boot_id"] and previous.get("instance_id") == st.get(
        "instance_id"
    )
    if same_boot:
        st["boot_count"] = int(previous.get("boot_count", 1))
    elif ctx.boot_kind == "reboot":
        st["boot_count"] = int(previous.get("boot_count", 0)) + 1
    else:
        st["boot_count"] = 1
    if ctx.identity is not None and ctx.config is not None and not failed:
        from agent.daemon import save_instance

        try:
            save_instance(paths, ctx)
        except OSError as exc:
            st["status"] = "error"
            st["errors"].append(f"cannot save instance record for `run`: {exc}")
    from agent.lifecycle import complete_lifecycle

    complete_lifecycle(ctx, st)  # the ASG launch hook: CONTINUE / ABANDON; never raises
    _write_boot_metrics(paths, st)
    st["finished"] = clock.time()
    st["duration_s"] = round(st["finished"] - started, 6)
    st.pop("pid", None)
    save()
    ctx.extras["state"] = st
    return st
