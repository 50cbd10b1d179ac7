"""Lean copies of the botocore data the agent loads, for a daemon that stays small.

A boto3 client keeps every file its session parsed for as long as the process
lives. For the daemon's one S3 client that was about 10 MiB of Python objects
(measured): 6.7 MiB for ``endpoints.json``, the endpoint table of some 400
services the agent never calls, 1.2 MiB for the S3 model's documentation
strings, which only docstrings read, and most of the rest for 100 of S3's 116
operations, which nothing in the agent calls. An EC2 client (healing) would add
13.8 MiB for 830 operations, of which the agent calls a handful.

botocore's own mechanism for this is its data path (``AWS_DATA_PATH``, the
session's ``data_path``): directories searched before the built-in data. We
write, for the installed botocore version, copies that keep what the agent's
clients can use -- the endpoint entries of its services and every
partition-wide default; of each model, the operations listed in ``OPERATIONS``
(an explicit list: ``agent.aws.session`` refuses any call outside it, so a new call
fails loudly in the first test that makes it instead of losing its operation
in the copies), with every shape those operations reach, unchanged except for emptied documentation
-- and drop the rest; only the agent's own session (boot and daemon) is pointed
at them. Files not copied (endpoint rule sets, ``partitions.json``, retry rules,
the models' SDK extras) still come from botocore itself.

The copies are built by a child process (``python -m agent.aws.botodata DIR``): a
daemon that parsed the full files itself, even briefly, would keep their freed
memory as heap fragmentation. They are keyed by botocore's version and a digest
of ``OPERATIONS``, so an upgraded botocore, or a longer list, gets fresh copies,
never stale ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Every service the agent makes clients for (store, heal, lifecycle hooks, secrets).
SERVICES = ("s3", "ec2", "autoscaling", "ssm", "secretsmanager")
#: Endpoint entries kept: the services above, and STS for credential providers
#: that assume a role.
ENDPOINT_SERVICES = (*SERVICES, "sts")
DOC_KEYS = frozenset({"documentation", "documentationUrl"})
MARKER = "complete.json"
#: Bumped whenever what the copies keep changes: older copies are then rebuilt.
FORMAT = 2
#: Every operation the agent's clients may call, by service (API names): the agent's own
#: calls, and those s3transfer makes for it (multipart uploads) and botocore for S3 Express
#: (CreateSession). ``agent.aws.session.client`` refuses any other, so adding a call means adding
#: it here (tests/unit/test_awsdata.py checks both directions).
OPERATIONS: Mapping[str, frozenset[str]] = {
    "s3": frozenset({
        "GetObject", "PutObject", "DeleteObject", "DeleteObjects", "HeadObject",
        "ListObjectsV2", "HeadBucket", "CreateBucket",
        "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload",
        "AbortMultipartUpload", "CreateSession",
    }),
    "ec2": frozenset({
        "DescribeInstances", "DescribeInstanceAttribute", "RunInstances", "TerminateInstances",
    }),
    "autoscaling": frozenset({
        "DescribeAutoScalingInstances", "DescribeAutoScalingGroups", "SetInstanceHealth",
        "TerminateInstanceInAutoScalingGroup", "CompleteLifecycleAction",
    }),
    "ssm": frozenset({"GetParameter"}),
    "secretsmanager": frozenset({"GetSecretValue"}),
}
BUILD_TIMEOUT_S = 120.0


# -- pure ----------------------------------------------------------------------------------------
def strip_docs(node: Any) -> Any:
    """The same model with every documentation string emptied (a new object).

    The keys stay, as empty strings: botocore reads some of them unconditionally
    (``clientContextParams[*]['documentation']``), so only their text may go. A
    *shape* or member that happens to be named ``documentation`` (a dict) is data
    and is kept as it is.
    """
    if isinstance(node, dict):
        return {k: "" if k in DOC_KEYS and isinstance(v, str) else strip_docs(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [strip_docs(v) for v in node]
    return node


def _shapes_of(node: Mapping[str, Any]) -> Iterable[str]:
    for key in ("member", "key", "value"):
        if isinstance(node.get(key), dict) and "shape" in node[key]:
            yield node[key]["shape"]
    for member in (node.get("members") or {}).values():
        yield member["shape"]


def keep_operations(model: Mapping[str, Any], keep: Iterable[str]) -> dict[str, Any]:
    """The model with only the operations named in ``keep`` and every shape they reach.

    Operations are kept whole; a shape is kept whole if any kept operation's input,
    output or errors reach it, through members, list members or map keys and values.
    """
    wanted = set(keep)
    ops = {k: v for k, v in model["operations"].items() if k in wanted}
    shapes = model["shapes"]
    seen: set[str] = set()
    todo = [ref["shape"] for op in ops.values()
            for ref in (op.get("input"), op.get("output"), *op.get("errors", ()))
            if isinstance(ref, dict) and "shape" in ref]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_shapes_of(shapes[name]))
    return {**model, "operations": ops, "shapes": {k: v for k, v in shapes.items() if k in seen}}


def trim_endpoints(doc: Mapping[str, Any], services: Iterable[str]) -> dict[str, Any]:
    """``endpoints.json`` with only ``services``' entries; every partition-wide key kept.

    A service absent from the table would fall back to partition defaults, which for
    the services kept never happens: their entries are carried over unchanged.
    """
    keep = set(services)
    out = dict(doc)
    out["partitions"] = [
        {**p, "services": {k: v for k, v in (p.get("services") or {}).items() if k in keep}}
        for p in doc.get("partitions", [])
    ]
    return out


def marker_ok(marker: Any, version: str, agent: str, services: Iterable[str]) -> bool:
    """A finished build, in this format, for this botocore and this agent code, covering
    ``services`` (the agent's code says which operations are kept)."""
    return (isinstance(marker, dict) and marker.get("format") == FORMAT
            and marker.get("botocore") == version and marker.get("agent") == agent
            and set(services) <= set(marker.get("services") or ()))


# -- I/O -----------------------------------------------------------------------------------------
def _botocore_version() -> str:
    import botocore

    return str(botocore.__version__)


def _agent_digest() -> str:
    """Of ``OPERATIONS``: an agent that may call a new operation gets copies that have it."""
    import hashlib

    doc = json.dumps({s: sorted(ops) for s, ops in OPERATIONS.items()}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


def version_dir(root: Path, agent: str | None = None) -> Path:
    return root / f"botocore-{_botocore_version()}-agent-{agent or _agent_digest()}"


def find(root: Path) -> Path | None:
    """The finished copies for this botocore and agent, or None (then botocore's own data)."""
    agent = _agent_digest()
    d = version_dir(root, agent)
    try:
        marker = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return d if marker_ok(marker, _botocore_version(), agent, SERVICES) else None


def _dump(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())


def build(root: Path) -> Path:
    """Write the copies for the installed botocore under ``root``; all or nothing.

    Everything goes to a temporary directory first, the marker last, then one
    rename publishes it: a crash leaves either no copies or complete ones. A racing
    builder that renamed first wins; ours is dropped. Copies for other botocore or
    agent versions are removed afterwards.
    """
    from botocore.loaders import Loader

    found = find(root)
    if found is not None:
        return found
    agent = _agent_digest()
    target = version_dir(root, agent)
    root.mkdir(parents=True, exist_ok=True)
    # Built-in data only: the copies must mirror botocore's files, not a customer's
    # ~/.aws/models (those are still searched first by the session, as ever).
    loader = Loader(extra_search_paths=[Loader.BUILTIN_DATA_PATH],
                    include_default_search_paths=False)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        _dump(tmp / "endpoints.json", trim_endpoints(loader.load_data("endpoints"),
                                                     ENDPOINT_SERVICES))
        for svc in SERVICES:
            api = loader.determine_latest_version(svc, "service-2")
            name = f"{svc}/{api}/service-2"
            model = loader.load_data(name)
            ops = [op for op in model["operations"] if op in OPERATIONS[svc]]
            _dump(tmp / f"{name}.json", strip_docs(keep_operations(model, ops)))
        _dump(tmp / MARKER, {"format": FORMAT, "botocore": _botocore_version(),
                             "agent": agent, "services": list(SERVICES)})
        if target.exists():  # an older format or an unfinished copy: replace it
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if find(root) is None:  # a racing builder got there first: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.glob("botocore-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def attach(session: Any, path: os.PathLike[str] | str) -> None:
    """Make a botocore session (before its first client) load from ``path`` first.

    After any ``AWS_DATA_PATH`` the operator set, which keeps precedence; with
    ``make_loader``'s dict parsing.
    """
    theirs = session.get_config_variable("data_path")
    data_path = os.pathsep.join(p for p in (theirs, str(path)) if p)
    session.set_config_variable("data_path", data_path)
    session.register_component("data_loader", make_loader(data_path))


def make_loader(data_path: str) -> Any:
    """botocore's ``Loader`` for ``data_path`` (as ``AWS_DATA_PATH``), parsing JSON to dicts,
    without a walk over every service's data to load one model.

    botocore parses every data file with ``object_pairs_hook=OrderedDict``; since
    Python 3.7 a dict keeps its order too, at about half the size, and nothing in
    botocore, boto3 or s3transfer depends on the type (measured: 1 MiB less for the
    daemon's S3 client; no ``isinstance(..., OrderedDict)`` or ``move_to_end`` in them).
    Search order and gzip handling are botocore's own.

    Before it loads a service's model (``service-2``, ``endpoint-rule-set-1``), botocore's
    ``load_service_model`` checks that the service is one it knows, with
    ``list_available_services``: a directory listing of each of some 400 services in each
    search path, and two ``stat`` calls per service, once for the model and once for its
    endpoint rule set (measured: ~12 ms of CPU at the start of every process that makes an
    S3 client, of the ~185 ms a restore spends before its first request). Here that check
    looks in the one service's directories first: the same answer when it has the data
    (the model is then loaded from where botocore would load it), and botocore's own walk,
    with its error, when it does not.
    """
    import gzip
    import threading

    from botocore.loaders import JSONFileLoader, Loader

    class DictJSONFileLoader(JSONFileLoader):
        def load_file(self, file_path: str) -> Any:
            for ext, opener in ((".json", open), (".json.gz", gzip.open)):
                if os.path.isfile(file_path + ext):
                    with opener(file_path + ext, "rb") as f:
                        return json.loads(f.read().decode("utf-8"))
            return None

    class ServiceFirstLoader(Loader):  # type: ignore[misc]
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self._loading = threading.local()

        def _has(self, service: str, type_name: str) -> bool:
            """Whether some search path holds ``type_name`` data of ``service``, the test
            ``list_available_services`` makes for each service."""
            for root in self.search_paths:
                svc = os.path.join(root, service)
                if not os.path.isdir(svc):
                    continue
                for version in os.listdir(svc):
                    if self.file_loader.exists(os.path.join(svc, version, type_name)):
                        return True
            return False

        def list_available_services(self, type_name: str) -> list[str]:
            wanted = getattr(self._loading, "service", None)
            if wanted is not None and self._has(wanted, type_name):
                return [wanted]  # all that load_service_model asks: is ``wanted`` known
            return list(super().list_available_services(type_name))

        def load_service_model(self, service_name: str, type_name: str,
                               api_version: str | None = None) -> Any:
            self._loading.service = service_name
            try:
                return super().load_service_model(service_name, type_name, api_version)
            finally:
                self._loading.service = None

    paths = [os.path.expanduser(os.path.expandvars(p))
             for p in data_path.split(os.pathsep) if p]
    return ServiceFirstLoader(extra_search_paths=paths, file_loader=DictJSONFileLoader())


def ensure(root: Path, timeout: float = BUILD_TIMEOUT_S) -> Path | None:
    """The copies, built by a child process if missing; None if that fails.

    Failing is never fatal: the agent then runs on botocore's full data, only larger.
    """
    found = find(root)
    if found is not None:
        return found
    try:
        proc = subprocess.run([sys.executable, "-m", "agent.aws.botodata", str(root)],
                              capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot build lean botocore data in %s: %s", root, exc)
        return None
    if proc.returncode != 0:
        log.warning("cannot build lean botocore data in %s: %s", root,
                    (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
        return None
    return find(root)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m agent.aws.botodata DIR", file=sys.stderr)
        return 2
    print(build(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
