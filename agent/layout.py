"""Every key of the store's layout, in one place (keys are relative to the deployment prefix).

    config/<group>/manifest.json                 the bundle index (agent.bundle.manifest)
    config/<group>/objects/<sha256>              bundle files, content-addressed
    data/<group>/<name>/chunks/<sha256>          data snapshot chunks (agent.data.plan)
    data/<group>/<name>/snapshots/<id>.json      snapshot manifests
    data/<group>/<name>/locks/backup-<id>        a running backup; gc-* a running collection
    groups/<group>/members/<id>.json             one heartbeat record per member
    groups/<group>/members.version               the membership change marker (beside members/,
                                                 so a LIST of members never sees it)
    groups/<group>/leases/<member>               one replacement lease per dead member
    groups/<group>/suspicions/<member>/<obs>     who suspects whom
    groups/<group>/budget.json                   the replacement budget (compare-and-swap)
    groups/<group>/control/pause | resumed       the kill switch and its resume mark
    groups/<group>/control/zone-dark/<zone>      a zone last judged disrupted (LastModified)
    groups/<group>/events/<stamp>-<actor>-<rand>.json   the audit log

Pure: strings in, strings out.
"""

from __future__ import annotations

from datetime import datetime, timezone

# -- the bundle ---------------------------------------------------------------------------------


def manifest_rel(group: str) -> str:
    return f"config/{group}/manifest.json"


def objects_prefix(group: str) -> str:
    return f"config/{group}/objects/"


def object_rel(group: str, sha256: str) -> str:
    return f"{objects_prefix(group)}{sha256}"


# -- data snapshots -----------------------------------------------------------------------------


def data_base(group: str, name: str) -> str:
    return f"data/{group}/{name}"


def chunk_key(group: str, name: str, sha: str) -> str:
    return f"{data_base(group, name)}/chunks/{sha}"


def snapshots_prefix(group: str, name: str) -> str:
    return f"{data_base(group, name)}/snapshots/"


def snapshot_key(group: str, name: str, snap_id: str) -> str:
    return f"{snapshots_prefix(group, name)}{snap_id}.json"


def data_locks_prefix(group: str, name: str) -> str:
    return f"{data_base(group, name)}/locks/"


# -- the group ----------------------------------------------------------------------------------


def members_prefix(group: str) -> str:
    return f"groups/{group}/members/"


def member_key(group: str, instance_id: str) -> str:
    return f"{members_prefix(group)}{instance_id}.json"


def marker_key(group: str) -> str:
    """Beside, not under, ``members/``: a LIST of members never sees it."""
    return f"groups/{group}/members.version"


def id_from_key(rel: str) -> str | None:
    """The instance id of a member record's key, else None."""
    name = rel.rsplit("/", 1)[-1]
    return name[:-5] if name.endswith(".json") and len(name) > 5 else None


def leases_prefix(group: str) -> str:
    return f"groups/{group}/leases/"


def lease_key(group: str, member: str) -> str:
    return f"{leases_prefix(group)}{member}"


def closed_leases_prefix(group: str) -> str:
    """Leases whose replacement is long over, moved out of ``leases/`` (issue #11)."""
    return f"groups/{group}/closed-leases/"


def closed_lease_key(group: str, member: str) -> str:
    return f"{closed_leases_prefix(group)}{member}"


def adoption_key(group: str, instance_id: str) -> str:
    """The create-only claim that an Auto Scaling launch is one lease's replacement."""
    return f"groups/{group}/adoptions/{instance_id}"


def suspicions_prefix(group: str) -> str:
    return f"groups/{group}/suspicions/"


def suspicion_key(group: str, member: str, observer: str) -> str:
    return f"{suspicions_prefix(group)}{member}/{observer}"


def budget_key(group: str) -> str:
    return f"groups/{group}/budget.json"


def inflight_key(group: str) -> str:
    """The group's replacements in flight (compare-and-swap, like the budget)."""
    return f"groups/{group}/inflight.json"


def control_prefix(group: str) -> str:
    return f"groups/{group}/control/"


def pause_key(group: str) -> str:
    return f"{control_prefix(group)}pause"


def resumed_key(group: str) -> str:
    return f"{control_prefix(group)}resumed"


def zone_dark_prefix(group: str) -> str:
    return f"{control_prefix(group)}zone-dark/"


def zone_dark_key(group: str, zone: str) -> str:
    """A zone some observer judged disrupted; its LastModified is the last such judgement."""
    return f"{zone_dark_prefix(group)}{zone}"


def events_prefix(group: str) -> str:
    return f"groups/{group}/events/"


def stamp(t: float) -> str:
    """A sortable UTC timestamp with microseconds: ``20240102T030405.123456Z``."""
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def event_key(group: str, t: float, actor: str, rand: str) -> str:
    return f"{events_prefix(group)}{stamp(t)}-{actor}-{rand}.json"
