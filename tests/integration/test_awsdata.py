"""Lean botocore data (agent.aws.botodata): built all-or-nothing, and clients behave the same.

The equivalence test resolves real AWS endpoints without sending anything: a
``before-call`` handler answers every call (as botocore's Stubber does), and a
``before-send`` handler raises, so even a mistake could not leave the process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import botocore
import botocore.awsrequest
import botocore.session
import pytest

from agent.aws import botodata as awsdata
from agent.sim.cloud import EmbeddedCloud
from agent.sim.fleet import fast_config
from agent.sim.netutil import stop_process, wait_for

CALLS = {
    "s3": ("GetObject", {"Bucket": "my-bucket", "Key": "k/1"}),
    "ec2": ("DescribeInstances", {"InstanceIds": ["i-0123456789abcdef0"]}),
    "autoscaling": ("DescribeAutoScalingGroups", {"AutoScalingGroupNames": ["g"]}),
    "ssm": ("GetParameter", {"Name": "/app/db"}),
    "secretsmanager": ("GetSecretValue", {"SecretId": "app/db"}),
}
REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2", "cn-north-1", "us-gov-west-1",
           "us-iso-east-1")


@pytest.fixture(scope="module")
def lean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return awsdata.build(tmp_path_factory.mktemp("aws-data"))


def _session(data_path: Path | None) -> Any:
    """botocore's own session, or one set up exactly as the agent's (aws._session)."""
    s = botocore.session.get_session()
    if data_path is not None:
        awsdata.attach(s, data_path)
    return s


def _resolve(session: Any, service: str, region: str) -> dict[str, Any]:
    """Where a call would go, and how it would be signed, with nothing sent."""
    op, params = CALLS[service]
    client = session.create_client(service, region_name=region)
    seen: dict[str, Any] = {}

    def answer(params: dict[str, Any], context: dict[str, Any], **_: Any) -> Any:
        seen.update(url=params["url"], method=params["method"],
                    signing=dict(context.get("signing") or {}),
                    auth=context.get("auth_type"))
        return (botocore.awsrequest.AWSResponse(params["url"], 200, {}, None), {})

    def never(**_: Any) -> None:
        raise AssertionError("a request was about to be sent")

    client.meta.events.register(f"before-call.*.{op}", answer)
    client.meta.events.register_first("before-send", never)
    getattr(client, botocore.xform_name(op))(**params)
    model = client.meta.service_model
    shapes = {}
    for name in model.operation_names:
        om = model.operation_model(name)
        shapes[name] = (om.http.get("method"), om.http.get("requestUri"),
                        sorted(om.input_shape.members) if om.input_shape else None,
                        sorted(om.output_shape.members) if om.output_shape else None)
    return {"call": seen, "endpoint": client.meta.endpoint_url,
            "partition": client.meta.partition, "sigv": client.meta.config.signature_version,
            "operations": shapes, "metadata": {k: v for k, v in model.metadata.items()}}


@pytest.mark.parametrize("service", sorted(CALLS))
def test_lean_clients_resolve_sign_and_model_exactly_as_botocore(
        service: str, lean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("AWS_ENDPOINT_URL"):
            monkeypatch.delenv(k)  # real endpoint resolution, for comparison only
    full, slim = _session(None), _session(lean)
    for region in REGIONS:
        a, b = _resolve(full, service, region), _resolve(slim, service, region)
        assert a["call"]["url"].startswith("https://"), a
        ops_a, ops_b = a.pop("operations"), b.pop("operations")
        assert a == b, (service, region)
        # Fewer operations, each exactly as botocore models it.
        assert ops_b and ops_b.items() <= ops_a.items()
    # ... and the lean session really read the lean files, as plain dicts.
    loader = slim.get_component("data_loader")
    data, where = loader.load_data_with_path("endpoints")
    assert where.startswith(str(lean)) and type(data) is dict


def test_every_operation_the_agent_calls_is_kept(lean: Path) -> None:
    """Independently of the builder's scan: every ``x.op(...)`` in agent/ (an AST walk)
    that names an operation of a service the agent uses is in that service's copy."""
    import ast

    full = botocore.session.get_session()
    slim = _session(lean)
    calls: set[str] = set()
    pkg = Path(awsdata.__file__).parent
    for path in pkg.rglob("*.py"):
        if "sim" in path.relative_to(pkg).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                calls.add(node.func.attr)
    checked = 0
    for svc in awsdata.SERVICES:
        every = {botocore.xform_name(op) for op in full.get_service_model(svc).operation_names}
        kept = {botocore.xform_name(op) for op in slim.get_service_model(svc).operation_names}
        assert calls & every <= kept, (svc, sorted(calls & every - kept))
        checked += len(calls & every)
    assert checked >= 12  # get/put/head/list/delete objects, run/describe/terminate, ...


