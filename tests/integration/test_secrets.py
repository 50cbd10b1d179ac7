"""secret("ssm:/...") and secret("secretsmanager:...") against moto; values never leak."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from agent.aws.imds import Identity
from agent.aws.secrets import SecretResolver, parse_ref
from agent.aws.store import Store
from agent.boot.run import run_boot
from agent.bundle.apply import render_all
from agent.bundle.publish import push
from agent.config.model import load_layers
from agent.errors import RenderError
from agent.paths import Paths

VALUE = "pa55-w0rd-VALUE"
API = "api-k3y-VALUE"
IDENT = Identity(instance_id="i-0abc", ami_id="ami-1", instance_type="t3.micro",
                 region="us-east-1", availability_zone="us-east-1a", local_ipv4="10.0.0.5",
                 account_id="123456789012")


@pytest.fixture
def secrets(moto) -> None:
    boto3.client("ssm", "us-east-1").put_parameter(Name="/db/pass", Value=VALUE,
                                                 Type="SecureString")
    boto3.client("secretsmanager", "us-east-1").create_secret(Name="api", SecretString=API)


def test_resolves_both_kinds_and_caches(secrets: None) -> None:
    r = SecretResolver("us-east-1")
    assert r("ssm:/db/pass") == VALUE
    assert r("secretsmanager:api") == API
    assert r("ssm:/db/pass") == VALUE
    assert r.used == ("ssm:/db/pass", "secretsmanager:api")
    assert r.redact(f"x {VALUE} y {API}") == "x *** y ***"


@pytest.mark.parametrize("ref,needle", [
    ("ssm:/no/such", "ParameterNotFound"),
    ("secretsmanager:nope", "ResourceNotFoundException"),
])
def test_missing_secret_names_the_reference(secrets: None, ref: str, needle: str) -> None:
    with pytest.raises(RenderError) as exc:
        SecretResolver("us-east-1")(ref)
    assert ref in str(exc.value) and needle in str(exc.value)


@pytest.mark.parametrize("ref", ["vault:x", "ssm:", "nothing", "ssm:a/b"])
def test_bad_references(ref: str) -> None:
    with pytest.raises(RenderError):
        parse_ref(ref)


def test_rendered_file_is_0600_and_check_output_redacted(secrets: None, tmp_path: Path,
                                                         root: Path) -> None:
    b = tmp_path / "b"
    b.mkdir()
    (b / "app.env.j2").write_text("DB={{ secret('ssm:/db/pass') }}\n"
                                  "API={{ secret('secretsmanager:api') }}\n")
    (b / "plain.j2").write_text("x\n")
    paths = Paths(root)
    cfg = load_layers(None, {"group": "web", "store": {"bucket": "fleet-bucket"}, "templates": [
        {"src": "app.env.j2", "dest": "/etc/app.env", "mode": "0644"},
        {"src": "plain.j2", "dest": "/etc/plain"},
    ]})
    r = render_all(cfg, b, paths=paths, identity=IDENT)
    assert r.ok, r.errors
    app = paths.rooted("/etc/app.env")
    assert app.read_text() == f"DB={VALUE}\nAPI={API}\n"
    assert app.stat().st_mode & 0o777 == 0o600
    assert paths.rooted("/etc/plain").stat().st_mode & 0o777 == 0o644
    assert r.files[0].secrets == ("ssm:/db/pass", "secretsmanager:api")
    # A check that echoes the staged file: its output is recorded, the values are not.
    cfg2 = load_layers(None, {"group": "web", "store": {"bucket": "fleet-bucket"}, "templates": [
        {"src": "app.env.j2", "dest": "/etc/app2.env", "check": "cat {staged} >&2; exit 1"},
    ]})
    r2 = render_all(cfg2, b, paths=paths, identity=IDENT)
    assert not r2.ok
    text = json.dumps(r2.to_json()) + " ".join(r2.errors)
    assert "DB=***" in text and VALUE not in text and API not in text


def test_boot_with_secrets_keeps_values_out_of_state(cloud, instance, tmp_path: Path,
                                                     secrets: None) -> None:
    b = tmp_path / "bundle"
    b.mkdir()
    (b / "app.env.j2").write_text("DB={{ secret('ssm:/db/pass') }}\n")
    (b / "agent.yaml").write_text(
        "templates:\n  - {src: app.env.j2, dest: /etc/app/app.env}\n")
    push(Store(cloud.bucket, cloud.prefix), "web", b)
    paths = Paths(instance.root)
    st = run_boot(paths)
    assert st["status"] == "done", st["errors"]
    assert paths.rooted("/etc/app/app.env").read_text() == f"DB={VALUE}\n"
    assert paths.rooted("/etc/app/app.env").stat().st_mode & 0o777 == 0o600
    state_text = paths.state_file.read_text()
    assert VALUE not in state_text
    import contextlib
    import io

    from agent.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["status", "--json"])
    assert VALUE not in out.getvalue()
