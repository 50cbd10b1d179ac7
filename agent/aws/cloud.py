"""EC2 and Auto Scaling: the few calls safe replacement needs, behind one small class.

Every botocore failure is mapped here to ``CloudError`` (chained ``from exc``) and
an API error is never evidence that an instance is dead: ``states_or_none`` turns a
failed describe into ``None`` for every id asked ("unknown"), which the heal
decision refuses to act on. ``InvalidInstanceID.NotFound`` is EC2's own answer
about an id (terminated instances disappear from DescribeInstances after about an
hour); ``states`` reads it as ``terminated``, but the heal controller uses
``instances``, which leaves such ids out, and believes "not found" only once it
persists (``agent.heal.decide.not_found_belief``, invariant 14); a malformed id is an error.

Launch is *before* terminate, and idempotent: ``launch`` sends a ``ClientToken``
(``agent.heal.decide.lease_token``, ≤ 64 ASCII) and the dead instance's own subnet, so a
retry with the same lease asks EC2 for the same thing and gets the same instance
(real EC2; moto does not honour ClientToken, see tests/integration/test_cloud.py). The
token is also a tag (``TOKEN_TAG``, beside ``REPLACES_TAG``): ``replacements`` finds what
was launched for a member, so an observer that takes over a death adopts the instance
instead of asking again (agent.heal.resolve).
The launch spec is the instance's (or its ASG's) launch template when there is
one, else a clone of the dead instance: image, type, subnet, security groups,
user-data (``DescribeInstanceAttribute userData``), key, instance profile, tags.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from typing import Any

from agent.aws import errors as awserrors
from agent.errors import CloudError
from agent.interfaces import (
    MAX_TOKEN,
    REPLACES_TAG,
    TOKEN_TAG,
    AsgInstance,
    CloudAPI,
    InstanceInfo,
    LaunchSpec,
    Replacement,
)

__all__ = ["MAX_TOKEN", "REPLACES_TAG", "TOKEN_TAG", "AsgInstance", "Cloud", "CloudAPI",
           "LaunchSpec", "Replacement"]

log = logging.getLogger(__name__)

_NOT_FOUND = ("InvalidInstanceID.NotFound",)
_DESCRIBE_CHUNK = 100


def _fail(what: str, exc: BaseException) -> CloudError:
    return CloudError(f"{what}: {awserrors.describe(exc)}: {exc}")


class Cloud:
    """EC2 + Auto Scaling for one region. Clients are injectable (tests, other endpoints)."""

    def __init__(self, region: str | None = None, *, ec2: Any = None,
                 autoscaling: Any = None) -> None:
        self.region = region
        self._ec2 = ec2
        self._asg = autoscaling

    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            from agent.aws.session import client

            self._ec2 = client("ec2", self.region)
        return self._ec2

    @property
    def autoscaling(self) -> Any:
        if self._asg is None:
            from agent.aws.session import client

            self._asg = client("autoscaling", self.region)
        return self._asg

    # -- describe -------------------------------------------------------------------------------
    def describe(self, instance_id: str) -> dict[str, Any] | None:
        """The DescribeInstances entry, or None when EC2 says no such instance."""
        try:
            resp = self.ec2.describe_instances(InstanceIds=[instance_id])
        except awserrors.AWS_ERRORS as exc:
            if awserrors.error_code(exc) in _NOT_FOUND:
                return None
            raise _fail(f"describe {instance_id}", exc) from exc
        for r in resp.get("Reservations", []):
            for i in r.get("Instances", []):
                if i.get("InstanceId") == instance_id:
                    return i
        return None

    def states(self, instance_ids: Iterable[str]) -> dict[str, str]:
        """EC2 state name per id; raises ``CloudError`` when the API fails.

        Ids EC2 does not know (long terminated) read as ``terminated``: the heal
        controller uses ``instances`` instead, which leaves them out.
        """
        ids = sorted(set(instance_ids))
        known = self.instances(ids)
        return {iid: known[iid].state if iid in known else "terminated" for iid in ids}

    def instances(self, instance_ids: Iterable[str]) -> dict[str, InstanceInfo]:
        """What EC2 says about each id it knows; ids it does not know are left out.

        Raises ``CloudError`` when the API fails. Absence is not death: the caller
        decides what a missing id is worth.
        """
        ids = sorted(set(instance_ids))
        out: dict[str, InstanceInfo] = {}
        for i in range(0, len(ids), _DESCRIBE_CHUNK):
            chunk = ids[i:i + _DESCRIBE_CHUNK]
            try:
                resp = self.ec2.describe_instances(InstanceIds=chunk)
            except awserrors.AWS_ERRORS as exc:
                if awserrors.error_code(exc) in _NOT_FOUND and len(chunk) > 1:
                    # One unknown id fails the whole call: ask one by one.
                    for iid in chunk:
                        out.update(self.instances([iid]))
                    continue
                if awserrors.error_code(exc) in _NOT_FOUND:
                    continue
                raise _fail("describe instances", exc) from exc
            for r in resp.get("Reservations", []):
                for inst in r.get("Instances", []):
                    tags = {t["Key"]: t["Value"] for t in inst.get("Tags", []) or []}
                    lt = inst.get("LaunchTime")
                    out[inst["InstanceId"]] = InstanceInfo(
                        inst["InstanceId"], inst["State"]["Name"],
                        str((inst.get("Placement") or {}).get("AvailabilityZone", "")),
                        tags.get("aws:autoscaling:groupName", ""),
                        lt.timestamp() if hasattr(lt, "timestamp") else None)
        return out

    def replacements(self, member_ids: Iterable[str]) -> list[Replacement]:
        """Instances whose ``REPLACES_TAG`` names one of ``member_ids`` (a tag filter).

        The token is EC2's ``ClientToken`` for the instance, else its ``TOKEN_TAG``.
        Raises ``CloudError`` when the API fails.
        """
        ids = sorted(set(member_ids))
        out: list[Replacement] = []
        for i in range(0, len(ids), 200):  # the API's limit of values per filter
            kw: dict[str, Any] = {"Filters": [{"Name": f"tag:{REPLACES_TAG}",
                                               "Values": ids[i:i + 200]}]}
            while True:
                try:
                    resp = self.ec2.describe_instances(**kw)
                except awserrors.AWS_ERRORS as exc:
                    raise _fail("describe replacement instances", exc) from exc
                for r in resp.get("Reservations", []):
                    for inst in r.get("Instances", []):
                        tags = {t["Key"]: t["Value"] for t in inst.get("Tags", []) or []}
                        out.append(Replacement(
                            inst["InstanceId"], tags.get(REPLACES_TAG, ""), inst["State"]["Name"],
                            str(inst.get("ClientToken") or tags.get(TOKEN_TAG, ""))))
                if not resp.get("NextToken"):
                    break
                kw["NextToken"] = resp["NextToken"]
        return out

    def states_or_none(self, instance_ids: Iterable[str]) -> tuple[dict[str, str | None], str]:
        """``(states, error)``: on an API failure every state is None and error says why."""
        ids = list(instance_ids)
        try:
            return dict(self.states(ids)), ""
        except CloudError as exc:
            return {i: None for i in ids}, str(exc)

    def asg_instances(self, instance_ids: Iterable[str]) -> dict[str, AsgInstance]:
        """The ids that belong to an Auto Scaling group, as the group sees them."""
        ids = sorted(set(instance_ids))
        out: dict[str, AsgInstance] = {}
        for i in range(0, len(ids), 50):  # the API's limit per call
            try:
                resp = self.autoscaling.describe_auto_scaling_instances(InstanceIds=ids[i:i + 50])
            except awserrors.AWS_ERRORS as exc:
                raise _fail("describe auto scaling instances", exc) from exc
            for a in resp.get("AutoScalingInstances", []):
                out[a["InstanceId"]] = AsgInstance(
                    a["InstanceId"], a["AutoScalingGroupName"], a.get("HealthStatus", ""),
                    a.get("LifecycleState", ""), a.get("LaunchTemplate"))
        return out

    def asg_group(self, name: str) -> dict[str, Any] | None:
        try:
            resp = self.autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
        except awserrors.AWS_ERRORS as exc:
            raise _fail(f"describe auto scaling group {name}", exc) from exc
        groups = resp.get("AutoScalingGroups", [])
        return groups[0] if groups else None

    def asg_grace_left(self, name: str, launch_time: float | None, now: float) -> float:
        """Seconds of the group's HealthCheckGracePeriod left for an instance (0: none).

        Inside it AWS ignores ``SetInstanceHealth`` with ``ShouldRespectGracePeriod``.
        """
        g = self.asg_group(name)
        grace = float((g or {}).get("HealthCheckGracePeriod") or 0)
        if launch_time is None:
            return grace
        return max(0.0, launch_time + grace - now)

    def asg_member_ids(self, name: str) -> list[str]:
        g = self.asg_group(name)
        return sorted(i["InstanceId"] for i in (g or {}).get("Instances", []))

    # -- act ------------------------------------------------------------------------------------
    def set_unhealthy(self, instance_id: str, *, respect_grace: bool = True) -> None:
        """Mark it Unhealthy; the ASG then replaces it under its own throttles.

        ``ShouldRespectGracePeriod``: within the group's HealthCheckGracePeriod after
        launch AWS ignores the mark, so a booting replacement is never marked.
        """
        try:
            self.autoscaling.set_instance_health(
                InstanceId=instance_id, HealthStatus="Unhealthy",
                ShouldRespectGracePeriod=respect_grace)
        except awserrors.AWS_ERRORS as exc:
            raise _fail(f"set_instance_health {instance_id}", exc) from exc

    def asg_terminate(self, instance_id: str) -> str:
        """Terminate through the ASG without decrementing capacity (it launches a new one)."""
        try:
            resp = self.autoscaling.terminate_instance_in_auto_scaling_group(
                InstanceId=instance_id, ShouldDecrementDesiredCapacity=False)
        except awserrors.AWS_ERRORS as exc:
            raise _fail(f"terminate_instance_in_auto_scaling_group {instance_id}", exc) from exc
        return str((resp.get("Activity") or {}).get("ActivityId", ""))

    def terminate(self, instance_id: str) -> str:
        """Plain TerminateInstances (standalone groups, after the replacement launched)."""
        try:
            resp = self.ec2.terminate_instances(InstanceIds=[instance_id])
        except awserrors.AWS_ERRORS as exc:
            if awserrors.error_code(exc) in _NOT_FOUND:
                return "terminated"
            raise _fail(f"terminate {instance_id}", exc) from exc
        for t in resp.get("TerminatingInstances", []):
            if t.get("InstanceId") == instance_id:
                return str(t.get("CurrentState", {}).get("Name", ""))
        return ""

    def launch_spec(self, instance_id: str) -> LaunchSpec:
        """How to launch a replacement of ``instance_id`` (which must still be describable).

        Its launch template (the ``aws:ec2launchtemplate:*`` tags EC2 puts on every
        instance launched from one, else its ASG's) with its own subnet; otherwise a
        clone of its image, type, subnet, security groups, user-data, key, profile, tags.
        """
        inst = self.describe(instance_id)
        if inst is None:
            raise CloudError(f"cannot build a launch spec: EC2 no longer knows {instance_id}")
        tags = tuple((t["Key"], t["Value"]) for t in inst.get("Tags", []) or [])
        tagmap = dict(tags)
        subnet = str(inst.get("SubnetId") or "")
        lt: dict[str, str] | None = None
        if tagmap.get("aws:ec2launchtemplate:id"):
            lt = {"LaunchTemplateId": tagmap["aws:ec2launchtemplate:id"],
                  "Version": tagmap.get("aws:ec2launchtemplate:version") or "$Default"}
        else:
            asg = self.asg_instances([instance_id]).get(instance_id)
            if asg is not None and asg.launch_template:
                src = asg.launch_template
                lt = {k: str(src[k]) for k in ("LaunchTemplateId", "Version") if src.get(k)}
        if lt:
            # The template's own tags apply; the instance's non-aws: tags are kept too.
            return LaunchSpec("launch-template", subnet, launch_template=lt, tags=tags)
        return LaunchSpec(
            "clone", subnet,
            image_id=str(inst.get("ImageId", "")),
            instance_type=str(inst.get("InstanceType", "")),
            security_group_ids=tuple(g["GroupId"] for g in inst.get("SecurityGroups", []) or []),
            user_data=self.user_data(instance_id),
            key_name=str(inst.get("KeyName") or ""),
            iam_instance_profile_arn=str((inst.get("IamInstanceProfile") or {}).get("Arn", "")),
            tags=tags,
        )

    def user_data(self, instance_id: str) -> bytes | None:
        try:
            resp = self.ec2.describe_instance_attribute(InstanceId=instance_id,
                                                        Attribute="userData")
        except awserrors.AWS_ERRORS as exc:
            raise _fail(f"describe user-data of {instance_id}", exc) from exc
        value = (resp.get("UserData") or {}).get("Value")
        return base64.b64decode(value) if value else None

    def launch(self, spec: LaunchSpec, client_token: str, *, replaces: str = "") -> str:
        """RunInstances once (boto3 retries reuse the same ClientToken); the new id."""
        kw = spec.run_instances_kwargs(client_token, replaces)
        try:
            resp = self.ec2.run_instances(**kw)
        except awserrors.AWS_ERRORS as exc:
            raise _fail(f"run_instances replacing {replaces or '?'}", exc) from exc
        return str(resp["Instances"][0]["InstanceId"])

    def complete_lifecycle_action(self, asg_name: str, hook_name: str, instance_id: str,
                                  result: str, *, token: str | None = None) -> None:
        """Tell the ASG the boot finished: CONTINUE (in service) or ABANDON (replace me)."""
        if result not in ("CONTINUE", "ABANDON"):
            raise ValueError(f"lifecycle result must be CONTINUE or ABANDON, got {result!r}")
        kw: dict[str, Any] = {"AutoScalingGroupName": asg_name, "LifecycleHookName": hook_name,
                              "LifecycleActionResult": result, "InstanceId": instance_id}
        if token:
            kw["LifecycleActionToken"] = token
        try:
            self.autoscaling.complete_lifecycle_action(**kw)
        except awserrors.AWS_ERRORS as exc:
            raise _fail(f"complete_lifecycle_action {hook_name} {instance_id}", exc) from exc