def test_build_is_all_or_nothing_and_keyed_by_botocore_version(tmp_path: Path) -> None:
    root = tmp_path / "aws-data"
    # Left-overs of a crashed build, an older botocore's copies, and an unfinished one:
    (root / ".build-crashed").mkdir(parents=True)
    (root / ".build-crashed" / "endpoints.json").write_text("{")
    (root / "botocore-0.0.1-agent-0").mkdir()
    target = awsdata.version_dir(root)
    assert target.name.startswith(f"botocore-{botocore.__version__}-agent-")
    target.mkdir()
    (target / "endpoints.json").write_text("{")  # no marker: never trusted
    assert awsdata.find(root) is None

    built = awsdata.build(root)
    assert built == target and awsdata.find(root) == target
    assert not (root / "botocore-0.0.1-agent-0").exists()
    marker = json.loads((target / awsdata.MARKER).read_text())
    assert marker == {"format": awsdata.FORMAT, "botocore": botocore.__version__,
                      "agent": target.name.rsplit("-", 1)[1],
                      "services": list(awsdata.SERVICES)}
    for svc in awsdata.SERVICES:
        (model,) = target.glob(f"{svc}/*/service-2.json")
        doc = json.loads(model.read_text())
        assert doc["operations"] and doc["documentation"] == ""
    eps = json.loads((target / "endpoints.json").read_text())
    for p in eps["partitions"]:
        assert set(p["services"]) <= set(awsdata.ENDPOINT_SERVICES)
    assert (target / "endpoints.json").stat().st_size < 200_000  # botocore's: ~1.2 MB

    stamp = (target / awsdata.MARKER).stat().st_mtime_ns
    assert awsdata.build(root) == target  # already there: nothing rewritten
    assert (target / awsdata.MARKER).stat().st_mtime_ns == stamp


def test_ensure_builds_in_a_child_and_failure_is_not_fatal(tmp_path: Path) -> None:
    root = tmp_path / "aws-data"
    assert awsdata.ensure(root) == awsdata.version_dir(root)
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert awsdata.ensure(blocked / "aws-data") is None  # logged; full data is used


def test_agent_session_round_trips_s3_through_moto_on_lean_data(moto, lean: Path) -> None:
    """Store and s3transfer (multipart) work on the lean data, in a fresh process."""
    code = textwrap.dedent(f"""
        import sys
        from agent.aws import session as aws
        assert aws.use_data({str(lean)!r})
        from s3transfer.manager import TransferConfig, TransferManager
        from agent.aws.store import Store
        c = aws.client("s3", "us-east-1")
        c.create_bucket(Bucket="lean")
        s = Store("lean", "p", client=c)
        s.put("a.json", b"{{}}")
        assert s.get("a.json").body == b"{{}}"
        assert [e.key for e in s.list("").entries] == ["a.json"]
        import io
        big = bytes(range(256)) * 40000  # 10 MB: three parts
        with TransferManager(c, TransferConfig(multipart_threshold=5 * 2**20,
                                               multipart_chunksize=5 * 2**20)) as tm:
            tm.upload(io.BytesIO(big), "lean", "p/big").result()
        assert c.get_object(Bucket="lean", Key="p/big")["Body"].read() == big
        loader = aws._session().get_component("data_loader")
        assert loader.load_data_with_path("endpoints")[1].startswith({str(lean)!r})
        assert "jsonschema" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_daemon_builds_the_lean_data_on_first_start(cloud: EmbeddedCloud) -> None:
    cloud.lean_aws_data = False  # an image baked without it
    cfg = fast_config(cloud, "lean", interval_s=0.5, heal={"mode": "off"})
    iid = cloud.run_standalone("lean", 1, cfg)[0]
    inst = cloud.instances[iid]
    data_dir = inst.root / "var/lib/ec2-agent/aws-data"
    assert not data_dir.exists()
    assert cloud.boot_all([iid]) == {iid: 0}
    assert not data_dir.exists()  # boot only uses copies, never builds them
    p = cloud.spawn(iid, "run")
    try:
        def recorded() -> dict | None:
            st = inst.state() or {}
            rec = (st.get("daemon") or {}).get("aws_data")
            # ... once it has heartbeated on it too
            return rec if rec and int((st.get("heartbeat") or {}).get("seq", 0)) >= 2 else None

        # A ceiling above the build's own timeout (awsdata.BUILD_TIMEOUT_S): on a busy
        # machine the first start's child build is slow, not wrong (issue #16).
        rec = wait_for(recorded, awsdata.BUILD_TIMEOUT_S + 120, 0.2,
                       what="aws_data recorded and two heartbeats")
        assert rec["path"] == str(awsdata.version_dir(data_dir))
        assert awsdata.find(data_dir) is not None
        assert p.poll() is None
    finally:
        stop_process(p)


def test_a_model_loads_without_a_walk_over_every_service(lean: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore checks that a service exists by listing every service's data dir (~12 ms
    of CPU per S3 client); the agent's loader looks in that one service's dirs. Same
    answers: a service only botocore's own data has loads, an unknown one is refused by
    botocore's own walk and error."""
    from botocore.exceptions import UnknownServiceError
    from botocore.loaders import Loader

    walks: list[str] = []
    real = Loader.list_available_services

    def walk(self: Any, type_name: str) -> Any:
        walks.append(type_name)
        return real(self, type_name)

    monkeypatch.setattr(Loader, "list_available_services", walk)
    s = _session(lean)
    s.create_client("s3", region_name="us-east-1")
    s.create_client("dynamodb", region_name="us-east-1")  # not in the lean copies
    assert walks == []
    with pytest.raises(UnknownServiceError):
        s.get_component("data_loader").load_service_model("no-such-service", "service-2")
    assert walks == ["service-2"]
