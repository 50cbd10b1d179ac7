"""What the cloud says about a replacement whose actor vanished. Pure.

Invariant 1 says one death gets one replacement. Two things stand in its way when the
observer that holds a lease stops half-way (crash, SIGSTOP, a RunInstances whose
response was lost):

* the lease is left ``acting``: the call may or may not have happened, so nobody
  else may simply act again;
* another observer that takes the lease over must not launch a second instance.

The token of a death (``death_token``) is derived from the lease key and the
*first* generation of the lease (its nonce), and every takeover keeps it, so every
launch for one death sends the same RunInstances ``ClientToken`` (EC2 returns the
first instance again) and tags the instance with it (``TOKEN_TAG``), so anyone can
find what was launched (``launched_for``).

``resolve_acting`` is the rule for an ``acting`` lease older than a bound: look at
the cloud, and either record the action that happened (``acted``), hand the death
back so it can be taken over with the same token (``retry``), keep waiting
(``wait``: too young, the API failed, the member heartbeats again), or leave it to an
operator (``operator``: a hook, which the cloud cannot see).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from agent.heal.decide import lease_token
from agent.interfaces import Replacement

GONE = frozenset({"terminated", "shutting-down"})
ALIVE_STATES = frozenset({"pending", "running"})


def death_token(group: str, member_id: str, first_nonce: str) -> str:
    """The RunInstances ClientToken for one death (<= 64 ASCII, ``lease_token``).

    ``first_nonce`` is the nonce of the lease generation that was created first for
    this death; takeovers keep it, so every observer that acts on this death sends
    the same token. A lease removed because its member heartbeated again ends the
    death: the next one creates a new lease, a new nonce, a new token.
    """
    return lease_token(group, member_id, first_nonce)


def launched_for(token: str, found: Iterable[Replacement]) -> str | None:
    """The instance launched with ``token`` (a live one first), or None."""
    mine = sorted((r for r in found if token and r.token == token),
                  key=lambda r: (r.state not in ALIVE_STATES, r.instance_id))
    return mine[0].instance_id if mine else None


def newer_member(member_id: str, found: Iterable[Replacement]) -> str | None:
    """A pending/running instance whose REPLACES tag names ``member_id``, or None."""
    alive = sorted(r.instance_id for r in found
                   if r.replaces == member_id and r.state in ALIVE_STATES
                   and r.instance_id != member_id)
    return alive[0] if alive else None


def asg_replacement(launched: Iterable[tuple[float, str]], since: float, others: int,
                    beating: Collection[str], settle: bool) -> str:
    """The ASG's replacement for an action, among the instances new to its group since
    the action's snapshot and no other lease's, each ``(LaunchTime, id)``; "" for now.

    ``others``: members that left the group since that snapshot, no lease's: the group
    owes each of them a launch too, in an order AWS does not keep (it launches soon after
    TerminateInstanceInAutoScalingGroup, but notices an instance EC2 ended at a later
    health check). With none owed, the earliest launched at or after ``since``. With
    some (less those launched before ``since``), the launches since cannot be told apart:
    one is adopted, the latest launched of those that heartbeat (``beating``), once
    more heartbeat than the others are owed, or once ``settle`` (the deadline passed) and
    any does. Stall-zone seed 85: the control plane ended 0f, its replacement came 1 s
    before the action's terminate landed; adopted as the action's, it closed the lease
    while the real one still booted and the group went over its in-flight cap.
    """
    ordered = sorted(launched)
    fresh = [iid for t, iid in ordered if t >= since]
    owed = max(0, others - (len(ordered) - len(fresh)))
    if owed == 0:
        return fresh[0] if fresh else ""
    up = [iid for iid in fresh if iid in beating]
    return up[-1] if len(up) > owed or (settle and up) else ""


@dataclass(frozen=True)
class CloudSays:
    """What the cloud and the group say about an acting lease's member right now.

    ``launched``: the instance carrying the lease's token (None: none). ``member_ec2``:
    EC2's state of the dead member (None: not known). ``in_asg``: does its Auto
    Scaling group still list it (None: not asked / not an ASG member).
    ``asg_health``: what the ASG says of it. ``member_alive``: this observer's verdict
    on it is ``alive`` (it heartbeats again). ``api_error``: a call failed.
    """

    launched: str | None = None
    member_ec2: str | None = None
    in_asg: bool | None = None
    asg_health: str | None = None
    member_alive: bool = False
    api_error: str = ""


@dataclass(frozen=True)
class Resolution:
    """``observe`` | ``wait`` | ``acted`` | ``retry`` | ``operator``, with reasons.

    ``acted``: ``replacement`` (may be "" for an ASG action: the ASG launches it) and
    whether the dead member still has to be terminated (``terminate``).
    """

    verdict: str
    reasons: tuple[str, ...]
    replacement: str = ""
    terminate: bool = False


def resolve_acting(action: str, age_s: float | None, bound_s: float,
                   says: CloudSays | None, *, call_over_s: float) -> Resolution:
    """The rule for an ``acting`` lease (its holder fenced and was about to call the cloud).

    Younger than ``bound_s`` (store clock): ``wait`` (the holder may still be
    calling). Older and nothing observed yet (``says`` None): ``observe``. Then: an
    API error or a member that heartbeats again → ``wait`` (never act on an API
    error; a live member is never marked replaced, its lease is cleared later);
    ``hook`` → ``operator`` (no cloud answer can say whether a hook ran);
    ``launch``: an instance carrying the token → ``acted`` (terminate the member
    unless EC2 says it is gone), none → ``retry`` with the same token (EC2 returns
    the first instance if the lost call lands after all); ASG actions: the member is
    terminated/shutting-down or no longer listed by its ASG (or ``asg-mark`` and the
    ASG says Unhealthy) → ``acted`` (its ASG replaces it); otherwise ``retry``.

    ``retry`` (nothing happened: the in-flight slot is given back) waits until the lease
    is ``call_over_s`` old, past which no call sent under it can still land (the age an
    ``acting`` lease is cleared at, invariant 13); until then what is not seen yet may be
    in transit. Partitions seed 5014 (N = 19): a terminate sent 2 s after the ``acting``
    write spent 120 s in transit; resolved ``refused`` at 120.5 s, its slot went to
    another death, and the terminate landed 1 s later: two replacements in flight, cap 1.
    """
    if age_s is None or age_s < bound_s:
        shown = "unknown" if age_s is None else f"{age_s:.0f}s"
        return Resolution("wait", (f"acting for {shown} < {bound_s:g}s: its holder may "
                                   "still be calling",))
    if action == "hook":
        return Resolution("operator", (
            f"stuck-acting: the hook's holder vanished {age_s:.0f}s ago and no cloud "
            "answer can say whether the hook ran: an operator decides (delete the lease "
            "to retry, or leave it)",))
    if says is None:
        return Resolution("observe", (f"acting for {age_s:.0f}s >= {bound_s:g}s",))
    if says.api_error:
        return Resolution("wait", (f"api-failing: {says.api_error[:200]}: never resolve "
                                   "on an API error",))
    if says.member_alive:
        return Resolution("wait", ("alive: the member heartbeats again; never marked "
                                   "replaced (its lease is cleared once its call is over)",))
    if action == "launch":
        if says.launched:
            return Resolution(
                "acted", (f"launched: {says.launched} carries this death's token: the "
                          "lost launch happened",),
                replacement=says.launched, terminate=says.member_ec2 not in GONE)
        if age_s < call_over_s:
            return _in_transit(age_s, call_over_s, "no instance carries this death's token")
        return Resolution("retry", ("nothing-launched: no instance carries this death's "
                                    "token; taken over with the same token",))
    if action in ("asg-terminate", "asg-mark"):
        if says.member_ec2 in GONE or says.in_asg is False:
            where = (f"ec2 says {says.member_ec2}" if says.member_ec2 in GONE
                     else "its ASG no longer lists it")
            return Resolution("acted", (f"asg-replaces: {where}: the ASG replaces it",))
        if action == "asg-mark" and says.asg_health == "Unhealthy":
            return Resolution("acted", ("asg-replaces: the ASG says Unhealthy: the mark "
                                        "happened",))
        seen = f"ec2 says {says.member_ec2 or 'unknown'} and its ASG still lists it"
        if age_s < call_over_s:
            return _in_transit(age_s, call_over_s, seen)
        return Resolution("retry", (f"not-done: {seen}; taken over",))
    return Resolution("operator", (f"stuck-acting: unknown action {action!r}",))


def _in_transit(age_s: float, call_over_s: float, seen: str) -> Resolution:
    return Resolution("wait", (f"in-transit: {seen} after {age_s:.0f}s, but a call sent "
                               f"under this lease may land until {call_over_s:g}s: its "
                               "in-flight slot stays taken",))
