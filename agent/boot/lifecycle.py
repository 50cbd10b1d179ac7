"""Auto Scaling launch lifecycle hooks: tell the group how the boot ended.

With a launch hook on the group, a new instance waits in ``Pending:Wait`` until
someone completes the action or the hook's heartbeat timeout applies its
default result. The boot is the one who knows whether the instance can serve,
so at the end of ``ec2-agent boot`` it answers: ``CONTINUE`` after a done or
degraded boot (services run, possibly on last-known-good config), ``ABANDON``
after a failed one (the group terminates it and launches another). Without an
answer the group would wait out the whole timeout and then guess.

The decision (``plan``) is pure; ``complete_lifecycle`` is the thin shell that
asks the cloud and records the outcome in ``state.json`` under ``lifecycle``. A
failure to answer never turns a boot into an error: the instance may well be
serving; it is recorded and makes a done boot ``degraded`` so a human sees it.

Which group: the ``aws:autoscaling:groupName`` tag, which Auto Scaling puts on
its instances and IMDS shows when instance tags are allowed in metadata. Tags
in metadata are off by default, so without the tag the agent asks
``DescribeAutoScalingInstances`` (granted by the shipped IAM policy) once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from agent.bootctx import BootContext
from agent.interfaces import CloudAPI

if TYPE_CHECKING:
    from agent.config.model import Config

ASG_TAG = "aws:autoscaling:groupName"


@dataclass(frozen=True)
class LifecyclePlan:
    """What to do: ``complete`` with ``result``, or ``skip`` with the reason why."""

    action: str  # "complete" | "skip"
    reason: str
    hook: str | None = None
    asg: str | None = None
    instance_id: str | None = None
    result: str | None = None  # CONTINUE | ABANDON


def hook_name(config: Config | None,
              layers: tuple[Mapping[str, Any] | None, ...] = ()) -> str | None:
    """``boot.lifecycle_hook`` from the validated config, else from the raw layers.

    A boot that failed in its config phase has no validated config, and exactly
    that boot must still ABANDON, so the raw user-data and baked layers are read
    too (later layers win, as in the merge).
    """
    if config is not None:
        return config.boot.lifecycle_hook
    name = None
    for layer in layers:
        boot = layer.get("boot") if isinstance(layer, Mapping) else None
        value = boot.get("lifecycle_hook") if isinstance(boot, Mapping) else None
        if isinstance(value, str) and value:
            name = value
    return name


def plan(*, hook: str | None, status: str, instance_id: str | None, boot_kind: str,
         asg: str | None, previous: Mapping[str, Any] | None = None,
         entering_service: bool = False) -> LifecyclePlan:
    """Pure: whether and how to complete the launch action for a boot that ended ``status``.

    ``entering_service``: the instance was held in a warm pool (agent.departure) and now
    joins: Auto Scaling runs the launch hook again for an instance leaving the warm pool,
    so it is answered again, on a reboot (Warmed:Stopped) or in the daemon (Warmed:Running).
    """
    if not hook:
        return LifecyclePlan("skip", "no boot.lifecycle_hook configured")
    if not instance_id:
        return LifecyclePlan("skip", "instance id unknown (identity phase failed)", hook)
    prev = previous or {}
    if entering_service:
        if not asg:
            return LifecyclePlan("skip", f"no Auto Scaling group known: no {ASG_TAG} tag and "
                                 "not in any group", hook, None, instance_id)
        result = "ABANDON" if status == "error" else "CONTINUE"
        return LifecyclePlan("complete", f"leaving the warm pool: boot {status}", hook, asg,
                             instance_id, result)
    if prev.get("completed") and prev.get("instance_id") == instance_id:
        return LifecyclePlan("skip", f"already completed with {prev.get('result')} "
                             f"for {instance_id}", hook, prev.get("asg"), instance_id,
                             prev.get("result"))
    if boot_kind == "reboot":
        return LifecyclePlan("skip", "reboot: a launch hook is only pending at launch",
                             hook, asg, instance_id)
    if not asg:
        return LifecyclePlan("skip", f"no Auto Scaling group known: no {ASG_TAG} tag and "
                             "not in any group", hook, None, instance_id)
    result = "ABANDON" if status == "error" else "CONTINUE"
    return LifecyclePlan("complete", f"boot {status}", hook, asg, instance_id, result)


def _asg_name(ctx: BootContext, cloud: CloudAPI) -> tuple[str | None, str]:
    """The group from the tag, else from DescribeAutoScalingInstances; and any error."""
    ident = ctx.ident
    if ident.tags.get(ASG_TAG):
        return str(ident.tags[ASG_TAG]), ""
    from agent.errors import AgentError

    try:
        found = cloud.asg_instances([ident.instance_id]).get(ident.instance_id)
    except AgentError as exc:
        return None, str(exc)
    return (found.group if found else None), ""


def entering_service(previous: Mapping[str, Any] | None, st: Mapping[str, Any]) -> bool:
    """The last boot held the instance (warm pool) and this one joined. Pure."""
    was = ((previous or {}).get("membership") or {}).get("state")
    now = (st.get("membership") or {}).get("state")
    return was == "held" and now != "held"


def complete_lifecycle(ctx: BootContext, st: dict[str, Any], *, cloud: CloudAPI | None = None,
                       entering: bool | None = None) -> dict[str, Any]:
    """Complete the launch action for this boot's final ``st["status"]``; record it.

    Sets ``st["lifecycle"]``; on a failed call adds a ``degraded`` reason and turns
    ``done`` into ``degraded``. Never raises: the boot's state must be saved whatever
    happens here.
    """
    try:
        if entering is None:
            entering = entering_service(ctx.previous, st)
        return _complete(ctx, st, cloud, entering)
    except Exception as exc:  # a bug here must not cost the boot its honest state
        rec = {"action": "complete", "completed": False,
               "error": f"internal error: {type(exc).__name__}: {exc}"}
        st["lifecycle"] = rec
        _degrade(st, f"lifecycle hook: {rec['error']}")
        return rec


def _complete(ctx: BootContext, st: dict[str, Any], cloud: CloudAPI | None,
              entering: bool) -> dict[str, Any]:
    hook = hook_name(ctx.config, (ctx.baked_config, ctx.user_config))
    ident = ctx.identity
    instance_id = ident.instance_id if ident is not None else None
    prev = ctx.previous.get("lifecycle")
    asg: str | None = None
    lookup_error = ""
    if hook and instance_id and (entering or (ctx.boot_kind != "reboot" and not (
            prev and prev.get("completed") and prev.get("instance_id") == instance_id))):
        if cloud is None:
            from agent.aws.cloud import Cloud

            cloud = Cloud(ident.region if ident is not None else None)
        asg, lookup_error = _asg_name(ctx, cloud)
    p = plan(hook=hook, status=st.get("status", "error"), instance_id=instance_id,
             boot_kind=ctx.boot_kind, asg=asg, previous=prev, entering_service=entering)
    rec: dict[str, Any] = {k: v for k, v in asdict(p).items() if k != "action"}
    rec.update(action=p.action, completed=False, at=ctx.clock.time())
    if p.action == "skip" and prev and prev.get("completed") and not entering:
        rec = dict(prev, reason=p.reason)  # keep the original record visible
    elif p.action == "skip" and lookup_error:
        rec["error"] = f"cannot tell the Auto Scaling group: {lookup_error}"
        _degrade(st, f"lifecycle hook {hook}: {rec['error']}")
    elif p.action == "complete":
        from agent.errors import AgentError

        try:
            cloud.complete_lifecycle_action(p.asg, p.hook, p.instance_id, p.result)
        except AgentError as exc:
            rec["error"] = str(exc)
            _degrade(st, f"lifecycle hook {p.hook}: {p.result} not delivered: {exc}")
        else:
            rec["completed"] = True
    st["lifecycle"] = rec
    return rec


def _degrade(st: dict[str, Any], reason: str) -> None:
    st.setdefault("degraded", []).append(reason)
    if st.get("status") == "done":
        st["status"] = "degraded"
