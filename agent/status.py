"""``ec2-agent status``: gather facts, translate them (no I/O), print, exit 0/1/2.

The shape of cloud-init's ``cmd/status.py``. Everything here is pure except the
thin ``gather`` step, which reads ``state.json`` and nothing else: no network,
no boto3, so it answers in milliseconds even while the control plane is down.
Exit codes follow cloud-init: 0 done, 1 error, 2 degraded (and 0 while running,
as cloud-init does, unless ``--wait`` was asked for).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

EXIT = {"done": 0, "running": 0, "not-started": 0, "error": 1, "degraded": 2}


@dataclass(frozen=True)
class Report:
    status: str
    instance_id: str | None = None
    group: str | None = None
    boot_kind: str | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    heartbeat: dict[str, Any] = field(default_factory=dict)
    peers: list[dict[str, Any]] = field(default_factory=list)
    heal: dict[str, Any] = field(default_factory=dict)
    membership: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    lifecycle: dict[str, Any] = field(default_factory=dict)
    notices: dict[str, Any] = field(default_factory=dict)
    last_update: float | None = None

    @property
    def exit_code(self) -> int:
        return EXIT.get(self.status, 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        return d


def translate(state: dict[str, Any] | None) -> Report:
    """Facts (the parsed state file, or None) -> a Report. Pure."""
    if not state:
        return Report(status="not-started")
    boot_status = state.get("status", "not-started")
    degraded = list(state.get("degraded", []))
    membership = dict(state.get("membership", {}))
    status = boot_status
    if membership.get("state") == "superseded":
        degraded.append("superseded: this instance was replaced by a peer; it no longer "
                        "claims membership")
    hb = dict(state.get("heartbeat", {}))
    if hb.get("observer_sick"):
        degraded.append(f"heartbeat failing: {hb.get('last_error', 'unknown error')}")
    if status == "done" and degraded:
        status = "degraded"
    return Report(
        status=status,
        instance_id=state.get("instance_id"),
        group=state.get("group"),
        boot_kind=state.get("boot_kind"),
        phases=list(state.get("phases", [])),
        errors=list(state.get("errors", [])),
        degraded=degraded,
        heartbeat=hb,
        peers=list(state.get("peers", [])),
        heal=dict(state.get("heal", {})),
        membership=membership,
        health=dict(state.get("health", {})),
        lifecycle=dict(state.get("lifecycle", {})),
        notices=dict(state.get("notices") or {}),
        last_update=state.get("updated"),
    )


def notice_lines(notices: dict[str, Any]) -> list[str]:
    """What IMDS announced (agent.departure), one line each. Pure."""
    out = []
    spot = notices.get("spot")
    if spot:
        out.append(f"notice: spot interruption: {spot.get('action')} at {spot.get('time')}")
    lc = notices.get("lifecycle")
    if lc:
        out.append(f"notice: auto scaling target lifecycle state {lc.get('target_state')}")
    rb = notices.get("rebalance")
    if rb:
        out.append(f"notice: rebalance recommended at {rb.get('notice_time')}")
    for ev in notices.get("maintenance") or ():
        out.append(f"notice: scheduled {ev.get('code')} ({ev.get('state')}) not before "
                   f"{ev.get('not_before')}")
    return out


def _fmt_progress(p: dict[str, Any]) -> str:
    done = p.get("bytes", 0)
    total = p.get("total")
    rate = p.get("rate")
    s = f"{done / 1e6:.1f} MB"
    if total:
        s += f" / {total / 1e6:.1f} MB"
    if rate:
        s += f" at {rate / 1e6:.1f} MB/s"
    return s


def format_text(r: Report, *, now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"status: {r.status}"]
    if r.instance_id:
        lines.append(f"instance: {r.instance_id}  group: {r.group or '-'}  "
                     f"boot: {r.boot_kind or '-'}")
    if r.phases:
        lines.append("phases:")
        for p in r.phases:
            dur = p.get("duration_s")
            dur_s = f"{dur:7.3f}s" if isinstance(dur, (int, float)) else "       -"
            detail = p.get("detail") or ""
            if p.get("progress"):
                detail = (detail + " " if detail else "") + _fmt_progress(p["progress"])
            lines.append(f"  {p.get('name', '?'):<10} {p.get('status', '?'):<9} {dur_s}  {detail}")
    if r.membership.get("state"):
        why = f" ({r.membership['reason']})" if r.membership.get("reason") else ""
        lines.append(f"membership: {r.membership['state']}{why}")
    lines.extend(notice_lines(r.notices))
    if r.heartbeat:
        last = r.heartbeat.get("last_ok")
        age = f"{now - last:.0f}s ago" if isinstance(last, (int, float)) else "never"
        lines.append(f"heartbeat: seq {r.heartbeat.get('seq', '-')}, last written {age}")
    if r.health:
        lines.append(f"health: {r.health.get('status', '-')}")
    if r.peers:
        ready = sum(1 for p in r.peers if p.get("state") == "ready")
        lines.append(f"peers: {ready} ready of {len(r.peers)}")
    if r.heal:
        h = r.heal
        frozen = f"FROZEN ({h.get('reason')})" if h.get("frozen") else "not frozen"
        budget = h.get("budget_left")
        extra = f", budget left {budget}" if budget is not None else ""
        zones = h.get("disrupted_zones") or []
        if zones:  # nothing in these zones is replaced (#10, the zone rule)
            extra += f", zone disrupted: {', '.join(map(str, zones))}"
        lines.append(f"heal: {h.get('mode', '-')}, {frozen}{extra}")
    for d in r.degraded:
        lines.append(f"degraded: {d}")
    for e in r.errors:
        lines.append(f"error: {e}")
    return "\n".join(lines)
