"""In-memory twins of S3, EC2 and Auto Scaling, behind boto3's own client interface.

The twins stand in for the *boto3 clients*, not for ``agent.aws.store.Store`` or
``agent.aws.cloud.Cloud``: the simulator hands ``Store(client=S3Twin.client())`` and
``Cloud(ec2=..., autoscaling=...)`` to the real code, so the adapters' own logic
(error mapping, the ``Date`` header, ``InvalidInstanceID.NotFound`` handling,
pagination) runs in the simulation too. Errors are botocore's ``ClientError``
with the same codes and HTTP statuses moto answers; tests/integration/
test_twins_contract.py runs one set of cases against moto and against these
twins, so a twin that drifts from moto fails.

Time is injected (``now()``: the true time of the simulated world, seconds since
the epoch). ``LastModified`` and ``Date`` have S3's one-second resolution.

Faithful where it matters to replacement safety:

* S3: strong read-after-write; ``IfNoneMatch: "*"`` / ``IfMatch`` on PUT and
  ``IfMatch`` on DELETE (412 PreconditionFailed; If-Match on a missing key 404);
  ``IfNoneMatch: <etag>`` on GET (304); LIST in UTF-8 byte order with ``MaxKeys``
  pages and continuation tokens.
* EC2: ``pending`` → ``running`` after ``boot_s``; ``shutting-down`` →
  ``terminated`` after ``shutdown_s``; terminated instances stay describable for
  ``forget_s`` then ``InvalidInstanceID.NotFound``; ``ClientToken`` idempotency
  (real EC2's; moto ignores it).
* Auto Scaling: groups with a desired capacity; ``SetInstanceHealth`` (respecting
  ``HealthCheckGracePeriod`` when asked); ``TerminateInstanceInAutoScalingGroup``;
  ``reconcile()`` — what the service does on its own — removes terminated and
  Unhealthy instances and launches replacements up to the desired capacity.
* Lifecycle hooks (``PutLifecycleHook``, ``DescribeLifecycleHooks``,
  ``DeleteLifecycleHook``, ``CompleteLifecycleAction``,
  ``RecordLifecycleActionHeartbeat``), as AWS documents them: with a launch hook a
  new instance waits in ``Pending:Wait`` (EC2 runs it) until CONTINUE (``InService``)
  or ABANDON (terminated, the group launches another); with a terminate hook an
  instance the group terminates waits in ``Terminating:Wait``, still running, until
  either result; an action not completed within ``HeartbeatTimeout`` takes the hook's
  ``DefaultResult``; a completion that matches no waiting action is a
  ``ValidationError``. moto 5 stores and describes hooks but never waits on them and
  answers CompleteLifecycleAction with HTTP 500 (test_twins_contract.py says which
  cases both run). Simplified: hooks given at CreateAutoScalingGroup, notification
  targets, and the terminate hooks of an instance whose launch was abandoned.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

from botocore.exceptions import ClientError

_UTC = timezone.utc


def _date_header(t: int) -> str:
    return formatdate(t, usegmt=True)


def _error(code: str, status: int, message: str, op: str, date: str = "") -> ClientError:
    headers = {"date": date} if date else {}
    return ClientError({"Error": {"Code": code, "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": headers}},
                       op)


class _Body:
    __slots__ = ("_b",)

    def __init__(self, b: bytes) -> None:
        self._b = b

    def read(self, n: int = -1) -> bytes:
        b = self._b
        self._b = b""
        return b


@dataclass(slots=True)
class _S3Object:
    body: bytes
    etag: str
    modified: int  # whole seconds, store clock
    content_type: str = "application/octet-stream"
    _last_modified: datetime | None = field(default=None, repr=False, compare=False)
    _listed: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def last_modified(self) -> datetime:
        """``LastModified``, built once per version on its first read, not per read (issue
        #11): a version never changes (a PUT makes a new one), and most are never read."""
        lm = self._last_modified
        if lm is None:
            lm = self._last_modified = datetime.fromtimestamp(self.modified, _UTC)
        return lm

    def list_entry(self, key: str) -> dict[str, Any]:
        """Its ListObjectsV2 ``Contents`` item, built once per version and shared by every
        LIST that shows it (read-only, as the adapters treat a response)."""
        item = self._listed
        if item is None:
            item = self._listed = {"Key": key, "ETag": self.etag, "Size": len(self.body),
                                   "LastModified": self.last_modified,
                                   "StorageClass": "STANDARD"}
        return item


class ClientProxy:
    """A boto3-client look-alike whose methods all go through one ``call(op, kwargs)``."""

    def __init__(self, call: Callable[[str, dict[str, Any]], dict[str, Any]],
                 ops: Iterable[str]) -> None:
        self._call = call
        self._ops = frozenset(ops)

    def __getattr__(self, name: str) -> Callable[..., dict[str, Any]]:
        if name.startswith("_") or name not in self._ops:
            raise AttributeError(name)
        call = self._call

        def method(**kwargs: Any) -> dict[str, Any]:
            return call(name, kwargs)

        method.__name__ = name
        self.__dict__[name] = method  # cache: the next lookup skips __getattr__
        return method


class S3Twin:
    """Buckets of objects with S3's consistency, conditions, clock and listing order."""

    OPS = ("get_object", "put_object", "delete_object", "head_object", "list_objects_v2",
           "head_bucket", "create_bucket")

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.buckets: dict[str, dict[str, _S3Object]] = {}
        self._keys: dict[str, list[str]] = {}  # sorted keys per bucket (UTF-8 order == str order)
        self._date_cache: tuple[int, str] = (-1, "")
        self.requests = 0
        self._dispatch: dict[str, Callable[..., dict[str, Any]]] = {}

    # -- plumbing ---------------------------------------------------------------------------
    def client(self) -> ClientProxy:
        return ClientProxy(self.call, self.OPS)

    def _date(self) -> tuple[int, str]:
        t = int(self.now())
        if self._date_cache[0] != t:
            self._date_cache = (t, _date_header(t))
        return self._date_cache

    def call(self, op: str, kw: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        fn = self._dispatch.get(op)
        if fn is None:
            fn = self._dispatch[op] = getattr(self, "_" + op)
        return fn(**kw)

    def _meta(self, status: int, date: str) -> dict[str, Any]:
        return {"HTTPStatusCode": status, "HTTPHeaders": {"date": date}}

    def _bucket(self, name: str, op: str, date: str) -> dict[str, _S3Object]:
        b = self.buckets.get(name)
        if b is None:
            raise _error("NoSuchBucket", 404, "The specified bucket does not exist", op, date)
        return b

    # -- buckets --------------------------------------------------------------------------------
    def _head_bucket(self, Bucket: str) -> dict[str, Any]:
        _, date = self._date()
        if Bucket not in self.buckets:
            raise _error("404", 404, "Not Found", "HeadBucket", date)
        return {"ResponseMetadata": self._meta(200, date)}

    def _create_bucket(self, Bucket: str, **_: Any) -> dict[str, Any]:
        _, date = self._date()
        if Bucket in self.buckets:
            raise _error("BucketAlreadyOwnedByYou", 409, "owned by you", "CreateBucket", date)
        self.buckets[Bucket] = {}
        self._keys[Bucket] = []
        return {"Location": f"/{Bucket}", "ResponseMetadata": self._meta(200, date)}

    # -- objects --------------------------------------------------------------------------------
    def _get_object(self, Bucket: str, Key: str, IfNoneMatch: str | None = None,
                    **_: Any) -> dict[str, Any]:
        _, date = self._date()
        o = self._bucket(Bucket, "GetObject", date).get(Key)
        if o is None:
            raise _error("NoSuchKey", 404, "The specified key does not exist.", "GetObject", date)
        if IfNoneMatch is not None and (IfNoneMatch == "*" or IfNoneMatch == o.etag):
            raise _error("304", 304, "Not Modified", "GetObject", date)
        return {"Body": _Body(o.body), "ETag": o.etag, "ContentLength": len(o.body),
                "ContentType": o.content_type, "LastModified": o.last_modified,
                "ResponseMetadata": self._meta(200, date)}

    def _head_object(self, Bucket: str, Key: str, **_: Any) -> dict[str, Any]:
        _, date = self._date()
        o = self._bucket(Bucket, "HeadObject", date).get(Key)
        if o is None:
            raise _error("404", 404, "Not Found", "HeadObject", date)
        return {"ETag": o.etag, "ContentLength": len(o.body), "ContentType": o.content_type,
                "LastModified": o.last_modified,
                "ResponseMetadata": self._meta(200, date)}

    def _put_object(self, Bucket: str, Key: str, Body: bytes | str = b"",
                    IfMatch: str | None = None, IfNoneMatch: str | None = None,
                    ContentType: str = "binary/octet-stream", **_: Any) -> dict[str, Any]:
        t, date = self._date()
        b = self._bucket(Bucket, "PutObject", date)
        body = Body.encode() if isinstance(Body, str) else bytes(Body)
        cur = b.get(Key)
        if IfNoneMatch is not None and cur is not None:
            raise _error("PreconditionFailed", 412,
                         "At least one of the pre-conditions you specified did not hold",
                         "PutObject", date)
        if IfMatch is not None:
            if cur is None:
                raise _error("NoSuchKey", 404, "The specified key does not exist.", "PutObject",
                             date)
            if cur.etag != IfMatch:
                raise _error("PreconditionFailed", 412,
                             "At least one of the pre-conditions you specified did not hold",
                             "PutObject", date)
        etag = '"' + hashlib.md5(body).hexdigest() + '"'  # noqa: S324 - S3's ETag is an MD5
        if cur is None:
            bisect.insort(self._keys[Bucket], Key)
        b[Key] = _S3Object(body, etag, t, ContentType)
        return {"ETag": etag, "ResponseMetadata": self._meta(200, date)}

    def _delete_object(self, Bucket: str, Key: str, IfMatch: str | None = None,
                       **_: Any) -> dict[str, Any]:
        _, date = self._date()
        b = self._bucket(Bucket, "DeleteObject", date)
        cur = b.get(Key)
        if IfMatch is not None:
            if cur is None:
                raise _error("NoSuchKey", 404, "The specified key does not exist.",
                             "DeleteObject", date)
            if cur.etag != IfMatch:
                raise _error("PreconditionFailed", 412,
                             "At least one of the pre-conditions you specified did not hold",
                             "DeleteObject", date)
        if cur is not None:
            del b[Key]
            keys = self._keys[Bucket]
            del keys[bisect.bisect_left(keys, Key)]
        return {"ResponseMetadata": self._meta(204, date)}

    def _list_objects_v2(self, Bucket: str, Prefix: str = "", ContinuationToken: str = "",
                         StartAfter: str = "", MaxKeys: int = 1000, **_: Any) -> dict[str, Any]:
        _, date = self._date()
        b = self._bucket(Bucket, "ListObjectsV2", date)
        keys = self._keys[Bucket]
        after = ContinuationToken or StartAfter
        i = bisect.bisect_right(keys, after) if after else 0
        i = max(i, bisect.bisect_left(keys, Prefix))
        # The keys under Prefix are one run of the sorted list: [i, end).
        if Prefix and Prefix[-1] < "\U0010ffff":
            end = bisect.bisect_left(keys, Prefix[:-1] + chr(ord(Prefix[-1]) + 1), i)
        elif Prefix:
            end = i
            while end < len(keys) and keys[end].startswith(Prefix):
                end += 1
        else:
            end = len(keys)
        stop = min(end, i + max(MaxKeys, 0))
        truncated = stop < end
        contents = [b[k].list_entry(k) for k in keys[i:stop]]
        resp: dict[str, Any] = {"IsTruncated": truncated, "KeyCount": len(contents),
                                "Name": Bucket, "Prefix": Prefix, "MaxKeys": MaxKeys,
                                "ResponseMetadata": self._meta(200, date)}
        if contents:
            resp["Contents"] = contents
        if truncated:
            resp["NextContinuationToken"] = contents[-1]["Key"]
        return resp


# -- EC2 and Auto Scaling ------------------------------------------------------------------------

_STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48,
                "stopping": 64, "stopped": 80}


@dataclass
class TwinInstance:
    instance_id: str
    image_id: str
    instance_type: str
    subnet_id: str
    az: str
    state: str = "pending"
    launched: float = 0.0
    state_since: float = 0.0
    tags: dict[str, str] = field(default_factory=dict)
    user_data: bytes | None = None
    security_groups: tuple[str, ...] = ()
    client_token: str = ""

    def describe(self) -> dict[str, Any]:
        return {"InstanceId": self.instance_id, "ImageId": self.image_id,
                "InstanceType": self.instance_type, "SubnetId": self.subnet_id,
                "Placement": {"AvailabilityZone": self.az},
                "State": {"Name": self.state, "Code": _STATE_CODES[self.state]},
                "LaunchTime": datetime.fromtimestamp(int(self.launched), _UTC),
                "SecurityGroups": [{"GroupId": g, "GroupName": g} for g in self.security_groups],
                "Tags": [{"Key": k, "Value": v} for k, v in self.tags.items()],
                **({"ClientToken": self.client_token} if self.client_token else {})}


LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
HOOK_GLOBAL_TIMEOUT_S = 172800  # AWS: min(48 h, 100 x HeartbeatTimeout)


@dataclass
class TwinHook:
    name: str
    transition: str
    heartbeat_timeout: int = 3600
    default_result: str = "ABANDON"

    def describe(self, group: str) -> dict[str, Any]:
        return {"LifecycleHookName": self.name, "AutoScalingGroupName": group,
                "LifecycleTransition": self.transition,
                "HeartbeatTimeout": self.heartbeat_timeout,
                "GlobalTimeout": min(HOOK_GLOBAL_TIMEOUT_S, 100 * self.heartbeat_timeout),
                "DefaultResult": self.default_result}


@dataclass
class TwinAction:
    """An instance waiting on a lifecycle hook (``Pending:Wait`` / ``Terminating:Wait``)."""

    hook: TwinHook
    token: str
    deadline: float  # the hook's heartbeat timeout, from the start or the last heartbeat
    give_up: float  # the global timeout


@dataclass
class TwinGroup:
    name: str
    desired: int
    subnets: tuple[str, ...]
    image_id: str = "ami-twin"
    instance_type: str = "t3.micro"
    grace_s: float = 300.0
    health: dict[str, str] = field(default_factory=dict)  # instance -> Healthy | Unhealthy
    lifecycle: dict[str, str] = field(default_factory=dict)  # instance -> InService | ...
    launch_template: Mapping[str, str] | None = None
    hooks: dict[str, TwinHook] = field(default_factory=dict)
    waiting: dict[str, TwinAction] = field(default_factory=dict)  # instance -> its action
    # Terminated with ShouldDecrementDesiredCapacity (a scale-in): nothing replaces them, so a
    # launch is never labelled as theirs (ground truth for the checker, not an AWS field)
    decremented: set[str] = field(default_factory=set)


class CloudTwin:
    """One region's EC2 and Auto Scaling. ``observer``: told of every state change."""

    EC2_OPS = ("describe_instances", "run_instances", "terminate_instances",
               "describe_instance_attribute", "describe_subnets")
    ASG_OPS = ("describe_auto_scaling_instances", "describe_auto_scaling_groups",
               "set_instance_health", "terminate_instance_in_auto_scaling_group",
               "complete_lifecycle_action", "create_auto_scaling_group", "put_lifecycle_hook",
               "describe_lifecycle_hooks", "delete_lifecycle_hook",
               "record_lifecycle_action_heartbeat")

    def __init__(self, now: Callable[[], float], *, boot_s: float = 30.0,
                 shutdown_s: float = 20.0, forget_s: float = 3600.0,
                 zones: Mapping[str, str] | None = None,
                 on_launch: Callable[[TwinInstance, str], None] | None = None,
                 on_state: Callable[[TwinInstance, str], None] | None = None) -> None:
        self.now = now
        self.boot_s = boot_s
        self.shutdown_s = shutdown_s
        self.forget_s = forget_s
        self.zones = dict(zones or {"subnet-a": "us-east-1a", "subnet-b": "us-east-1b",
                                    "subnet-c": "us-east-1c"})
        self.instances: dict[str, TwinInstance] = {}
        self.groups: dict[str, TwinGroup] = {}
        self.member_of: dict[str, str] = {}  # instance -> group
        self.tokens: dict[str, str] = {}  # ClientToken -> instance
        self.on_launch = on_launch
        self.on_state = on_state
        self._ids = itertools.count(1)
        self._activities = itertools.count(1)
        self._tokens = itertools.count(1)
        self.requests = 0
        # Instances in a timed state (pending, shutting-down, terminated), by creation order,
        # and the earliest time one of them is due: ``advance`` costs O(1) per call until then,
        # not a walk over every instance (issue #11).
        self._born: dict[str, int] = {}
        self._timed: set[str] = set()
        self._due = math.inf

    def ec2_client(self) -> ClientProxy:
        return ClientProxy(self.call, self.EC2_OPS)

    def asg_client(self) -> ClientProxy:
        return ClientProxy(self.call, self.ASG_OPS)

    def call(self, op: str, kw: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        self.advance()
        return getattr(self, "_" + op)(**kw)

    # -- the world's own progress ---------------------------------------------------------------
    def _set_state(self, inst: TwinInstance, state: str) -> None:
        if inst.state == state:
            return
        inst.state = state
        inst.state_since = self.now()
        self._watch_timed(inst)
        if self.on_state is not None:
            self.on_state(inst, state)

    def _delay(self, state: str) -> float | None:
        if state == "pending":
            return self.boot_s
        if state == "shutting-down":
            return self.shutdown_s
        if state == "terminated":
            return self.forget_s
        return None

    def _watch_timed(self, inst: TwinInstance) -> None:
        delay = self._delay(inst.state)
        if delay is not None:
            self._timed.add(inst.instance_id)
            # a little early: the pass below compares exactly as before (now - since >= delay)
            self._due = min(self._due, inst.state_since + delay - 1e-3)

    def advance(self) -> None:
        """Move timed state changes along (pending → running, shutting-down → terminated).

        Visits only instances in a timed state, in creation order (the order of
        ``instances``), and only once one of them is due."""
        now = self.now()
        if now >= self._due:
            self._advance_timed(now)
        for g in self.groups.values():
            for iid, act in list(g.waiting.items()):
                if now >= min(act.deadline, act.give_up):  # nobody answered: the default
                    self._finish(g, iid, act.hook.default_result)

    def _advance_timed(self, now: float) -> None:
        for iid in sorted(self._timed, key=self._born.__getitem__):
            inst = self.instances.get(iid)
            if inst is None:
                continue
            if inst.state == "pending" and now - inst.state_since >= self.boot_s:
                self._set_state(inst, "running")
            elif inst.state == "shutting-down" and now - inst.state_since >= self.shutdown_s:
                self._set_state(inst, "terminated")
            elif inst.state == "terminated" and now - inst.state_since >= self.forget_s:
                del self.instances[inst.instance_id]
        due = math.inf
        for iid in list(self._timed):
            inst = self.instances.get(iid)
            delay = None if inst is None else self._delay(inst.state)
            if delay is None:
                self._timed.discard(iid)
            else:
                due = min(due, inst.state_since + delay - 1e-3)  # type: ignore[union-attr]
        self._due = due

    def reconcile(self) -> list[tuple[str, str]]:
        """What the Auto Scaling service does on its own; ``[(replaced, new)]`` launched."""
        self.advance()
        out: list[tuple[str, str]] = []
        for g in self.groups.values():
            gone: list[str] = []
            for iid in list(g.health):
                inst = self.instances.get(iid)
                over = inst is None or inst.state in ("terminated", "shutting-down", "stopped")
                if over or (g.health[iid] == "Unhealthy" and self._terminate_member(g, iid)):
                    gone.append(iid)
            for iid in gone:
                g.health.pop(iid, None)
                g.lifecycle.pop(iid, None)
                g.waiting.pop(iid, None)
                self.member_of.pop(iid, None)
            # A scale-in's instance is not what a launch replaces: with one member scaled in
            # and another terminated without decrement, the one launch is the second's
            # (chaos seed 1, N = 30: labelled the first's, the checker saw the second's
            # replacement never arrive and counted it in flight for its whole deadline).
            owed = [i for i in gone if i not in g.decremented]
            g.decremented.difference_update(gone)
            while len(g.health) < g.desired:
                replaced = owed.pop(0) if owed else ""
                new = self._launch_into(g, replaced)
                out.append((replaced, new))
        return out

    def _new_id(self) -> str:
        return f"i-{next(self._ids):017x}"

    def launch_instance(self, *, subnet_id: str, image_id: str = "ami-twin",
                        instance_type: str = "t3.micro", tags: Mapping[str, str] | None = None,
                        user_data: bytes | None = None, client_token: str = "",
                        replaces: str = "", state: str = "pending") -> TwinInstance:
        now = self.now()
        inst = TwinInstance(self._new_id(), image_id, instance_type, subnet_id,
                            self.zones.get(subnet_id, "us-east-1a"), state, now, now,
                            dict(tags or {}), user_data, ("sg-twin",), client_token)
        self.instances[inst.instance_id] = inst
        self._born[inst.instance_id] = len(self._born)
        self._watch_timed(inst)
        if self.on_launch is not None:
            self.on_launch(inst, replaces)
        return inst

    def _launch_into(self, g: TwinGroup, replaces: str = "") -> str:
        counts = {s: 0 for s in g.subnets}
        for iid in g.health:
            inst = self.instances.get(iid)
            if inst is not None and inst.subnet_id in counts:
                counts[inst.subnet_id] += 1
        subnet = min(g.subnets, key=lambda s: (counts[s], s))
        inst = self.launch_instance(subnet_id=subnet, image_id=g.image_id,
                                    instance_type=g.instance_type,
                                    tags={"aws:autoscaling:groupName": g.name},
                                    replaces=replaces)
        g.health[inst.instance_id] = "Healthy"
        g.lifecycle[inst.instance_id] = "InService"
        self.member_of[inst.instance_id] = g.name
        self._wait_on(g, inst.instance_id, LAUNCHING, "Pending:Wait")
        return inst.instance_id

    def _wait_on(self, g: TwinGroup, iid: str, transition: str, state: str) -> bool:
        """Put ``iid`` in ``state`` on the group's first hook for ``transition`` (by name)."""
        hooks = sorted((h for h in g.hooks.values() if h.transition == transition),
                       key=lambda h: h.name)
        if not hooks:
            return False
        now = self.now()
        token = f"{next(self._tokens):08d}-twin-lifecycle-token"
        g.waiting[iid] = TwinAction(hooks[0], token, now + hooks[0].heartbeat_timeout,
                                    now + hooks[0].describe(g.name)["GlobalTimeout"])
        g.lifecycle[iid] = state
        return True

    def _finish(self, g: TwinGroup, iid: str, result: str) -> None:
        """A waiting action ends with ``result`` (CONTINUE | ABANDON)."""
        act = g.waiting.pop(iid)
        inst = self.instances.get(iid)
        if act.hook.transition == LAUNCHING and result == "CONTINUE":
            g.lifecycle[iid] = "InService"
            return
        # A terminate hook ends in termination whatever the result; an abandoned launch too.
        g.lifecycle[iid] = "Terminating:Proceed"
        if inst is not None and inst.state not in ("terminated", "shutting-down"):
            self._set_state(inst, "shutting-down")

    def _terminate_member(self, g: TwinGroup, iid: str) -> bool:
        """The group terminates ``iid``: through its terminate hook if it has one.
        True if the instance is now shutting down, False if it waits on a hook."""
        if iid in g.waiting and g.lifecycle.get(iid) == "Terminating:Wait":
            return False
        g.waiting.pop(iid, None)  # a launch still waiting is overtaken
        if self._wait_on(g, iid, TERMINATING, "Terminating:Wait"):
            return False
        inst = self.instances.get(iid)
        if inst is not None and inst.state not in ("terminated", "shutting-down"):
            self._set_state(inst, "shutting-down")
        g.lifecycle[iid] = "Terminating"
        return True

    def create_group(self, name: str, desired: int, subnets: Iterable[str], *,
                     grace_s: float = 300.0, state: str = "pending") -> list[str]:
        g = TwinGroup(name, desired, tuple(subnets), grace_s=grace_s)
        self.groups[name] = g
        ids = []
        for _ in range(desired):
            iid = self._launch_into(g)
            self.instances[iid].state = state
            ids.append(iid)
        return ids

    # -- EC2 ------------------------------------------------------------------------------------
    def _describe_instances(self, InstanceIds: list[str] | None = None,
                            Filters: list[dict[str, Any]] | None = None,
                            **_: Any) -> dict[str, Any]:
        ids = list(InstanceIds or self.instances)
        missing = [i for i in ids if i not in self.instances]
        if missing:
            raise _error("InvalidInstanceID.NotFound", 400,
                         f"The instance ID '{', '.join(missing)}' does not exist",
                         "DescribeInstances")
        for f in Filters or ():  # only tag filters: what the agent sends
            name, values = str(f["Name"]), set(f["Values"])
            if not name.startswith("tag:"):
                raise _error("InvalidParameterValue", 400, f"twin: filter {name!r}",
                             "DescribeInstances")
            ids = [i for i in ids if self.instances[i].tags.get(name[4:]) in values]
        insts = [self.instances[i].describe() for i in ids]
        return {"Reservations": [{"ReservationId": "r-twin", "Instances": insts}] if insts else [],
                "ResponseMetadata": {"HTTPStatusCode": 200, "HTTPHeaders": {}}}

    def _describe_instance_attribute(self, InstanceId: str, Attribute: str,
                                     **_: Any) -> dict[str, Any]:
        inst = self.instances.get(InstanceId)
        if inst is None:
            raise _error("InvalidInstanceID.NotFound", 400, f"{InstanceId} does not exist",
                         "DescribeInstanceAttribute")
        import base64

        ud = {"Value": base64.b64encode(inst.user_data).decode()} if inst.user_data else {}
        return {"InstanceId": InstanceId, "UserData": ud}

    def _describe_subnets(self, **_: Any) -> dict[str, Any]:
        return {"Subnets": [{"SubnetId": s, "AvailabilityZone": z} for s, z in self.zones.items()]}

    def _run_instances(self, MinCount: int = 1, MaxCount: int = 1, ClientToken: str = "",
                       ImageId: str = "", InstanceType: str = "t3.micro", SubnetId: str = "",
                       TagSpecifications: list[dict[str, Any]] | None = None,
                       UserData: str | None = None, LaunchTemplate: Any = None,
                       **_: Any) -> dict[str, Any]:
        if ClientToken and ClientToken in self.tokens:
            inst = self.instances.get(self.tokens[ClientToken])
            if inst is not None:
                return {"Instances": [inst.describe()], "ReservationId": "r-twin"}
        if not ImageId and LaunchTemplate is None:
            raise _error("MissingParameter", 400, "The request must contain the parameter ImageId",
                         "RunInstances")
        tags: dict[str, str] = {}
        for spec in TagSpecifications or ():
            if spec.get("ResourceType") == "instance":
                tags.update({t["Key"]: t["Value"] for t in spec.get("Tags", [])})
        subnet = SubnetId or sorted(self.zones)[0]
        inst = self.launch_instance(subnet_id=subnet, image_id=ImageId or "ami-template",
                                    instance_type=InstanceType, tags=tags,
                                    user_data=UserData.encode() if UserData else None,
                                    client_token=ClientToken,
                                    replaces=tags.get("ec2-agent:replaces", ""))
        if ClientToken:
            self.tokens[ClientToken] = inst.instance_id
        return {"Instances": [inst.describe()], "ReservationId": "r-twin"}

    def _terminate_instances(self, InstanceIds: list[str], **_: Any) -> dict[str, Any]:
        missing = [i for i in InstanceIds if i not in self.instances]
        if missing:
            raise _error("InvalidInstanceID.NotFound", 400,
                         f"The instance ID '{', '.join(missing)}' does not exist",
                         "TerminateInstances")
        out = []
        for iid in InstanceIds:
            inst = self.instances[iid]
            prev = inst.state
            if prev not in ("terminated", "shutting-down"):
                self._set_state(inst, "shutting-down")
            out.append({"InstanceId": iid, "PreviousState": {"Name": prev,
                                                             "Code": _STATE_CODES[prev]},
                        "CurrentState": {"Name": inst.state, "Code": _STATE_CODES[inst.state]}})
        return {"TerminatingInstances": out}

    # -- Auto Scaling ---------------------------------------------------------------------------
    def _asg_instance(self, iid: str) -> dict[str, Any] | None:
        name = self.member_of.get(iid)
        if name is None:
            return None
        g = self.groups[name]
        inst = self.instances.get(iid)
        return {"InstanceId": iid, "AutoScalingGroupName": name,
                "AvailabilityZone": inst.az if inst else "",
                "HealthStatus": g.health.get(iid, "Healthy"),
                "LifecycleState": g.lifecycle.get(iid, "InService"),
                "InstanceType": inst.instance_type if inst else "",
                "ProtectedFromScaleIn": False}

    def _describe_auto_scaling_instances(self, InstanceIds: list[str] | None = None,
                                         **_: Any) -> dict[str, Any]:
        ids = InstanceIds if InstanceIds is not None else sorted(self.member_of)
        out = [a for a in (self._asg_instance(i) for i in ids) if a is not None]
        return {"AutoScalingInstances": out}

    def _describe_auto_scaling_groups(self, AutoScalingGroupNames: list[str] | None = None,
                                      **_: Any) -> dict[str, Any]:
        names = AutoScalingGroupNames if AutoScalingGroupNames is not None else sorted(self.groups)
        out = []
        for n in names:
            g = self.groups.get(n)
            if g is None:
                continue
            insts = [{k: v for k, v in (self._asg_instance(i) or {}).items()
                      if k != "AutoScalingGroupName"} for i in sorted(g.health)]
            out.append({"AutoScalingGroupName": n, "DesiredCapacity": g.desired,
                        "MinSize": 0, "MaxSize": max(g.desired, 1) * 2,
                        "HealthCheckGracePeriod": int(g.grace_s),
                        "VPCZoneIdentifier": ",".join(g.subnets), "Instances": insts})
        return {"AutoScalingGroups": out}

    def _set_instance_health(self, InstanceId: str, HealthStatus: str,
                             ShouldRespectGracePeriod: bool = True, **_: Any) -> dict[str, Any]:
        name = self.member_of.get(InstanceId)
        if name is None:
            raise _error("ValidationError", 400, f"Instance Id not found - {InstanceId}",
                         "SetInstanceHealth")
        g = self.groups[name]
        inst = self.instances.get(InstanceId)
        if (ShouldRespectGracePeriod and inst is not None
                and self.now() - inst.launched < g.grace_s):
            return {}  # AWS accepts the call and ignores the mark inside the grace period
        g.health[InstanceId] = HealthStatus
        return {}

    def _terminate_instance_in_auto_scaling_group(self, InstanceId: str,
                                                  ShouldDecrementDesiredCapacity: bool,
                                                  **_: Any) -> dict[str, Any]:
        name = self.member_of.get(InstanceId)
        if name is None:
            raise _error("ValidationError", 400, f"Instance Id not found - {InstanceId}",
                         "TerminateInstanceInAutoScalingGroup")
        g = self.groups[name]
        self._terminate_member(g, InstanceId)
        if ShouldDecrementDesiredCapacity:
            g.desired -= 1
            g.decremented.add(InstanceId)
        activity = f"act-{next(self._activities):08d}"
        return {"Activity": {"ActivityId": activity, "AutoScalingGroupName": name,
                             "StatusCode": "InProgress",
                             "Description": f"Terminating EC2 instance: {InstanceId}"}}

    def _hook_group(self, name: str, op: str) -> TwinGroup:
        g = self.groups.get(name)
        if g is None:
            raise _error("ValidationError", 400, f"Group {name} not found", op)
        return g

    def _put_lifecycle_hook(self, AutoScalingGroupName: str, LifecycleHookName: str,
                            LifecycleTransition: str | None = None,
                            HeartbeatTimeout: int | None = None,
                            DefaultResult: str | None = None, **_: Any) -> dict[str, Any]:
        g = self._hook_group(AutoScalingGroupName, "PutLifecycleHook")
        old = g.hooks.get(LifecycleHookName)
        transition = LifecycleTransition or (old.transition if old else "")
        if transition not in (LAUNCHING, TERMINATING):
            raise _error("ValidationError", 400, f"Invalid Lifecycle Transition: {transition!r}",
                         "PutLifecycleHook")
        result = DefaultResult or (old.default_result if old else "ABANDON")
        if result not in ("CONTINUE", "ABANDON"):
            raise _error("ValidationError", 400, f"Invalid DefaultResult: {result!r}",
                         "PutLifecycleHook")
        timeout = HeartbeatTimeout or (old.heartbeat_timeout if old else 3600)
        if not 30 <= int(timeout) <= 7200:
            raise _error("ValidationError", 400, "HeartbeatTimeout must be between 30 and "
                         f"7200 seconds, got {timeout}", "PutLifecycleHook")
        g.hooks[LifecycleHookName] = TwinHook(LifecycleHookName, transition, int(timeout),
                                              result)
        return {}

    def _describe_lifecycle_hooks(self, AutoScalingGroupName: str,
                                  LifecycleHookNames: list[str] | None = None,
                                  **_: Any) -> dict[str, Any]:
        g = self._hook_group(AutoScalingGroupName, "DescribeLifecycleHooks")
        return {"LifecycleHooks": [h.describe(g.name) for n, h in sorted(g.hooks.items())
                                   if not LifecycleHookNames or n in LifecycleHookNames]}

    def _delete_lifecycle_hook(self, AutoScalingGroupName: str, LifecycleHookName: str,
                               **_: Any) -> dict[str, Any]:
        g = self._hook_group(AutoScalingGroupName, "DeleteLifecycleHook")
        if g.hooks.pop(LifecycleHookName, None) is None:
            raise _error("ValidationError", 400,
                         f"No Lifecycle Hook found with name {LifecycleHookName}",
                         "DeleteLifecycleHook")
        return {}

    def _waiting_action(self, op: str, group: str, hook: str, iid: str | None,
                        token: str | None) -> tuple[TwinGroup, str]:
        g = self._hook_group(group, op)
        for w, act in g.waiting.items():
            if act.hook.name == hook and (w == iid if iid else act.token == token) and (
                    not token or act.token == token):
                return g, w
        what = f"instance ID {iid}" if iid else f"token {token}"
        raise _error("ValidationError", 400, f"No active Lifecycle Action found with {what}", op)

    def _complete_lifecycle_action(self, AutoScalingGroupName: str, LifecycleHookName: str,
                                   LifecycleActionResult: str, InstanceId: str | None = None,
                                   LifecycleActionToken: str | None = None,
                                   **_: Any) -> dict[str, Any]:
        if LifecycleActionResult not in ("CONTINUE", "ABANDON"):
            raise _error("ValidationError", 400, "LifecycleActionResult must be CONTINUE or "
                         f"ABANDON, got {LifecycleActionResult!r}", "CompleteLifecycleAction")
        g, iid = self._waiting_action("CompleteLifecycleAction", AutoScalingGroupName,
                                      LifecycleHookName, InstanceId, LifecycleActionToken)
        self._finish(g, iid, LifecycleActionResult)
        return {}

    def _record_lifecycle_action_heartbeat(self, AutoScalingGroupName: str,
                                           LifecycleHookName: str,
                                           InstanceId: str | None = None,
                                           LifecycleActionToken: str | None = None,
                                           **_: Any) -> dict[str, Any]:
        g, iid = self._waiting_action("RecordLifecycleActionHeartbeat", AutoScalingGroupName,
                                      LifecycleHookName, InstanceId, LifecycleActionToken)
        act = g.waiting[iid]
        act.deadline = self.now() + act.hook.heartbeat_timeout
        return {}

    def lifecycle_token(self, group: str, iid: str) -> str | None:
        """The token AWS would send in the hook's notification (None: not waiting)."""
        act = self.groups[group].waiting.get(iid)
        return act.token if act is not None else None

    def _create_auto_scaling_group(self, **_: Any) -> dict[str, Any]:
        raise _error("ValidationError", 400, "use CloudTwin.create_group", "CreateAutoScalingGroup")
