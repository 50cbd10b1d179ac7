"""This member's own record: registration (boot phase), heartbeats (daemon), leaving.

``groups/<group>/members/<id>.json`` holds one ``agent.group.membership.MemberRecord``.
Every beat writes it with ``seq + 1`` (so its ETag always changes), the member's
state, its health summary and its endpoint. A failed write is retried with
backoff *within* the interval (never past it: a beat that lands after the next
one is due is worthless). After ``sick_after`` failed beats in a row the agent is
observer-sick: it says so in ``state.json`` (``heartbeat.observer_sick``) and in
``self.observer_sick``; the heal controller must not judge anyone while that is
true (DESIGN.md invariant 3).

Joins, state changes and leaves also bump the group's change marker
(``agent.group.peers.bump_marker``) so peers learn of them within one interval without
listing the group.

Leaving is not dying (invariant 8): ``leave()`` writes the record once more with
state ``leaving`` (so a peer that reads it in between does not count it dead),
deletes it, bumps the marker and appends an event. The daemon calls it on SIGTERM,
``ec2-agent leave`` calls it, and ``check_departure`` says when IMDS announces a
spot interruption or an Auto Scaling termination.

``member.json`` (in the state dir) keeps the member's coordinates (group, store,
instance id, last seq) so ``ec2-agent leave``/``peers``/``events`` work without
re-reading user-data, and so ``seq`` survives restarts.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent import __version__
from agent.bootctx import BootContext, Done
from agent.clock import SYSTEM_CLOCK, Clock
from agent.errors import AgentError, NotFound, StateError, StoreError
from agent.group.membership import MemberRecord
from agent.group.peers import bump_marker, member_change
from agent.host import state as statefile
from agent.host.state import MEMBER_FILE, member_file, read_member_file  # noqa: F401
from agent.interfaces import StoreAPI
from agent.layout import member_key

log = logging.getLogger(__name__)

JITTER = 0.1


# -- pure --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Backoff:
    """Retry delays for one beat, as a value: 0.2 s, 0.4 s, 0.8 s... capped, jittered down."""

    base_s: float = 0.2
    factor: float = 2.0
    cap_s: float = 2.0

    def delay(self, attempt: int, u: float = 0.0) -> float:
        """Delay before retry number ``attempt`` (1-based); ``u`` in [0, 1) is the jitter draw."""
        d = min(self.cap_s, self.base_s * self.factor ** (attempt - 1))
        return d * (1.0 - 0.5 * u)


def next_interval(interval_s: float, u: float) -> float:
    """Seconds to the next beat: ``interval_s`` minus up to 10 % jitter.

    Jitter spreads a fleet that booted together across the interval; it only ever
    shortens the wait, so two beats still fit in ``dead_after_s`` (>= 2 intervals).
    """
    return interval_s * (1.0 - JITTER * u)


def departure_reason(spot_action: Mapping[str, Any] | None,
                     lifecycle_state: str | None) -> str | None:
    """Whether IMDS says this member is going away (leave or suspend), and why. Pure.

    A shorthand over ``agent.departure.decide`` for the spot notice and the lifecycle
    state alone (the daemon uses ``agent.daemon.notices``, which reads every signal).
    """
    from agent import departure as D
    from agent.config.model import defaults

    obs = D.observations_from_imds(spot=spot_action, lifecycle_state=lifecycle_state)
    d = D.decide(obs, D.Policy.from_raw(defaults("departure")), "member", 0.0)
    return d.reason if d.action in ("leave", "suspend") else None


def boot_joins_now(ctx: BootContext) -> tuple[bool, str]:
    """For the register phase: (join?, why), from ``autoscaling/target-lifecycle-state``.

    An unreadable state joins (what the agent always did: IMDS trouble is not a
    reason to stay out); only a state that says "not in service" holds the boot back.
    """
    imds = ctx.imds
    if imds is None:
        return True, "no IMDS client"
    try:
        state = imds.target_lifecycle_state()
    except AgentError as exc:
        return True, f"target lifecycle state unreadable ({exc}): joining"
    from agent import departure as D

    return D.boot_joins(state)


# -- local member file -------------------------------------------------------------------------

def write_member_file(paths: Any, doc: Mapping[str, Any]) -> None:
    from agent.host.files import atomic_write

    try:
        atomic_write(member_file(paths), json.dumps(dict(doc), indent=1, sort_keys=True) + "\n",
                     mode=0o644)
    except OSError as exc:
        raise StateError(f"cannot write {member_file(paths)}: {exc}") from exc


# -- the writer --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BeatResult:
    ok: bool
    seq: int
    attempts: int
    etag: str = ""
    error: str = ""


class Heartbeater:
    """Writes this member's record. ``beat()`` once per interval; ``leave()`` once, at the end.

    ``state_path``: state.json to mirror ``heartbeat``/``membership``/``health`` into
    (None: don't). ``member_path``: member.json, for seq across restarts.
    """

    def __init__(self, store: StoreAPI, record: MemberRecord, *, clock: Clock = SYSTEM_CLOCK,
                 interval_s: float = 10.0, sick_after: int = 3,
                 state_path: Path | None = None, member_path: Path | None = None,
                 backoff: Backoff = Backoff(), rng: random.Random | None = None,
                 health_fn: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.store = store
        self.record = record
        self.clock = clock
        self.interval_s = interval_s
        self.sick_after = sick_after
        self.state_path = state_path
        self.member_path = member_path
        self.backoff = backoff
        self.rng = rng or random.Random()
        self.health_fn = health_fn
        self.failures = 0
        self.observer_sick = False
        self.last_ok: float | None = None  # local wall clock: for humans only
        self.last_ok_mono: float | None = None
        self.last_error = ""
        self.etag = ""
        self.left = False
        # ``left`` changes in the daemon's main thread (leave, rejoin) while its heartbeat
        # thread checks it: one lock, held only around the flag and member.json (never
        # around a store call), so a rejoin cannot be undone by a beat that read the old
        # member.json (found by the suite under load: the member never came back).
        self._left_lock = threading.Lock()
        self.announced_state: str | None = None  # last state peers were told via the marker

    @property
    def key(self) -> str:
        return member_key(self.record.group, self.record.instance_id)

    def beat(self, *, state: str | None = None, health: Mapping[str, Any] | None = None,
             endpoint: str | None = None, budget_s: float | None = None) -> BeatResult:
        """Write the next record, retrying within ``budget_s`` (default 80 % of the interval)."""
        with self._left_lock:
            if self.left or self._left_elsewhere():
                self.left = True
                return BeatResult(False, self.record.seq, 0, error="left the group")
        if health is None and self.health_fn is not None:
            health = self.health_fn()
        changes: dict[str, Any] = {"observer_sick": self.observer_sick}
        if state is not None:
            changes["state"] = state
        if health is not None:
            changes["health"] = dict(health)
        if endpoint is not None:
            changes["endpoint"] = endpoint
        rec = self.record.heartbeat(**changes)
        budget = self.interval_s * 0.8 if budget_s is None else budget_s
        start = self.clock.monotonic()
        attempt = 0
        restarted = 0  # the attempt after which the budget and the backoff started again
        err = ""
        while True:
            attempt += 1
            sent = self.clock.monotonic()
            try:
                self.etag = self.store.put(self.key, rec.dumps(), content_type="application/json")
                break
            except StoreError as exc:
                err = str(exc)
                delay = self.backoff.delay(attempt - restarted, self.rng.random())
                if not restarted and self.clock.monotonic() - sent > budget:
                    # This attempt alone outlived the budget: the process was stopped
                    # (SIGSTOP, a long GC pause) or the call hung. The beat is overdue, not
                    # early: retry at once, with a fresh budget and backoff, rather than wait
                    # an interval (stall-zone seeds 85, 106: resumed, silent, acted on
                    # seconds later; 160: acted on 0.22 s after resuming, the retry's
                    # backoff of 0.8-1.6 s still to run). Once per beat: calls that keep
                    # hanging fail the beat, and count towards observer-sick.
                    start, restarted, delay = self.clock.monotonic(), attempt, 0.0
                if self.clock.monotonic() - start + delay > budget:
                    return self._failed(rec, attempt, err)
                if delay:
                    self.clock.sleep(delay)
        with self._left_lock:
            elsewhere = self._left_elsewhere()
            if elsewhere:
                self.left = True
        if elsewhere:
            # `ec2-agent leave` ran while this PUT was in flight and may have deleted the
            # record before it landed: take ours back (only if it is still ours), so a member
            # that left never comes back to life and later looks dead.
            try:
                self.store.delete(self.key, if_match=self.etag)
            except StoreError as exc:  # NotFound / PreconditionFailed: already gone or theirs
                log.info("left elsewhere; our late record: %s", exc)
            return BeatResult(False, rec.seq, attempt, error="left the group")
        self.record = rec
        self.failures = 0
        self.observer_sick = False
        self.last_ok = self.clock.time()
        self.last_ok_mono = self.clock.monotonic()
        self.last_error = ""
        if rec.state != self.announced_state:
            self._announce(rec)
        self._save()
        return BeatResult(True, rec.seq, attempt, self.etag)

    def _left_elsewhere(self) -> bool:
        """``ec2-agent leave`` ran in another process: never write the record again."""
        if self.member_path is None:
            return False
        try:
            doc = json.loads(self.member_path.read_text())
        except (OSError, ValueError):
            return False
        return bool(doc.get("left")) and doc.get("instance_id") == self.record.instance_id

    def _failed(self, rec: MemberRecord, attempts: int, err: str) -> BeatResult:
        # The seq is consumed even on failure: a later success must never reuse a body
        # (and an ETag) that might have landed after all.
        self.record = replace(self.record, seq=rec.seq)
        self.failures += 1
        self.last_error = err
        if self.failures >= self.sick_after and not self.observer_sick:
            log.warning("heartbeat failed %d times in a row: observer-sick (%s)",
                        self.failures, err)
            self.observer_sick = True
        self._save()
        return BeatResult(False, rec.seq, attempts, error=err)

    def _announce(self, rec: MemberRecord, state: str | None = None) -> None:
        try:
            bump_marker(self.store, rec.group, member_change(rec, state))
            self.announced_state = state or rec.state
        except StoreError as exc:  # peers still find out at their next LIST
            log.warning("could not bump the membership marker: %s", exc)

    def leave(self, reason: str = "leave", *, actor: str | None = None) -> bool:
        """Leave the group: record ``leaving``, delete it, bump the marker, append an event.

        Idempotent; returns whether the record is gone. A failing store is retried
        once per step; what could not be done is logged and left to the LIST-based
        cleanup of peers (a record that says ``leaving`` is never replaced).
        """
        from agent.group.events import append_event

        if self.left:
            return True
        rec = self.record.heartbeat(state="leaving")
        self.record = rec
        # Say "left" locally before touching the store: a daemon beat racing this leave
        # checks it after its own PUT and withdraws that record (see beat()).
        with self._left_lock:
            self.left = True
            self._save()
        deleted = False
        for _ in range(2):
            try:
                self.store.put(self.key, rec.dumps(), content_type="application/json")
                break
            except StoreError as exc:
                self.last_error = str(exc)
        for _ in range(2):
            try:
                self.store.delete(self.key)
                deleted = True
                break
            except NotFound:
                deleted = True
                break
            except StoreError as exc:
                self.last_error = str(exc)
        self.left = True
        self._announce(rec, "gone" if deleted else "leaving")
        try:
            append_event(self.store, rec.group, actor=actor or rec.instance_id, kind="leave",
                         member=rec.instance_id, reasons=[reason],
                         details={"record_deleted": deleted, "seq": rec.seq},
                         now=self.clock.time)
        except StoreError as exc:
            log.warning("could not record the leave event: %s", exc)
        self._save()
        return deleted

    def rejoin(self) -> None:
        """Undo a resumable leave (spot hibernate resumed, back InService): beat again.

        Only the agent's own departure logic calls this (agent.daemon.notices); the next
        ``beat()`` writes the record and announces it.
        """
        with self._left_lock:
            self.left = False
            self.announced_state = None
            self._save()

    def status_doc(self) -> dict[str, Any]:
        return {
            "heartbeat": {"seq": self.record.seq, "last_ok": self.last_ok,
                          "interval_s": self.interval_s, "failures": self.failures,
                          "observer_sick": self.observer_sick, "last_error": self.last_error,
                          "etag": self.etag, "key": self.key},
            "membership": {"state": self.record.state, "left": self.left,
                           "endpoint": self.record.endpoint},
            "health": dict(self.record.health),
        }

    def _save(self) -> None:
        if self.state_path is None and self.member_path is None:
            return  # nowhere to save (the simulator's members): no document to build
        doc = self.status_doc()
        if self.state_path is not None:
            try:
                statefile.update(self.state_path, lambda d: d.update(doc))
            except StateError as exc:
                log.warning("cannot update state: %s", exc)
        if self.member_path is not None:
            try:
                cur = json.loads(self.member_path.read_text()) if self.member_path.exists() else {}
                cur.update({"seq": self.record.seq, "state": self.record.state,
                            "left": self.left})
                from agent.host.files import atomic_write

                atomic_write(self.member_path, json.dumps(cur, indent=1, sort_keys=True) + "\n",
                             mode=0o644)
            except (OSError, ValueError) as exc:
                log.warning("cannot update %s: %s", self.member_path, exc)


# -- the boot phase ----------------------------------------------------------------------------

def record_for(ctx: BootContext, seq: int, state: str, health: Mapping[str, Any] | None = None,
               endpoint: str = "") -> MemberRecord:
    ident = ctx.ident
    return MemberRecord(
        instance_id=ident.instance_id, group=ctx.cfg.group, seq=seq, state=state,
        image_id=ident.ami_id or "", az=ident.availability_zone or "",
        private_ip=ident.local_ipv4 or "", launch_time=ident.pending_time or "",
        boot_id=ctx.boot_id, health=dict(health or {"status": "passing", "checks": {}}),
        agent_version=__version__, endpoint=endpoint, started=ctx.started_wall,
    )


def _known_seq(ctx: BootContext, store: StoreAPI, key: str) -> int:
    """The highest seq this instance ever wrote, so a reboot never rewrites an old body."""
    seqs = [int((ctx.previous.get("heartbeat") or {}).get("seq", 0) or 0)]
    try:
        doc = read_member_file(ctx.paths) or {}
        if doc.get("instance_id") == ctx.ident.instance_id:
            seqs.append(int(doc.get("seq", 0) or 0))
    except (StateError, ValueError, TypeError):
        pass
    rec = stored_record(store, key)
    if rec is not None:
        seqs.append(rec.seq)
    return max(seqs)


def stored_record(store: StoreAPI, key: str) -> MemberRecord | None:
    """The member record at ``key``; None when absent, unreadable or not a record."""
    try:
        obj = store.get_or_none(key)
        return MemberRecord.loads(obj.body) if obj is not None else None
    except (StoreError, ValueError):
        return None


def phase_register(ctx: BootContext) -> Done:
    """Boot phase ``register``: write the record ``booting``, then ``ready`` (or ``degraded``).

    Register is the last phase, so "the boot is done" is now: ready unless an earlier
    phase degraded. A store that refuses the write degrades the boot (the services
    run; peers will see us at the daemon's first beat) rather than failing it.
    """
    from agent.host.endpoint import advertised_url
    from agent.host.health import HealthChecker
    cfg = ctx.cfg
    group = cfg.group
    ident = ctx.ident
    joins, why = boot_joins_now(ctx)
    if not joins:  # warm pool / standby: the boot's work is done, but no record yet
        return _hold(ctx, why)
    if ctx.store is None:
        ctx = ctx.add(store=ctx.get_store())
    store = ctx.store
    assert store is not None
    key = member_key(group, ident.instance_id)
    seq = _known_seq(ctx, store, key)
    endpoint = ""
    if cfg.http.port and cfg.http.enabled:
        endpoint = advertised_url(cfg.http.bind, cfg.http.port, ident.local_ipv4 or "")
    try:
        checker = HealthChecker.from_config(cfg.health)
        health = checker.run() if ctx.deadline.remaining() > 10 else None
    except AgentError as exc:
        ctx = ctx.degrade(f"health checks: {exc}")
        health = None
    interval = float(cfg.heartbeat.interval_s)
    record = record_for(ctx, seq, "booting", health, endpoint)
    write_member_file(ctx.paths, {
        "instance_id": ident.instance_id, "group": group, "seq": seq,
        "bucket": cfg.store.bucket, "prefix": cfg.store.prefix,
        "region": cfg.store.region or ident.region,
        "state": "booting", "left": False,
    })
    hb = Heartbeater(store, record, clock=ctx.clock, interval_s=interval,
                     state_path=ctx.paths.state_file, member_path=member_file(ctx.paths))
    budget = min(interval, max(0.5, ctx.deadline.remaining() / 3))
    first = hb.beat(state="booting", budget_s=budget)
    if not first.ok:
        return Done(ctx.degrade(f"register: cannot write {key}: {first.error}"),
                    f"not registered (seq {first.seq})")
    final = "degraded" if ctx.degraded else "ready"
    done = hb.beat(state=final, budget_s=budget)
    if not done.ok:
        ctx = ctx.degrade(f"register: wrote booting but not {final}: {done.error}")
    ctx = ctx.add(state_updates={**ctx.state_updates, **hb.status_doc()})
    try:
        from agent.host import systemd

        systemd.ready(f"registered in {group} as {hb.record.state}")
    except Exception as exc:  # sd_notify is best effort by definition
        log.debug("sd_notify: %s", exc)
    return Done(ctx, f"{hb.record.state} in {group} as {ident.instance_id} "
                     f"(seq {hb.record.seq})")


def _hold(ctx: BootContext, why: str) -> Done:
    """Register without joining: member.json for ``run``, membership ``held`` in state."""
    cfg, ident = ctx.cfg, ctx.ident
    seq = int((ctx.previous.get("heartbeat") or {}).get("seq", 0) or 0)
    try:  # a member returned to the warm pool keeps its seq: no body is ever rewritten
        doc = read_member_file(ctx.paths) or {}
        if doc.get("instance_id") == ident.instance_id:
            seq = max(seq, int(doc.get("seq", 0) or 0))
    except (StateError, ValueError, TypeError):
        pass
    write_member_file(ctx.paths, {
        "instance_id": ident.instance_id, "group": cfg.group, "seq": seq,
        "bucket": cfg.store.bucket, "prefix": cfg.store.prefix,
        "region": cfg.store.region or ident.region,
        "state": "held", "left": False,
    })
    held = {"membership": {"state": "held", "reason": why, "left": False}}
    return Done(ctx.add(state_updates={**ctx.state_updates, **held}), f"held: {why}")


# -- for the command line ---------------------------------------------------------------------

def member_store(paths: Any) -> tuple[Any, dict[str, Any]]:
    """The store and member doc that ``register`` recorded; for ``leave``/``peers``/``events``."""
    from agent.aws.store import Store

    doc = read_member_file(paths)
    if not doc or not doc.get("bucket") or not doc.get("group"):
        raise StateError(f"{member_file(paths)} is missing: this instance has not registered "
                         f"(run 'ec2-agent boot' first)")
    return Store(doc["bucket"], doc.get("prefix") or "", region=doc.get("region")), doc


def leave_group(paths: Any, reason: str = "ec2-agent leave", *,
                clock: Clock = SYSTEM_CLOCK) -> bool:
    """``ec2-agent leave``: the same as the daemon's SIGTERM path, from another process.

    Final: member.json gets ``final: true``, so a daemon that had left resumably (spot
    stop/hibernate, standby) does not rejoin when the notice clears.
    """
    store, doc = member_store(paths)
    if doc.get("left"):
        if not doc.get("final"):
            write_member_file(paths, dict(doc, final=True))
        return True
    key = member_key(doc["group"], doc["instance_id"])
    rec = stored_record(store, key)
    if rec is None:
        rec = MemberRecord(instance_id=doc["instance_id"], group=doc["group"],
                           seq=int(doc.get("seq", 0) or 0))
    rec = replace(rec, seq=max(rec.seq, int(doc.get("seq", 0) or 0)))
    hb = Heartbeater(store, rec, clock=clock, state_path=paths.state_file,
                     member_path=member_file(paths))
    gone = hb.leave(reason)
    write_member_file(paths, dict(read_member_file(paths) or doc, final=True))
    return gone
