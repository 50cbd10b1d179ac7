"""The two ports of the agent: the coordination store and the cloud, as ``typing.Protocol``.

Pure: this module imports no boto3, opens no socket and reads no clock, so
decision code can name the interfaces (and the values they return) without
loading an adapter. Two implementations stand behind each port: the AWS
adapters (``agent.aws.store.Store`` over S3, ``agent.aws.cloud.Cloud`` over EC2 and Auto
Scaling) and the simulator's in-memory twins; one contract suite runs against both.

Store keys are relative to the deployment's prefix (``key`` adds it, ``rel``
strips it). Every read carries the store's own clock (``store_now``, its HTTP
``Date``): a 304 (``NotModified``) and a 404 (``NotFound.store_now``) keep it too,
so a watcher ages records on the store's clock without downloading them again.

Errors (``agent.errors``): a lost conditional write is ``PreconditionFailed``, a
missing key ``NotFound``, any other store failure ``StoreError``; a cloud failure
is ``CloudError``. Anything else is a bug and propagates.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

MAX_TOKEN = 64
REPLACES_TAG = "ec2-agent:replaces"
# The launch's ClientToken, also as a tag: it identifies the death a replacement was
# launched for with one tag filter, whatever a DescribeInstances answer says of
# ``ClientToken`` (EC2 and moto report it; moto does not honour it).
TOKEN_TAG = "ec2-agent:token"
# AWS owns the aws: tag namespace: RunInstances refuses tags that start with it.
_RESERVED_TAG_PREFIX = "aws:"


# -- store values ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    key: str
    body: bytes
    etag: str
    last_modified: float  # epoch seconds, store clock
    store_now: float  # the store's Date header for this response


@dataclass(frozen=True)
class NotModified:
    """A conditional GET's 304: the object still has the ETag asked about."""

    store_now: float  # the 304's Date: the store clock, even when nothing changed


@dataclass(frozen=True)
class Entry:
    key: str
    etag: str
    last_modified: float
    size: int


@dataclass(frozen=True)
class Listing:
    entries: tuple[Entry, ...]
    store_now: float
    pages: int = 1


@dataclass
class Usage:
    """Requests and bytes by operation: the cost model is measured, not guessed.

    ``last_mono`` (the monotonic time of the last finished request, ok or not) is
    progress for watchdogs; ``mono`` is injectable so a simulation runs on its clock.
    """

    requests: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    last_mono: float = 0.0
    mono: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, op: str, bytes_in: int = 0, bytes_out: int = 0) -> None:
        with self._lock:
            self.last_mono = self.mono()
            self.requests[op] += 1
            self.bytes_in += bytes_in
            self.bytes_out += bytes_out


@runtime_checkable
class StoreAPI(Protocol):
    """One deployment's bucket and prefix, as a strongly consistent store with CAS."""

    bucket: str
    prefix: str
    usage: Usage

    def key(self, rel: str) -> str:
        """The full object key of a prefix-relative key."""
        ...

    def rel(self, key: str) -> str:
        """The prefix-relative key of a full object key."""
        ...

    def get(self, rel: str, *, if_none_match: str | None = None) -> Obj | NotModified:
        """The object; ``NotModified`` when ``if_none_match`` is its ETag. NotFound if none."""
        ...

    def read_range(self, rel: str, start: int, end: int,
                   sizes: Sequence[int]) -> Iterator[bytes]:
        """Bytes [start, end) of an object in consecutive pieces of ``sizes``, as they arrive;
        a short piece ends it (the object is shorter). NotFound if missing."""
        ...

    def get_or_none(self, rel: str) -> Obj | None:
        ...

    def put(self, rel: str, body: bytes, *, if_match: str | None = None,
            if_none_match: bool = False, content_type: str = "application/octet-stream") -> str:
        """Write; create-only with ``if_none_match``, compare-and-swap with ``if_match``: ETag."""
        ...

    def create(self, rel: str, body: bytes, *,
               content_type: str = "application/octet-stream") -> str:
        """``put(..., if_none_match=True)``: PreconditionFailed when the key exists."""
        ...

    def delete(self, rel: str, *, if_match: str | None = None) -> None:
        """Delete (idempotent without ``if_match``; PreconditionFailed on an ETag mismatch)."""
        ...

    def delete_many(self, rels: Sequence[str]) -> None:
        """Delete many keys, unconditionally (batches of 1000)."""
        ...

    def head(self, rel: str) -> Entry | None:
        ...

    def exists(self, rel: str) -> bool:
        ...

    def list(self, rel_prefix: str, *, max_pages: int | None = None) -> Listing:
        """All keys under a prefix (relative keys), with the store clock of the last page."""
        ...

    def upload_many(self, items: Mapping[str, bytes], *, concurrency: int = 8) -> None:
        """Unconditional parallel PUTs of ``{rel: body}`` (content-addressed objects)."""
        ...

    def download_many(self, items: Sequence[tuple[str, Path, int]], *, concurrency: int = 8,
                      on_progress: Callable[[int], None] | None = None,
                      on_done: Callable[[int], None] | None = None,
                      expired: Callable[[], bool] | None = None) -> None:
        """Download ``(rel, dest, size)`` items in parallel.

        ``on_done(i)`` runs in the caller's thread as each item lands (in any order);
        ``expired()`` true aborts with ``DeadlineExceeded``; the first failure raises
        (NotFound / StoreError) and cancels the rest. Partial files are the caller's.
        """
        ...

    def ensure_bucket(self) -> None:
        """Create the bucket if missing (simulator and tests)."""
        ...


