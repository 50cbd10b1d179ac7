"""Writing rendered files: stage, check, swap, .bak, de-duplicated reloads, restore, dry-run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.aws.imds import Identity
from agent.bundle.apply import render_all
from agent.config.model import load_layers
from agent.paths import Paths

IDENT = Identity(instance_id="i-0abc", ami_id="ami-1", instance_type="t3.micro",
                 region="us-east-1", availability_zone="us-east-1a", local_ipv4="10.0.0.5",
                 account_id="123456789012", tags={"Name": "web-1"})


@pytest.fixture
def env(tmp_path: Path, root: Path) -> dict:
    bdir = tmp_path / "bundle"
    bdir.mkdir()
    (bdir / "nginx.conf.j2").write_text("listen {{ vars.port }};\n")
    (bdir / "site.conf.j2").write_text("server_name {{ instance.id }};\n")
    (bdir / "app.env.j2").write_text("GROUP={{ group }}\nIP={{ instance.ip }}\n")
    log = tmp_path / "reload.log"
    return {"bundle": bdir, "log": log, "paths": Paths(root), "root": root}


def reload_cmd(env: dict, name: str, rc: int = 0) -> str:
    return f"echo {name} >> {env['log']}; exit {rc}"


def config(templates: list[dict], **vars: object):
    return load_layers(None, {"group": "web", "store": {"bucket": "fleet-bucket"},
                              "vars": {"port": 8080, **vars}, "templates": templates})


def run(env: dict, cfg, **kw):
    return render_all(cfg, env["bundle"], paths=env["paths"], identity=IDENT,
                      secret=lambda ref: "unused", **kw)


def reloads(env: dict) -> list[str]:
    return env["log"].read_text().split() if env["log"].exists() else []


def dest(env: dict, p: str) -> Path:
    return env["paths"].rooted(p)


def test_write_then_unchanged_means_no_write_no_reload(env: dict) -> None:
    cfg = config([
        {"src": "nginx.conf.j2", "dest": "/etc/nginx/nginx.conf", "mode": "0640",
         "reload": reload_cmd(env, "nginx")},
        {"src": "site.conf.j2", "dest": "/etc/nginx/site.conf", "reload": reload_cmd(env, "nginx")},
        {"src": "app.env.j2", "dest": "/etc/app/app.env", "reload": reload_cmd(env, "app")},
    ])
    r = run(env, cfg)
    assert r.ok, r.errors
    assert [f.action for f in r.files] == ["wrote"] * 3
    assert reloads(env) == ["nginx", "app"]  # de-duplicated, once each, first-use order
    assert dest(env, "/etc/nginx/nginx.conf").read_text() == "listen 8080;\n"
    assert dest(env, "/etc/nginx/nginx.conf").stat().st_mode & 0o777 == 0o640
    assert dest(env, "/etc/nginx/site.conf").stat().st_mode & 0o777 == 0o644
    assert dest(env, "/etc/app/app.env").read_text() == "GROUP=web\nIP=10.0.0.5\n"
    ino = dest(env, "/etc/nginx/nginx.conf").stat().st_ino
    r2 = run(env, cfg)
    assert [f.action for f in r2.files] == ["unchanged"] * 3 and r2.reloads == ()
    assert reloads(env) == ["nginx", "app"]
    assert dest(env, "/etc/nginx/nginx.conf").stat().st_ino == ino  # not rewritten
    # Only one input changes: only its file is written, only its service reloaded.
    r3 = run(env, config(cfg.raw["templates"], port=9090))
    assert [f.action for f in r3.files] == ["wrote", "unchanged", "unchanged"]
    assert reloads(env) == ["nginx", "app", "nginx"]
    bak = dest(env, "/etc/nginx/nginx.conf.bak")
    assert bak.read_text() == "listen 8080;\n"
    assert not list(dest(env, "/etc/nginx").glob(".*.tmp"))


def test_mode_change_alone_is_a_change(env: dict) -> None:
    t = {"src": "nginx.conf.j2", "dest": "/etc/n.conf", "mode": "0644",
         "reload": reload_cmd(env, "n")}
    run(env, config([t]))
    r = run(env, config([dict(t, mode="0600")]))
    assert [f.action for f in r.files] == ["wrote"]
    assert dest(env, "/etc/n.conf").stat().st_mode & 0o777 == 0o600
    assert reloads(env) == ["n", "n"]


def test_owner_as_current_user(env: dict) -> None:
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    r = run(env, config([{"src": "nginx.conf.j2", "dest": "/etc/o.conf", "owner": me}]))
    assert r.ok and dest(env, "/etc/o.conf").stat().st_uid == os.getuid()
    bad = run(env, config([{"src": "nginx.conf.j2", "dest": "/etc/o2.conf",
                            "owner": "no-such-user-xyz"}]))
    assert bad.files[0].action == "render-failed" and "no-such-user-xyz" in bad.files[0].error


def test_check_sees_staged_file_and_failure_keeps_old(env: dict) -> None:
    t = {"src": "nginx.conf.j2", "dest": "/etc/nginx/nginx.conf",
         "check": "grep -q 'listen 80' {staged}", "reload": reload_cmd(env, "nginx")}
    assert run(env, config([t])).ok
    r = run(env, config([dict(t, check="grep -q 'listen 80;' {staged} || "
                                       "{ echo bad config >&2; exit 3; }")], port=9999))
    assert not r.ok
    f = r.files[0]
    assert f.action == "check-failed" and "exit 3" in f.error and "bad config" in f.error
    assert dest(env, "/etc/nginx/nginx.conf").read_text() == "listen 8080;\n"
    assert reloads(env) == ["nginx"]  # no reload for a refused file
    assert not list(dest(env, "/etc/nginx").glob(".*.tmp"))  # staged file removed


def test_failed_reload_restores_bak_and_reloads_again(env: dict) -> None:
    flag = env["log"].with_name("fail-next")
    cmd = (f"echo nginx >> {env['log']}; if [ -e {flag} ]; then rm {flag}; "
           f"echo reload broke >&2; exit 1; fi")
    t = {"src": "nginx.conf.j2", "dest": "/etc/nginx/nginx.conf", "reload": cmd}
    new = {"src": "app.env.j2", "dest": "/etc/app/new.env", "reload": cmd}
    assert run(env, config([t])).ok
    flag.write_text("")
    r = run(env, config([t, new], port=7777))
    assert not r.ok
    (rl,) = r.reloads
    assert rl.ran and not rl.ok and "reload broke" in rl.error and rl.retry_ok is True
    assert set(rl.restored) == {"/etc/nginx/nginx.conf", "/etc/app/new.env"}
    assert [f.action for f in r.files] == ["restored", "removed"]
    assert dest(env, "/etc/nginx/nginx.conf").read_text() == "listen 8080;\n"
    assert not dest(env, "/etc/app/new.env").exists()  # did not exist before: removed
    assert reloads(env) == ["nginx", "nginx", "nginx"]  # first boot, failed, after restore
    assert any("reload after restore ok" in e for e in r.errors)


def test_failed_reload_twice_records_both(env: dict) -> None:
    t = {"src": "nginx.conf.j2", "dest": "/etc/x.conf", "reload": reload_cmd(env, "x", rc=2)}
    r = run(env, config([t]))
    (rl,) = r.reloads
    assert rl.error == "exit 2" and rl.retry_ok is False and rl.retry_error == "exit 2"
    assert any("reload after restore failed" in e for e in r.errors)


def test_render_error_names_template_and_others_still_apply(env: dict) -> None:
    (env["bundle"] / "broken.j2").write_text("ok\n{{ vars.nope }}\n")
    r = run(env, config([
        {"src": "broken.j2", "dest": "/etc/broken.conf", "reload": reload_cmd(env, "b")},
        {"src": "app.env.j2", "dest": "/etc/app.env", "reload": reload_cmd(env, "a")},
        {"src": "missing.j2", "dest": "/etc/missing.conf"},
    ]))
    assert [f.action for f in r.files] == ["render-failed", "wrote", "render-failed"]
    assert "broken.j2" in r.files[0].error and "line 2" in r.files[0].error
    assert "nope" in r.files[0].error
    assert "not in the bundle" in r.files[2].error
    assert reloads(env) == ["a"]
    assert not dest(env, "/etc/broken.conf").exists()


def test_symlink_escape_in_bundle_refused(env: dict, tmp_path: Path) -> None:
    (tmp_path / "outside.j2").write_text("secret")
    os.symlink(tmp_path / "outside.j2", env["bundle"] / "link.j2")
    r = run(env, config([{"src": "link.j2", "dest": "/etc/l.conf"}]))
    assert r.files[0].action == "render-failed" and "symlink" in r.files[0].error


def test_dry_run_writes_and_runs_nothing(env: dict) -> None:
    t = {"src": "nginx.conf.j2", "dest": "/etc/d.conf", "check": "exit 1",
         "reload": reload_cmd(env, "d")}
    r = run(env, config([t]), dry_run=True)
    assert r.dry_run and [f.action for f in r.files] == ["would-write"]
    assert [(x.command, x.ran) for x in r.reloads] == [(t["reload"], False)]
    assert not dest(env, "/etc/d.conf").exists() and reloads(env) == []
    assert "would reload" in r.summary()


def test_secret_file_is_0600_even_if_mode_says_otherwise(env: dict) -> None:
    (env["bundle"] / "s.j2").write_text("PASS={{ secret('ssm:/db/pass') }}\n")
    r = render_all(config([{"src": "s.j2", "dest": "/etc/s.env", "mode": "0644"}]),
                   env["bundle"], paths=env["paths"], identity=IDENT,
                   secret=lambda ref: "hunter2")
    assert r.ok and r.files[0].secrets == ("ssm:/db/pass",)
    assert dest(env, "/etc/s.env").stat().st_mode & 0o777 == 0o600
    assert "hunter2" not in repr(r) and "hunter2" not in str(r.to_json())


def test_stale_staged_files_are_cleaned(env: dict) -> None:
    d = dest(env, "/etc/c.conf")
    d.parent.mkdir(parents=True)
    stale = d.with_name(".c.conf.abc123.tmp")
    stale.write_text("half")
    assert run(env, config([{"src": "nginx.conf.j2", "dest": "/etc/c.conf"}])).ok
    assert not stale.exists()


def test_example_bundle_renders(env: dict) -> None:
    """templates/example-bundle: valid bundle layer, every template renders (no nginx needed)."""
    from agent.config.memo import read_bundle_config

    example = Path(__file__).resolve().parents[2] / "templates" / "example-bundle"
    layer = read_bundle_config(example)
    for t in layer["templates"]:
        t.pop("check", None)
        t["reload"] = reload_cmd(env, t["reload"].split()[-1])
    cfg = load_layers(None, {"group": "web", "store": {"bucket": "fleet-bucket"}}, layer)
    peers = [{"id": "i-2", "ip": "10.0.0.6", "az": "us-east-1a", "state": "ready"}]
    r = render_all(cfg, example, paths=env["paths"], identity=IDENT, peers=peers,
                   secret=lambda ref: "pw")
    assert r.ok, r.errors
    assert [f.action for f in r.files] == ["wrote", "wrote", "wrote"]
    assert reloads(env) == ["nginx", "app"]  # two files share the nginx reload: run once
    assert "server 10.0.0.6:8080" in dest(env, "/etc/nginx/conf.d/upstream.conf").read_text()
    assert "proxy_pass http://web_app;" in dest(env, "/etc/nginx/nginx.conf").read_text()
    assert dest(env, "/etc/app/app.env").stat().st_mode & 0o777 == 0o600
