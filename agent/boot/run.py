"""``ec2-agent boot``: ordered phases, each timed and recorded, under one deadline.

identity -> userdata -> config -> pull -> restore -> render -> register

Each phase is a plain function ``BootContext -> Done`` (``agent.bootctx``): it
gets the immutable context so far and returns it with what it adds. A phase that
raises an ``AgentError`` marks itself ``error``, the boot ``error``, and every
later phase ``skipped``: nothing after a failure pretends to have run. A phase may
instead return ``ctx.degrade(reason)`` (for example: S3 unreachable,
last-known-good used) and the boot goes on, ending ``degraded``. State is written
at every transition so ``status`` can show a boot in progress, and a crashed boot
is visible.

The deadline bounds waiting (every IMDS and S3 call is capped by it) and when a phase
may start: no phase starts after it. A phase that started in time and finishes is not
failed for finishing late; its detail says how late (a slow instance is slow, not broken).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.bootctx import BootContext, Done, Phase
from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.errors import AgentError, StateError
from agent.host import state as statefile
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


def phase_identity(ctx: BootContext) -> Done:
    from agent.aws.imds import ImdsClient

    imds = ImdsClient(deadline=ctx.deadline, clock=ctx.clock)
    ident = imds.identity()
    for note in ident.disagreements:  # the document is used; a human should look
        ctx = ctx.degrade(f"identity: {note}")
    prev = ctx.previous
    same_instance = prev.get("instance_id") == ident.instance_id
    if same_instance and prev.get("first_boot_done"):
        if prev.get("boot_id") == ctx.boot_id and prev.get("boot_kind"):
            kind = str(prev["boot_kind"])  # the same boot, run again: idempotent
        else:
            kind = "reboot"
    else:
        kind = "first"
    return Done(ctx.add(imds=imds, identity=ident, boot_kind=kind),
                f"{ident.instance_id} {ident.instance_type} {ident.availability_zone} ({kind})")


def phase_userdata(ctx: BootContext) -> Done:
    from agent.aws.imds import ImdsMetadata
    from agent.config.userdata import read_user_data

    assert ctx.imds is not None, "the identity phase comes first"
    raw = ctx.imds.user_data()
    got = read_user_data(raw, ImdsMetadata(ctx.imds, ctx.identity))
    size = len(raw or b"")
    notes = f"; {len(got.notes)} note(s): " + "; ".join(got.notes) if got.notes else ""
    detail = (f"{size} bytes, no ec2_agent config{notes}" if got.config is None
              else f"{size} bytes, ec2_agent config with {len(got.config)} keys{notes}")
    updates = {**ctx.state_updates, "user_data_notes": list(got.notes)}
    return Done(ctx.add(raw_user_data=raw, user_config=got.config, state_updates=updates),
                detail)


def phase_config(ctx: BootContext) -> Done:
    from agent.config.memo import validated_config

    cfg = validated_config(ctx.paths.state_dir, ctx.baked_config, ctx.user_config,
                           ctx.bundle_config, isolate=ctx.isolate_validation)
    _retarget_deadline(ctx.deadline, cfg.boot.deadline_s, ctx.baked_config)
    return Done(ctx.add(config=cfg),
                f"group {cfg.group}, store s3://{cfg.store.bucket}/{cfg.store.prefix}")


# The later phases live beside what they drive; each is imported when it runs, so the
# imports overlap the identity phase's IMDS round trips (``aws.prewarm``).
def phase_pull(ctx: BootContext) -> Done:
    from agent.bundle.pull import phase_pull as run

    return run(ctx)


def phase_restore(ctx: BootContext) -> Done:
    from agent.data.restore import phase_restore as run

    return run(ctx)


def phase_render(ctx: BootContext) -> Done:
    from agent.bundle.apply import phase_render as run

    return run(ctx)


def phase_register(ctx: BootContext) -> Done:
    from agent.group.heartbeat import phase_register as run

    return run(ctx)


PHASES: tuple[Phase, ...] = (
    Phase("identity", phase_identity),
    Phase("userdata", phase_userdata),
    Phase("config", phase_config),
    Phase("pull", phase_pull, uses_aws=True),
    Phase("restore", phase_restore, uses_aws=True),
    Phase("render", phase_render),
    Phase("register", phase_register, uses_aws=True),
)


def _retarget_deadline(deadline: Deadline, deadline_s: float | None,
                       baked: dict[str, Any] | None) -> None:
    """The boot started on the baked deadline; the merged config may set another one."""
    if deadline_s:
        deadline.at = deadline.at - _deadline_s(baked) + float(deadline_s)


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
    from agent.config.model import load_yaml_bytes

    return load_yaml_bytes(raw, paths.config_file), hashlib.sha256(raw).hexdigest()


METRICS_TEXTFILE = "metrics.prom"


def _write_boot_metrics(paths: Paths, st: dict[str, Any]) -> None:
    """Phase durations for node_exporter's textfile collector (``<state_dir>/metrics.prom``).

    A file, not only the daemon's ``/metrics``, because the boot that most needs
    looking at is the one that failed, after which no daemon runs. A metrics
    failure is recorded, never a boot failure.
    """
    from agent.host.metrics import write_boot_textfile

    path = paths.state_dir / METRICS_TEXTFILE
    durations = [(p["name"], float(p["duration_s"])) for p in st["phases"]
                 if isinstance(p.get("duration_s"), (int, float))]
    try:
        write_boot_textfile(path, durations)
        st["metrics_textfile"] = str(path)
    except (OSError, ValueError) as exc:  # metrics are never a reason for a boot to fail
        st["metrics_textfile_error"] = f"{path}: {type(exc).__name__}: {exc}"


def _previous_state(paths: Paths) -> dict[str, Any]:
    try:
        return statefile.read(paths.state_file) or {}
    except StateError:
        # Unreadable old state must not stop a boot; keep it aside for a human, start clean.
        with contextlib.suppress(OSError):
            os.replace(paths.state_file, paths.state_file.with_suffix(".json.corrupt"))
        return {}


def _run_phase(phase: Phase, ctx: BootContext, rec: dict[str, Any],
               save: Callable[[], None]) -> tuple[BootContext, bool]:
    """Run one phase, recording it in ``rec``; the new context and whether it failed."""
    t0 = ctx.clock.monotonic()
    rec.update(status="running", started=ctx.clock.time())

    def on_progress(info: dict[str, Any]) -> None:
        rec["progress"] = info
        save()

    before = len(ctx.degraded)
    save()
    failed = False
    try:
        ctx.deadline.check(f"starting phase {phase.name}")
        done = phase.run(ctx.add(progress=on_progress))
        ctx = done.ctx
        # A phase that finished is not failed after the fact for finishing late: its waits
        # were capped by the deadline, only its work was slow (a busy or throttled instance).
        # Failing it would undo work already done - a ``register`` that wrote the record
        # ``ready`` then said ``error``, and ``run`` refused to start, so the member went
        # stale and was replaced. The next phase still does not start late.
        reasons = ctx.degraded[before:]
        rec["status"] = "degraded" if reasons else "ok"
        rec["detail"] = "; ".join(filter(None, [done.detail, *reasons, _overrun(ctx)]))
    except AgentError as exc:
        failed = True
        rec.update(status="error", detail=str(exc))
    except Exception as exc:  # a bug must still leave an honest state behind (and a record)
        failed = True
        rec.update(status="error", detail=f"internal error: {type(exc).__name__}: {exc}")
    rec["duration_s"] = round(ctx.clock.monotonic() - t0, 6)
    return ctx, failed


def _record_context(st: dict[str, Any], ctx: BootContext, previous: dict[str, Any]) -> None:
    """What the phases so far learned, into the state ``status`` reads."""
    if (ctx.identity is not None and "instance_id" not in st
            and previous.get("instance_id") == ctx.identity.instance_id):
        # Same instance: what the daemon recorded stays; a new instance-id starts clean
        # (an image baked from a used instance must not inherit its membership).
        st.update({k: previous[k] for k in CARRIED if k in previous})
    if ctx.identity is not None:
        st["instance_id"] = ctx.identity.instance_id
        st["identity"] = ctx.identity.as_context()
        st["boot_kind"] = ctx.boot_kind
    if ctx.config is not None:
        st["group"] = ctx.config.group
    st["degraded"] = list(ctx.degraded)
    st.update(ctx.state_updates)


def _boot_count(st: dict[str, Any], previous: dict[str, Any], boot_kind: str) -> int:
    if (previous.get("boot_id") == st["boot_id"]
            and previous.get("instance_id") == st.get("instance_id")):
        return int(previous.get("boot_count", 1))  # the same boot, run again
    if boot_kind == "reboot":
        return int(previous.get("boot_count", 0)) + 1
    return 1


def _warm_up(paths: Paths) -> None:
    from agent.aws import botodata as awsdata
    from agent.aws import session as aws

    # Lean model copies when a daemon has built them (a reboot): less to parse.
    aws.use_data(awsdata.find(paths.aws_data_dir))
    # CPU work (imports, S3 model loading) overlaps the identity phase's IMDS round trips.
    aws.prewarm(modules=("agent.config.model", "agent.bundle.apply", "agent.data.restore"))


def run_boot(paths: Paths | None = None, *, clock: Clock = SYSTEM_CLOCK,
             phases: Sequence[Phase] = PHASES) -> dict[str, Any]:
    """Run every phase; returns the final state. Never raises for a phase failure."""
    paths = paths or Paths.from_env()
    previous = _previous_state(paths)
    started = clock.time()
    st: dict[str, Any] = {
        "status": "running", "pid": os.getpid(), "boot_id": kernel_boot_id(),
        "started": started, "updated": started,
        "phases": [{"name": p.name, "status": "pending"} for p in phases],
        "errors": [], "degraded": [],
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
        baked_error = exc  # reported by the config phase, in order
    ctx = BootContext(paths=paths, clock=clock,
                      deadline=Deadline.after(_deadline_s(baked), "boot", clock),
                      started_wall=started, previous=previous, boot_id=st["boot_id"],
                      baked_config=baked, baked_sha256=baked_sha)
    save()
    if any(p.uses_aws for p in phases):
        _warm_up(paths)
    failed = False
    for phase, rec in zip(phases, st["phases"], strict=True):
        if failed:
            rec["status"] = "skipped"
            continue
        if phase.name == "config" and baked_error is not None:
            failed = True
            rec.update(status="error", detail=str(baked_error), duration_s=0.0)
        else:
            ctx, failed = _run_phase(phase, ctx, rec, save)
        if failed:
            st["errors"].append(f"{phase.name}: {rec['detail']}")
        _record_context(st, ctx, previous)
        save()
    _finish(st, ctx, failed, previous)
    save()
    return st


def _finish(st: dict[str, Any], ctx: BootContext, failed: bool,
            previous: dict[str, Any]) -> None:
    if failed:
        st["status"] = "error"
    else:
        st["status"] = "degraded" if ctx.degraded else "done"
        st.setdefault("first_boot_at", ctx.started_wall)
        st["first_boot_done"] = True
    st["boot_count"] = _boot_count(st, previous, ctx.boot_kind)
    if ctx.identity is not None and ctx.config is not None and not failed:
        from agent.boot.instance import save_instance

        try:
            save_instance(ctx.paths, ctx)
        except OSError as exc:
            st["status"] = "error"
            st["errors"].append(f"cannot save instance record for `run`: {exc}")
    from agent.boot.lifecycle import complete_lifecycle

    complete_lifecycle(ctx, st)  # the ASG launch hook: CONTINUE / ABANDON; never raises
    _write_boot_metrics(ctx.paths, st)
    st["finished"] = ctx.clock.time()
    st["duration_s"] = round(st["finished"] - ctx.started_wall, 6)
    st.pop("pid", None)
