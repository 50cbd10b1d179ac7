"""``ec2-agent run``: the daemon. A thin loop over tasks that each run on their own period.

    heartbeat   every heartbeat.interval_s (jittered): health checks, own record
    watch       every interval: the group's records (agent.group.peers), peers into state
    rerender    membership changed and quiet for a while: re-render, reload what changed
    heal        every interval: the replacement controller (agent.heal.controller), if enabled
    depart      every few seconds: IMDS notices -> leave / suspend / rejoin (agent.daemon.notices)
    refresh     every bundle.refresh_s: conditional GET of the manifest (agent.bundle.pull.refresh)
    backup      each data entry on its own backup_interval_s
    watchdog    sd_notify WATCHDOG=1 at half the systemd watchdog interval, from a thread of
                its own, while neither loop is wedged (agent.daemon.watchdog)

All decisions live in pure modules; this loop only schedules and records. A task
that fails is recorded in state and retried at its next period: the daemon never
dies of a sick dependency (a dead daemon would stop heartbeating and look like a
dead instance). SIGTERM (a systemd stop) leaves the group, then takes the final
backup, inside TimeoutStopSec.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.boot.instance import load_context, remember_layers
from agent.bootctx import BootContext
from agent.clock import SYSTEM_CLOCK, Clock
from agent.errors import AgentError, StateError
from agent.host import state as statefile
from agent.paths import Paths

if TYPE_CHECKING:
    from agent.aws.imds import ImdsClient
    from agent.daemon.notices import DepartureWatch
    from agent.daemon.tasks import MemberTasks
    from agent.daemon.watchdog import LoopView
    from agent.group.heartbeat import Heartbeater
    from agent.group.peers import PeerWatcher
    from agent.heal.controller import HealController
    from agent.host.endpoint import Endpoint
    from agent.host.health import HealthChecker
    from agent.interfaces import StoreAPI

log = logging.getLogger("ec2-agent.daemon")

# The tasks block of state.json (runs, failures, last error per task) is rewritten when a
# task's health changes (its first run, a failure, a recovery, another error) and otherwise
# at most this often: rewriting it on every loop pass was most of an idle daemon's CPU (#12).
TASKS_RECORD_S = 60.0


@dataclass
class Task:
    name: str
    period: Callable[[], float]
    fn: Callable[[], None]
    next_at: float = 0.0
    runs: int = 0
    failures: int = 0
    last_error: str = ""

    def health(self) -> tuple[bool, int, str]:
        """What makes the tasks block worth rewriting at once: ran yet, failures, error."""
        return self.runs > 0, self.failures, self.last_error

    def record(self) -> dict[str, Any]:
        return {"runs": self.runs, "failures": self.failures, "last_error": self.last_error}


@dataclass
class TasksRecord:
    """When the tasks block was last written to state.json, and the health it showed."""

    health: dict[str, tuple[bool, int, str]] = field(default_factory=dict)
    at: float | None = None  # monotonic; None: never written

    def due(self, health: dict[str, tuple[bool, int, str]], now: float,
            every_s: float = TASKS_RECORD_S) -> bool:
        return health != self.health or self.at is None or now - self.at >= every_s


@dataclass
class Daemon:
    paths: Paths
    clock: Clock = SYSTEM_CLOCK
    stop_event: threading.Event = field(default_factory=threading.Event)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.ctx: BootContext | None = None
        self.tasks: list[Task] = []
        self.stop_reason = ""
        self.last_backup: dict[str, float] = {}
        self.membership_changes: list[tuple[float, str]] = []
        self.rendered_peers_hash: str | None = None
        self.endpoint: Endpoint | None = None
        self.heal: HealController | None = None
        self.bulk_store: StoreAPI | None = None
        self.imds: ImdsClient | None = None
        self.departure_watch: DepartureWatch | None = None
        self.watchdog_s: float | None = None
        from agent.daemon.watchdog import LoopState

        self.loops = {"heartbeat": LoopState("heartbeat"), "main": LoopState("main")}
        self.heartbeat_thread: threading.Thread | None = None
        # Made by setup(); None before it (metrics and shutdown may run without them).
        self.checker: HealthChecker | None = None
        self.hb: Heartbeater | None = None
        self.watcher: PeerWatcher | None = None
        self.member: MemberTasks | None = None  # the steps the simulator runs too
        self.heartbeat_task: Task | None = None
        self._metrics_seen: dict[str, Any] | None = None
        self.tasks_record = TasksRecord()

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self) -> None:
        from agent.group.heartbeat import Heartbeater, _known_seq, member_file, record_for
        from agent.group.peers import PeerWatcher
        from agent.host.endpoint import Endpoint
        from agent.host.health import HealthChecker
        from agent.layout import member_key

        ctx = load_context(self.paths, self.clock)
        logging.getLogger().setLevel(ctx.cfg.log.levelno)  # log.level of the merged config
        self._use_lean_aws_data()
        ctx = self.ctx = ctx.add(store=self._make_store(ctx))
        self.last_backup = {k: float(v) for k, v in
                            (ctx.previous.get("daemon", {}).get("last_backup") or {}).items()}
        cfg = ctx.config
        store = ctx.get_store()
        # beat() gives the checks at most half an interval (a slow check reports later)
        self.checker = HealthChecker.from_config(cfg.health)
        http = cfg.http
        endpoint_url = ""
        if http.enabled:
            self.endpoint = Endpoint(http.bind, http.port, health_fn=self._health_doc,
                                     private_ip=ctx.identity.local_ipv4 or "").start()
            endpoint_url = self.endpoint.url
        seq = _known_seq(ctx, store, member_key(cfg.group, ctx.identity.instance_id))
        record = record_for(ctx, seq, "ready", None, endpoint_url)
        self.hb = Heartbeater(store, record, clock=self.clock,
                              interval_s=cfg.heartbeat.interval_s,
                              state_path=self.paths.state_file,
                              member_path=member_file(self.paths))
        self.watcher = PeerWatcher(store, cfg.group, ctx.identity.instance_id, clock=self.clock,
                                   dead_after_s=float(cfg.heartbeat.dead_after_s))
        self.heal = self._make_heal(ctx)
        from agent.daemon.tasks import MemberTasks

        self.member = MemberTasks(self.hb, self.watcher, self.heal)
        from agent.daemon.notices import DepartureWatch

        # After self.member: a member held / suspended since before has its departing set there.
        self.departure_watch = DepartureWatch(self)  # held / suspended before: no beats
        # What the last render saw (boot renders from state.json's peers): the baseline that a
        # membership change is measured against.
        from agent.bundle.render import peers_from_state
        from agent.group.peers import peers_hash

        rendered = sorted(peers_from_state(ctx.previous.get("peers")), key=lambda p: p["id"])
        self.rendered_peers_hash = peers_hash(rendered)
        interval = cfg.heartbeat.interval_s
        # The heartbeat has a thread of its own: watching, healing or a slow refresh must
        # never delay it (a late heartbeat is what makes a healthy member look dead).
        self.heartbeat_task = Task(
            "heartbeat", lambda: self._jitter(self.ctx.config.heartbeat.interval_s), self.beat)
        self.tasks = [
            Task("watch", lambda: self.ctx.config.heartbeat.interval_s, self.watch),
            Task("depart", lambda: min(5.0, interval), self.check_departure),
            Task("refresh", lambda: float(self.ctx.config.bundle.refresh_s), self.refresh),
            Task("backup", lambda: 1.0, self.backups),
            Task("rerender", lambda: 1.0, self.maybe_rerender),
        ]
        if self.heal is not None:
            self.tasks.append(Task("heal", lambda: self.ctx.config.heartbeat.interval_s,
                                   self.heal_step))
        from agent.host import systemd

        self.watchdog_s = systemd.watchdog_interval()
        now = self.clock.monotonic()
        for t in self.tasks:
            t.next_at = now
        # Peer watching starts after our own first heartbeat so we are never seen absent.
        for t in self.tasks:
            if t.name in ("watch", "heal"):
                t.next_at = now + 0.2

    def _use_lean_aws_data(self) -> None:
        """Point this process's boto3 session at lean model copies (~12 MiB less RSS).

        Built by a child process on the first start with this botocore version; if
        that fails the daemon runs on botocore's full data, only larger.
        """
        from agent.aws import botodata as awsdata
        from agent.aws import session as aws

        path = awsdata.ensure(self.paths.aws_data_dir)
        aws.use_data(path)
        self._record("aws_data", {"path": str(path) if path else None})

    @staticmethod
    def _make_store(ctx: BootContext) -> StoreAPI:
        """Heartbeats and watches need answers within an interval, not botocore's defaults.

        A sick store must turn into recorded failures (observer-sick, api-failing)
        within about one interval, never into a loop blocked for minutes. Backups use
        ``backup.store_for`` (ordinary timeouts, more connections).
        """
        from agent.aws import session as aws
        from agent.aws.store import Store

        cfg = ctx.config
        region = cfg.store.region or ctx.identity.region
        connect, read = _store_timeouts(float(cfg.heartbeat.interval_s))
        # One attempt per call: every task already retries on its own period (the
        # heartbeat within its interval), and botocore's retries would only stack delays.
        client = aws.client("s3", region, connect_timeout=connect, read_timeout=read,
                            max_attempts=1)
        return Store(cfg.store.bucket, cfg.store.prefix, client=client)

    def _make_heal(self, ctx: BootContext) -> HealController | None:
        if ctx.config.heal.mode == "off":
            return None
        from agent.heal.controller import HealController

        return HealController.for_daemon(ctx, self.watcher, clock=self.clock)

    def _bulk_store(self) -> StoreAPI:
        if self.bulk_store is None:
            from agent.data.backup import store_for

            self.bulk_store = store_for(self.ctx.config, region=self.ctx.identity.region)
        return self.bulk_store

    def _jitter(self, interval: float) -> float:
        from agent.group.heartbeat import next_interval

        return next_interval(interval, self.rng.random())

    def _health_doc(self) -> dict[str, Any]:
        return self.checker.summary()

    # -- tasks -----------------------------------------------------------------------------------
    # Whether a peer replaced us / why we are leaving: the member's, kept in one place.
    @property
    def superseded(self) -> bool:
        return bool(self.member is not None and self.member.superseded)

    @property
    def departing(self) -> str | None:
        return self.member.departing if self.member is not None else None

    @departing.setter
    def departing(self, reason: str | None) -> None:
        if self.member is None:
            raise RuntimeError("departing is the member's: setup() has not run")
        self.member.departing = reason

    def beat(self) -> None:
        if self.member is None or not self.member.active:
            return
        # At most half the interval for the checks: a slow one reports at a later beat, the
        # record is written on time (a member's own checks must not make it look dead).
        health = self.checker.run(budget_s=0.5 * float(self.ctx.config.heartbeat.interval_s))
        state = "degraded" if health.get("status") == "critical" else "ready"
        res = self.member.heartbeat(state=state, health=health)
        if res is not None and not res.ok:
            raise AgentError(f"heartbeat failed after {res.attempts} attempts: {res.error}")

    def watch(self) -> None:
        from agent.group.peers import peers_hash

        rep = self.member.watch()
        self.watcher.write_state(self.paths.state_file)
        h = peers_hash(self.watcher.template_peers())
        if h != self.rendered_peers_hash and (
                not self.membership_changes or self.membership_changes[-1][1] != h):
            self.membership_changes.append((self.clock.monotonic(), h))
        if rep.errors:
            raise AgentError("; ".join(rep.errors))

    def maybe_rerender(self) -> None:
        from agent.group.peers import should_rerender

        if not self.membership_changes:
            return
        m = self.ctx.config.membership
        if not should_rerender(self.membership_changes, self.clock.monotonic(),
                               m.quiescence_min_s, m.quiescence_max_s):
            return
        from agent.bundle.apply import render_all
        from agent.bundle.render import peers_from_state

        st = statefile.read(self.paths.state_file) or {}
        result = render_all(self.ctx.config, self.ctx.bundle_dir, paths=self.paths,
                            identity=self.ctx.identity, peers=peers_from_state(st.get("peers")))
        self.rendered_peers_hash = self.membership_changes[-1][1]
        self.membership_changes.clear()
        self._record("render", {"reason": "membership changed", "ok": result.ok,
                                "errors": list(result.errors)})
        if not result.ok:
            raise AgentError("re-render after a membership change: " + "; ".join(result.errors))

    def heal_step(self) -> None:
        if self.member is None or not self.member.active:
            return
        self.member.heal()
        if self.member.superseded:
            self._record_superseded()

    def become_superseded(self) -> None:
        """A peer replaced us: stop claiming membership, say so, keep services untouched."""
        if self.member is not None and self.member.become_superseded():
            self._record_superseded()

    def _record_superseded(self) -> None:
        statefile.update(self.paths.state_file,
                         lambda d: d.setdefault("membership", {}).update(state="superseded"))

    def check_departure(self) -> None:
        """IMDS's notices (spot, lifecycle, rebalance, maintenance): ``notices`` decides."""
        from agent.daemon.notices import DepartureWatch

        if self.departure_watch is None:
            self.departure_watch = DepartureWatch(self)
        self.departure_watch.step()

    def _held(self) -> bool:
        """Booted but never joined (agent.daemon.notices): no backups of data it never served."""
        return bool(getattr(self.departure_watch, "never_joined", False))

    def depart(self, reason: str) -> None:
        """Leaving is not dying: delete our record first so nobody replaces us."""
        if self.member is None:  # setup never finished: nothing registered to take back
            return
        self.member.leave(reason)
        statefile.update(self.paths.state_file,
                         lambda d: d.setdefault("membership", {}).update(state="leaving",
                                                                          reason=reason))

    def refresh(self) -> None:
        from agent.bundle.pull import refresh

        res = refresh(self.ctx)
        if res.ctx is not None:  # a new bundle was taken (rendered or not)
            self.ctx = res.ctx
            logging.getLogger().setLevel(self.ctx.cfg.log.levelno)
            remember_layers(self.paths, self.ctx)
        if res.status == "updated":
            self._record("refresh", {"version": res.version, "changed": list(res.changed_paths),
                                     "reloaded": list(res.reloaded)})
        elif res.status == "error":
            raise AgentError(res.error or "refresh failed")

    def backups(self) -> None:
        if not self.ctx.config.data or self.superseded:  # replaced: its data is not ours (#10)
            return  # nothing to back up: agent.data.backup is never loaded (idle RSS)
        if self._held():
            return  # never joined (warm pool, standby): its copy is not the group's data
        from agent.data.backup import backup, backup_due

        now = self.clock.time()
        for spec in backup_due(self.ctx.config, self.last_backup, now):
            self.last_backup[spec.name] = now  # a failure waits a full interval, not 1 s
            # Kept in state so a restarted daemon does not back everything up again at once.
            self._record("last_backup", dict(self.last_backup))
            backup(self._bulk_store(), self.ctx.config.group, spec, self.paths,
                   instance_id=self.ctx.identity.instance_id, clock=self.clock)

    # -- loop ------------------------------------------------------------------------------------
    def _record(self, what: str, doc: dict[str, Any]) -> None:
        try:
            statefile.update(self.paths.state_file,
                             lambda d: d.setdefault("daemon", {}).update({what: doc}))
        except StateError as exc:
            log.warning("cannot record %s: %s", what, exc)

    def _watchdog_loop(self, period: float) -> None:
        """Ping systemd's watchdog every period/2 while neither loop is wedged.

        A thread of its own, so slow work never delays a ping; what it checks is each
        loop's last sign of life against that loop's bound (``agent.daemon.watchdog``). Every
        store call is bounded by its timeouts, so during an outage both loops still
        show signs of life and the agent is not restarted for it; a loop that is truly
        stuck (even while the other runs on) stops the pings and systemd restarts it.
        """
        from agent.daemon import watchdog
        from agent.host import systemd

        quiet = False
        while not self.stop_event.wait(period / 2):
            why = watchdog.wedged(self._loop_views(period), time.monotonic())
            if not why:
                systemd.watchdog()
                quiet = False
            elif not quiet:
                quiet = True
                log.error("not pinging the systemd watchdog: %s", "; ".join(why))

    def _loop_views(self, period: float) -> list[LoopView]:
        from agent.daemon import watchdog

        interval = float(self.ctx.config.heartbeat.interval_s)
        hb_bound = watchdog.heartbeat_bound(period, interval,
                                            [c.timeout_s for c in self.checker.specs],
                                            sum(_store_timeouts(interval)))
        stores = (self.ctx.store, self.bulk_store)
        progress = max((s.usage.last_mono for s in stores if hasattr(s, "usage")),
                       default=0.0)
        return [self.loops["heartbeat"].view(hb_bound),
                self.loops["main"].view(watchdog.main_loop_bound(period), progress)]

    def _heartbeat_loop(self) -> None:
        t = self.heartbeat_task
        while not self.stop_event.is_set():
            started = self.clock.monotonic()
            self._run_task(t, "heartbeat")
            # Start to start: a slow beat (health checks near their timeout, a slow store, a
            # starved CPU) does not push the next one later, so the record is rewritten every
            # interval, not every interval + beat; a member that is slow does not drift
            # towards dead_after. A beat that overran its interval is followed after a short
            # pause, not at once (a sick store gets no back-to-back writes).
            period = t.period()
            t.next_at = max(started + period, self.clock.monotonic() + 0.2 * period)
            self.stop_event.wait(max(0.0, t.next_at - self.clock.monotonic()))

    def _run_task(self, t: Task, loop: str = "main") -> None:
        marks = self.loops[loop]
        marks.begin(t.name, time.monotonic())
        try:
            t.fn()
            t.runs += 1
            if t.failures:
                t.failures = 0
                t.last_error = ""
        except Exception as exc:  # one sick task must not stop the others
            t.failures += 1
            t.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("task %s failed (%d in a row): %s", t.name, t.failures, t.last_error)
        finally:
            marks.end(time.monotonic())
        t.next_at = self.clock.monotonic() + max(0.05, t.period())

    def run_once(self) -> float:
        """Run every due task; returns seconds until the next one is due."""
        now = self.clock.monotonic()
        for t in sorted(self.tasks, key=lambda t: t.next_at):
            if self.stop_event.is_set():
                break
            if t.next_at <= now:
                self._run_task(t)
        self.record_tasks()
        self._update_metrics()
        nxt = min((t.next_at for t in self.tasks), default=now + 1.0)
        return max(0.0, nxt - self.clock.monotonic())

    def record_tasks(self, force: bool = False) -> None:
        """The tasks block of state.json, when a task's health changed or it is due."""
        every = [t for t in (self.heartbeat_task, *self.tasks) if t is not None]
        health = {t.name: t.health() for t in every}
        now = self.clock.monotonic()
        if force or self.tasks_record.due(health, now):
            self.tasks_record = TasksRecord(health, now)
            self._record("tasks", {t.name: t.record() for t in every})

    def _update_metrics(self) -> None:
        """Refresh the Prometheus series (``agent.host.metrics``, served on ``/metrics``).

        Only from what the loop already holds (heartbeater, peer watcher, heal
        controller, state.json): no store or cloud call of its own, so metrics cost
        nothing on a sick control plane. Counters count what happened since this
        daemon started. Never fails the loop. See docs/metrics.md.
        """
        try:
            from collections import Counter

            from agent.group.membership import LIVENESS
            from agent.host import metrics

            m = metrics.get()
            now = self.clock.monotonic()
            if self._metrics_seen is None:
                self._metrics_seen = {"start": now, "boot": False, "outcome": None, "freeze": ""}
            seen = self._metrics_seen
            if not seen["boot"] and self.ctx is not None:
                seen["boot"] = True  # the boot that preceded this daemon, once
                for p in self.ctx.previous.get("phases", []):
                    if isinstance(p.get("duration_s"), (int, float)):
                        m.observe_phase(str(p.get("name")), float(p["duration_s"]))
            hb = self.hb
            if hb is not None:
                last = hb.last_ok_mono if hb.last_ok_mono is not None else seen["start"]
                m.set_heartbeat_age(now - last)
            watcher = self.watcher
            if watcher is not None and self.ctx is not None:
                cfg = self.ctx.config
                verdicts = watcher.verdicts(dead_after_s=float(cfg.heartbeat.dead_after_s),
                                            grace_s=float(cfg.heal.grace_s))
                counts = Counter(str(getattr(v, "status", v)) for v in verdicts.values())
                m.set_peers({s: counts.get(s, 0) for s in LIVENESS} | dict(counts))
            if self.heal is None:
                m.set_frozen(False)
                return
            action = str(self.heal.policy.action)
            if not seen.get("labels"):  # series exist at 0 from the start, for rate()/alerts
                seen["labels"] = True
                for r in ("acted", "failed", "refused", "lost", "dry-run"):
                    m.replacements.labels(action=action, result=r)
                for r in ("observer-sick", "observer-fresh", "paused", "api-failing",
                          "failed-replacements", "mass-death"):
                    m.freezes.labels(reason=r)
            step = next((t.next_at for t in self.tasks if t.name == "heal"), None)
            if step != seen.get("heal_step"):  # read state.json only after a heal step
                seen["heal_step"] = step
                heal = (statefile.read(self.paths.state_file) or {}).get("heal") or {}
                frozen = bool(heal.get("frozen"))
                m.set_frozen(frozen)
                reason = str(heal.get("reason") or "").split(":", 1)[0] if frozen else ""
                if reason and reason != seen["freeze"]:
                    m.freeze(reason)  # entering a freeze, or its first reason changed
                seen["freeze"] = reason
            outcomes = list(self.heal.outcomes)
            last = seen["outcome"]
            at = next((i for i in range(len(outcomes) - 1, -1, -1) if outcomes[i] is last), -1)
            for o in outcomes[at + 1:]:
                m.replacement(action, str(o.result))
            if outcomes:
                seen["outcome"] = outcomes[-1]
        except Exception as exc:  # metrics are never a reason for the loop to stop
            log.warning("cannot update metrics: %s: %s", type(exc).__name__, exc)

    def run(self) -> int:
        from agent.host import systemd

        self.setup()
        statefile.update(self.paths.state_file,
                         lambda d: d.setdefault("daemon", {}).update(
                             pid=os.getpid(), started=self.clock.time()))
        systemd.ready("running")
        for marks in self.loops.values():
            marks.end(time.monotonic())  # both loops start now
        if self.watchdog_s:
            threading.Thread(target=self._watchdog_loop, args=(self.watchdog_s,),
                             name="ec2-agent-watchdog", daemon=True).start()
        self.heartbeat_thread = threading.Thread(target=self._heartbeat_loop,
                                                 name="ec2-agent-heartbeat", daemon=True)
        self.heartbeat_thread.start()
        loops = 0
        while not self.stop_event.is_set():
            wait = self.run_once()
            loops += 1
            if loops % 60 == 1:
                trim_memory()
            self.stop_event.wait(min(wait, 1.0))
        return self.shutdown()

    def shutdown(self) -> int:
        """Leave the group, then take the final backup. Services are left running."""
        from agent.host import systemd

        systemd.stopping()
        if self.heartbeat_thread is not None:
            # An in-flight beat finishes (bounded by its timeouts) before we leave.
            self.heartbeat_thread.join(timeout=30)
        self.record_tasks(force=True)  # the final counts, not those of up to a minute ago
        if not self.superseded and not self.departing:
            self.depart(self.stop_reason or "stop")
        code = 0
        if self.ctx is not None and self.ctx.config.data and not self._held():
            from agent.data.backup import run_backups

            outcomes = run_backups(self._bulk_store(), self.ctx.config, self.paths,
                                   instance_id=self.ctx.identity.instance_id, final=True,
                                   clock=self.clock)
            failed = [o for o in outcomes if o.error]
            self._record("final_backup", {"ok": not failed,
                                          "errors": [f"{o.name}: {o.error}" for o in failed]})
            code = 1 if failed else 0
        if self.endpoint is not None:
            self.endpoint.stop()
        if self.checker is not None:
            self.checker.close()
        return code

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stop_event.set()


def _store_timeouts(interval_s: float) -> tuple[float, float]:
    """(connect, read) timeouts of the daemon's store calls for a heartbeat interval."""
    return max(0.5, min(2.0, interval_s / 2)), max(1.0, min(5.0, interval_s))


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """libc, looked up once: ``find_library`` runs ``ldconfig -p`` in a subprocess."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas(arenas: int = 1) -> None:
    """One glibc malloc arena: a long-lived daemon with a few threads keeps less RSS.

    Same effect as ``MALLOC_ARENA_MAX=1``; must run before threads start. The GIL
    already serialises nearly all allocation, so per-thread arenas buy no speed here,
    only memory (measured: 0.5 MiB less idle RSS than two arenas). Not glibc: nothing
    to do.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def trim_memory() -> None:
    """Give freed heap back to the OS (boto3's model loading leaves large free blocks)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def main(paths: Paths | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limit_malloc_arenas()
    d = Daemon(paths or Paths.from_env())

    def on_term(signum: int, _frame: Any) -> None:
        d.request_stop(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    return d.run()
