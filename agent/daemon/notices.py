"""The thin shell around ``agent.departure``: read IMDS's signals, apply the decision.

``observe(imds)`` reads every signal (one GET each; a failing source is marked
unknown, never absent). ``boot_joins_now(ctx)`` tells the boot's register phase
whether to write a member record (not in a warm pool / standby). ``DepartureWatch``
is the daemon's ``depart`` task: observe, decide (pure), then leave / suspend /
rejoin through the daemon's heartbeater, take the final backup, and show the
notices in ``state.json`` (``notices``, read by ``status``) and in the metrics
(``ec2_agent_imds_notice{kind}``).

The daemon hook is two lines (daemon.py ``setup`` and ``check_departure``); this
module reaches into the daemon only through the attributes named in ``DaemonLike``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent import departure as D
from agent.bootctx import BootContext
from agent.clock import Clock, Deadline
from agent.errors import AgentError, StateError
from agent.group.heartbeat import boot_joins_now  # noqa: F401 - re-exported
from agent.host import state as statefile
from agent.interfaces import CloudAPI, StoreAPI
from agent.paths import Paths

if TYPE_CHECKING:
    from agent.aws.imds import ImdsClient
    from agent.group.heartbeat import Heartbeater

log = logging.getLogger(__name__)

CHECK_DEADLINE_S = 4.0


def observe(imds: Any) -> D.Observations:
    """Every departure signal, as IMDS shows it now. Never raises for an IMDS failure."""
    failed: list[str] = []
    errors: list[str] = []

    def read(source: str, fn: Callable[[], Any], empty: Any = None) -> Any:
        try:
            return fn()
        except AgentError as exc:
            failed.append(source)
            errors.append(f"{source}: {exc}")
            log.debug("IMDS %s unreadable: %s", source, exc)
            return empty

    spot = read("spot", imds.spot_action)
    term = read("termination-time", imds.termination_time)
    target = read("lifecycle", imds.target_lifecycle_state)
    rebalance = read("rebalance", imds.rebalance)
    events = read("maintenance", imds.maintenance_events, [])
    return D.observations_from_imds(spot=spot, termination_time=term, lifecycle_state=target,
                                    rebalance=rebalance, maintenance=events, failed=failed,
                                    errors=errors)


def check_departure(imds: Any) -> str | None:
    """Ask IMDS (every departure signal, default policy); an IMDS failure is not a departure."""
    from agent.config.model import defaults

    policy = D.Policy.from_raw({**defaults("departure"), "on_maintenance": "report"})
    d = D.decide(observe(imds), policy, "member", 0.0)
    return d.reason if d.action in ("leave", "suspend") else None


class DaemonLike(Protocol):
    """What ``DepartureWatch`` uses of ``agent.daemon.loop.Daemon``."""

    paths: Paths
    clock: Clock
    ctx: BootContext | None
    hb: Heartbeater | None
    departing: str | None
    imds: ImdsClient | None

    def depart(self, reason: str) -> None: ...
    def _bulk_store(self) -> StoreAPI: ...
    def _record(self, what: str, doc: dict[str, Any]) -> None: ...


def initial_membership(state: dict[str, Any] | None, member_left: bool) -> tuple[str, str]:
    """(membership, reason) at daemon start, from state.json and member.json. Pure."""
    ms = (state or {}).get("membership") or {}
    kind = ms.get("state")
    reason = str(ms.get("reason") or "")
    if kind in ("held", "suspended"):
        return kind, reason
    if member_left:
        return "left", reason or "left before this daemon started"
    return "member", ""


class DepartureWatch:
    """The daemon's departure task; ``step()`` runs every few seconds."""

    def __init__(self, daemon: DaemonLike, *, cloud: CloudAPI | None = None) -> None:
        self.d = daemon
        self.cloud = cloud  # for the launch hook of a warm pool instance entering service
        st = _read_state(daemon.paths.state_file)
        left = bool(getattr(daemon.hb, "left", False))
        self.membership, reason = initial_membership(st, left)
        self.notices: dict[str, Any] | None = (st or {}).get("notices")
        self.last: D.Decision | None = None
        # Held since the boot (warm pool, standby) and not joined yet: its data is not the
        # group's (it may be days old when it enters service), so nothing is backed up.
        self.never_joined = self.membership == "held"
        if self.membership in ("held", "suspended"):
            _set_departing(daemon, reason or self.membership)  # no beats, no healing

    @property
    def policy(self) -> D.Policy:
        return self.d.ctx.config.departure

    def step(self) -> D.Decision:
        d = self.d
        if d.imds is None:  # one client: its pool and token are reused every check
            from agent.aws.imds import ImdsClient

            d.imds = ImdsClient(clock=d.clock)
        if self.membership == "member" and d.departing:
            self.membership = "left"  # SIGTERM, `ec2-agent leave`, superseded: final
        obs = observe(d.imds.with_deadline(
            Deadline.after(CHECK_DEADLINE_S, "departure check", d.clock)))
        decision = D.decide(obs, self.policy, self.membership, d.clock.time())
        self._show(decision)
        self.apply(decision)
        self.last = decision
        return decision

    def apply(self, decision: D.Decision) -> None:
        d = self.d
        action = decision.action
        if action in ("stay", "hold"):
            return
        log.warning("departure: %s (%s)", action, decision.reason)
        if action == "join" and _left_for_good(d.paths):
            log.warning("departure: not rejoining: `ec2-agent leave` ran while suspended")
            self.membership = "left"
            self._set_membership("left", "ec2-agent leave")
            return
        if action == "join":
            if self.never_joined:
                self._answer_launch_hook()
            _set_departing(d, None)
            self.never_joined = False
            d.hb.rejoin()
            self._set_membership("joining", decision.reason)
        elif self.membership == "held":  # leave while held: there is no record to delete
            _set_departing(d, decision.reason)
            self._set_membership("left", decision.reason)
        else:  # leave or suspend a member: the record goes first, nobody replaces us
            d.depart(decision.reason)
            if action == "suspend":
                self._set_membership("suspended", decision.reason)
            if decision.final_backup and d.ctx.config.data:
                self._final_backup(decision.reason)
        nxt = decision.next_membership
        if nxt:
            self.membership = nxt

    def _answer_launch_hook(self) -> None:
        """Warmed:Running -> InService in this process: Auto Scaling runs the launch hook
        again for an instance leaving the warm pool; answer it as the boot would (CONTINUE).
        """
        from agent.boot.lifecycle import complete_lifecycle

        st: dict[str, Any] = {"status": "done", "degraded": []}
        rec = complete_lifecycle(self.d.ctx, st, cloud=self.cloud, entering=True)
        try:
            statefile.update(self.d.paths.state_file, lambda doc: doc.update(lifecycle=rec))
        except StateError as exc:
            log.warning("cannot record the launch hook answer: %s", exc)

    def _final_backup(self, reason: str) -> None:
        from agent.data.backup import run_backups

        d = self.d
        outcomes = run_backups(d._bulk_store(), d.ctx.config, d.paths,
                               instance_id=d.ctx.identity.instance_id, final=True, clock=d.clock)
        failed = [o for o in outcomes if o.error]
        d._record("final_backup", {"ok": not failed, "reason": reason, "at": d.clock.time(),
                                   "entries": [o.name for o in outcomes],
                                   "errors": [f"{o.name}: {o.error}" for o in failed]})

    def _set_membership(self, state: str, reason: str) -> None:
        try:
            statefile.update(self.d.paths.state_file,
                             lambda doc: doc.setdefault("membership", {}).update(
                                 state=state, reason=reason))
        except StateError as exc:
            log.warning("cannot record membership %s: %s", state, exc)

    def _show(self, decision: D.Decision) -> None:
        """Notices into state.json (when they change) and into the metrics (always)."""
        notices = dict(decision.notices)
        if notices != self.notices:
            self.notices = notices
            try:
                statefile.update(self.d.paths.state_file,
                                 lambda doc: doc.update(notices=notices))
            except StateError as exc:
                log.warning("cannot record notices: %s", exc)
        try:
            from agent.host import metrics

            metrics.get().set_notices(notices)
        except Exception as exc:  # metrics are never a reason for the task to fail
            log.warning("cannot update notice metrics: %s: %s", type(exc).__name__, exc)


def _set_departing(d: Any, reason: str | None) -> None:
    """Why the daemon is out of the group (None: it is in): no beats, no healing.

    Where the daemon keeps its member steps in ``d.member`` (agent.daemon.tasks.MemberTasks)
    that object owns ``departing``; otherwise the daemon itself does.
    """
    member = getattr(d, "member", None)
    if member is not None and hasattr(member, "departing"):
        member.departing = reason
    else:
        d.departing = reason


def _left_for_good(paths: Any) -> bool:
    """``ec2-agent leave`` ran (member.json ``final``): never rejoin."""
    try:
        return bool((statefile.read_member_file(paths) or {}).get("final"))
    except StateError:
        return False


def _read_state(path: Any) -> dict[str, Any] | None:
    try:
        return statefile.read(path)
    except StateError:
        return None