# -- cloud values ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AsgInstance:
    """An instance as its Auto Scaling group sees it."""

    instance_id: str
    group: str
    health: str  # Healthy | Unhealthy
    lifecycle: str  # Pending | InService | Terminating | ...
    launch_template: Mapping[str, str] | None = None


@dataclass(frozen=True)
class InstanceInfo:
    """What DescribeInstances says about one instance, as far as healing cares."""

    instance_id: str
    state: str
    az: str = ""
    asg: str = ""  # the aws:autoscaling:groupName tag: it was launched by that ASG
    launch_time: float | None = None


@dataclass(frozen=True)
class Replacement:
    """An instance launched as a replacement: it carries ``REPLACES_TAG`` naming a member.

    ``token``: the ClientToken it was launched with (EC2's ``ClientToken``, else the
    ``TOKEN_TAG``), which names the death (``agent.heal.resolve.death_token``).
    """

    instance_id: str
    replaces: str
    state: str
    token: str = ""


@dataclass(frozen=True)
class LaunchSpec:
    """What ``launch`` sends: a launch template (+ subnet) or a clone's parameters."""

    source: str  # "launch-template" | "clone"
    subnet_id: str
    launch_template: Mapping[str, str] | None = None
    image_id: str = ""
    instance_type: str = ""
    security_group_ids: tuple[str, ...] = ()
    user_data: bytes | None = None
    key_name: str = ""
    iam_instance_profile_arn: str = ""
    tags: tuple[tuple[str, str], ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def run_instances_kwargs(self, client_token: str, replaces: str = "") -> dict[str, Any]:
        """The RunInstances request (pure): same token and subnet on every retry."""
        if not client_token or len(client_token) > MAX_TOKEN or not client_token.isascii():
            raise ValueError(f"ClientToken must be 1..{MAX_TOKEN} ASCII chars, "
                             f"got {client_token!r}")
        kw: dict[str, Any] = {"MinCount": 1, "MaxCount": 1, "ClientToken": client_token}
        if self.subnet_id:
            kw["SubnetId"] = self.subnet_id
        tags = [(k, v) for k, v in self.tags if not k.startswith(_RESERVED_TAG_PREFIX)]
        if replaces:
            tags = [(k, v) for k, v in tags if k not in (REPLACES_TAG, TOKEN_TAG)]
            tags += [(REPLACES_TAG, replaces), (TOKEN_TAG, client_token)]
        if self.source == "launch-template":
            assert self.launch_template is not None
            kw["LaunchTemplate"] = dict(self.launch_template)
        else:
            kw["ImageId"] = self.image_id
            kw["InstanceType"] = self.instance_type
            if self.security_group_ids:
                kw["SecurityGroupIds"] = list(self.security_group_ids)
            if self.user_data is not None:
                # boto3 base64-encodes RunInstances UserData itself: pass the raw text.
                kw["UserData"] = self.user_data.decode("utf-8", "surrogateescape")
            if self.key_name:
                kw["KeyName"] = self.key_name
            if self.iam_instance_profile_arn:
                kw["IamInstanceProfile"] = {"Arn": self.iam_instance_profile_arn}
        if tags:
            kw["TagSpecifications"] = [
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags]}
            ]
        return kw


@runtime_checkable
class CloudAPI(Protocol):
    """EC2 + Auto Scaling for one region: the calls safe replacement and the boot make.

    Every failure is ``CloudError``; an API error is never evidence that an instance
    is dead. An id EC2 no longer knows reads as ``terminated``.
    """

    region: str | None

    def describe(self, instance_id: str) -> dict[str, Any] | None:
        """The DescribeInstances entry, or None when EC2 says no such instance."""
        ...

    def states(self, instance_ids: Iterable[str]) -> dict[str, str]:
        """EC2 state name per id; CloudError when the API fails."""
        ...

    def states_or_none(self, instance_ids: Iterable[str]) -> tuple[dict[str, str | None], str]:
        """``(states, error)``: on an API failure every state is None and error says why."""
        ...

    def instances(self, instance_ids: Iterable[str]) -> dict[str, InstanceInfo]:
        """What EC2 says about each id it knows; unknown ids are left out (not "dead")."""
        ...

    def asg_grace_left(self, name: str, launch_time: float | None, now: float) -> float:
        """Seconds of the group's HealthCheckGracePeriod left for an instance (0: none)."""
        ...

    def asg_instances(self, instance_ids: Iterable[str]) -> dict[str, AsgInstance]:
        ...

    def asg_group(self, name: str) -> dict[str, Any] | None:
        ...

    def asg_member_ids(self, name: str) -> list[str]:
        ...

    def set_unhealthy(self, instance_id: str, *, respect_grace: bool = True) -> None:
        ...

    def asg_terminate(self, instance_id: str) -> str:
        """TerminateInstanceInAutoScalingGroup without decrementing capacity: activity id."""
        ...

    def terminate(self, instance_id: str) -> str:
        """TerminateInstances: the new state name ("terminated" when EC2 forgot it)."""
        ...

    def launch_spec(self, instance_id: str) -> LaunchSpec:
        ...

    def user_data(self, instance_id: str) -> bytes | None:
        ...

    def launch(self, spec: LaunchSpec, client_token: str, *, replaces: str = "") -> str:
        """RunInstances once with ``client_token`` (idempotent): the new instance id."""
        ...

    def replacements(self, member_ids: Iterable[str]) -> list[Replacement]:
        """Instances EC2 still describes whose ``REPLACES_TAG`` names one of ``member_ids``."""
        ...

    def complete_lifecycle_action(self, asg_name: str, hook_name: str, instance_id: str,
                                  result: str, *, token: str | None = None) -> None:
        ...
