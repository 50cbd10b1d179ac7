"""agent.config.memo: the validated-config memo and the daemon's child validation.

What must hold: the memo is used only for exactly the layers it was made from; a
memo that is stale, garbled or forged for other layers is never trusted; the child
gives the same Config, and the same errors, as validating in-process; and a process
that uses the memo or the child never imports jsonschema (why the module exists).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import memo as configcache
from agent.config import model as config

BAKED = {"group": "web", "store": {"bucket": "my-bucket", "prefix": "p"},
         "heartbeat": {"interval_s": 5}}
USER = {"vars": {"env": "prod"}}
BUNDLE = {"vars": {"port": 8080}, "templates": [{"src": "a.j2", "dest": "/etc/a.conf"}]}
BAD_BUNDLE = {"vars": {"port": 8080}, "templatez": [], "heartbeat": {"interval_s": "fast"}}


def _in_fresh_process(code: str, state_dir: Path) -> dict[str, Any]:
    """Run ``code`` (which sets ``out``) in a new interpreter; returns ``out`` + modules."""
    prog = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from agent.config import memo as configcache
        from agent.config import model as config
        state_dir = Path({str(state_dir)!r})
        BAKED, USER, BUNDLE, BAD = json.loads({json.dumps(json.dumps(
            [BAKED, USER, BUNDLE, BAD_BUNDLE]))})
        out = {{}}
    """) + textwrap.dedent(code) + textwrap.dedent("""
        out["jsonschema_loaded"] = "jsonschema" in sys.modules
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_memo_is_written_and_reused_without_jsonschema(tmp_path: Path) -> None:
    cfg = configcache.validated_config(tmp_path, BAKED, USER, BUNDLE)
    memo = json.loads((tmp_path / configcache.MEMO).read_text())
    assert memo["key"] == config.layers_digest(BAKED, USER, BUNDLE)
    assert oct((tmp_path / configcache.MEMO).stat().st_mode & 0o777) == "0o600"
    out = _in_fresh_process("""
        cfg = configcache.validated_config(state_dir, BAKED, USER, BUNDLE, isolate=True)
        out["raw"] = cfg.raw
    """, tmp_path)
    assert out == {"raw": cfg.raw, "jsonschema_loaded": False}


def test_isolated_validation_matches_in_process_and_never_imports_jsonschema(
        tmp_path: Path) -> None:
    want = config.load_layers(BAKED, USER, BUNDLE)
    with pytest.raises(config.ConfigInvalid) as bad:
        config.load_layers(BAKED, USER, BAD_BUNDLE)
    out = _in_fresh_process("""
        out["raw"] = configcache.validated_config(state_dir, BAKED, USER, BUNDLE,
                                                  isolate=True).raw
        try:
            configcache.validated_config(state_dir, BAKED, USER, BAD, isolate=True)
        except config.ConfigInvalid as exc:
            out["issues"] = [[i.layer, i.path, i.message] for i in exc.errors]
            out["message"] = str(exc)
    """, tmp_path)
    assert out["jsonschema_loaded"] is False
    assert out["raw"] == want.raw
    assert out["issues"] == [[i.layer, i.path, i.message] for i in bad.value.errors]
    assert out["message"] == str(bad.value)
    assert len(out["issues"]) == 2 and "templatez" in out["message"]
    # The failed validation did not replace the memo of the good one.
    memo = json.loads((tmp_path / configcache.MEMO).read_text())
    assert memo["key"] == config.layers_digest(BAKED, USER, BUNDLE)


def test_a_memo_for_other_layers_is_not_used(tmp_path: Path) -> None:
    configcache.validated_config(tmp_path, BAKED, USER, BUNDLE)
    # The operator breaks the baked file: it must be caught, not served from the memo.
    broken = {**BAKED, "heartbeat": {"interval_s": -1}}
    with pytest.raises(config.ConfigInvalid, match="interval_s"):
        configcache.validated_config(tmp_path, broken, USER, BUNDLE)


@pytest.mark.parametrize("memo", [
    "{not json",
    '{"key": "%(key)s"}',
    '{"key": "%(key)s", "config": {"group": "web"}}',
    '{"key": "%(key)s", "config": []}',
    '["%(key)s"]',
])
def test_a_garbled_memo_is_ignored_and_replaced(tmp_path: Path, memo: str) -> None:
    key = config.layers_digest(BAKED, USER, BUNDLE)
    (tmp_path / configcache.MEMO).write_text(memo % {"key": key})
    cfg = configcache.validated_config(tmp_path, BAKED, USER, BUNDLE)
    assert cfg == config.load_layers(BAKED, USER, BUNDLE)
    assert json.loads((tmp_path / configcache.MEMO).read_text())["config"] == cfg.raw


def test_layers_that_do_not_survive_json_are_validated_in_process_and_not_remembered(
        tmp_path: Path) -> None:
    user = {"vars": {"since": datetime.date(2026, 11, 27)}}  # YAML gives dates
    cfg = configcache.validated_config(tmp_path, BAKED, user, None, isolate=True)
    assert cfg.vars["since"] == datetime.date(2026, 11, 27)
    assert not (tmp_path / configcache.MEMO).exists()


def test_an_unwritable_state_dir_costs_only_the_memo(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("x")
    cfg = configcache.validated_config(blocked, BAKED, USER, BUNDLE)
    assert cfg == config.load_layers(BAKED, USER, BUNDLE)


VARS = st.dictionaries(st.text(min_size=1, max_size=4),
                       st.integers() | st.text(max_size=4) | st.booleans(), max_size=3)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=VARS, b=VARS, layer=st.sampled_from([0, 1, 2]))
def test_digest_tells_any_two_different_layer_sets_apart(a: dict, b: dict, layer: int) -> None:
    def layers(v: dict) -> list[Any]:
        out: list[Any] = [dict(BAKED), dict(USER), dict(BUNDLE)]
        out[layer] = {**out[layer], "vars": v}
        return out

    same = config.layers_digest(*layers(a)) == config.layers_digest(*layers(b))
    assert same == (layers(a) == layers(b))


def test_daemon_validates_bundle_updates_apart_and_keeps_the_old_config_on_errors(
        cloud) -> None:
    """A running daemon: a bad bundle is refused with the child's error, a good one lands
    (through the child, re-rendered), and the memo then holds the new layers."""
    from agent.sim.fleet import fast_config
    from agent.sim.netutil import stop_process, wait_for

    cfg = fast_config(cloud, "cc", interval_s=0.5, heal={"mode": "off"},
                      bundle={"refresh_s": 1})
    cloud.ensure_bucket()
    files = {"agent.yaml": "vars: {port: 8080}\ntemplates:\n"
                           "  - {src: s.conf.j2, dest: /etc/demo/s.conf}\n",
             "s.conf.j2": "port {{ vars.port }}\n"}
    cloud.push_bundle("cc", files)
    iid = cloud.run_standalone("cc", 1, cfg)[0]
    inst = cloud.instances[iid]
    assert cloud.boot_all([iid]) == {iid: 0}
    rendered = inst.root / "etc/demo/s.conf"
    assert rendered.read_text() == "port 8080\n"
    p = cloud.spawn(iid, "run")

    def daemon() -> dict:
        return (inst.state() or {}).get("daemon") or {}

    def wait(pred, timeout: float = 120.0) -> Any:  # a ceiling for a busy machine (#16)
        return wait_for(pred, timeout, 0.2, what=lambda: f"daemon state {daemon()}")

    try:
        wait(lambda: daemon().get("tasks", {}).get("refresh", {}).get("runs", 0) >= 1)
        # Valid on its own (push checks that), invalid merged with the baked layers:
        # the heartbeat would be slower than half of dead_after (3 s).
        cloud.push_bundle("cc", {**files, "agent.yaml": files["agent.yaml"]
                                 + "heartbeat: {interval_s: 2}\n"})
        err = wait(lambda: daemon().get("tasks", {}).get("refresh", {}).get("last_error"))
        assert "heartbeat.interval_s" in err, err
        assert rendered.read_text() == "port 8080\n"  # nothing applied
        good = {**files, "agent.yaml": files["agent.yaml"].replace("8080", "9090")}
        cloud.push_bundle("cc", good)
        wait(lambda: rendered.read_text() == "port 9090\n")
        assert p.poll() is None
        memo = json.loads((inst.root / "var/lib/ec2-agent" / configcache.MEMO).read_text())
        assert memo["config"]["vars"]["port"] == 9090
    finally:
        stop_process(p)


def _load_context_in_child(cloud, inst) -> dict:
    """``instance.load_context`` in a fresh interpreter, as ``ec2-agent run`` starts."""
    prog = textwrap.dedent("""
        import json, sys
        from agent.boot.instance import load_context
        from agent.paths import Paths
        out = {}
        try:
            ctx = load_context(Paths.from_env())
            out["vars"] = ctx.config.vars
            out["bundle"] = ctx.bundle_config
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["modules"] = sorted(m for m in ("yaml", "jsonschema") if m in sys.modules)
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          timeout=120, env=inst.env(cloud))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_daemon_start_parses_no_yaml_and_sees_an_edited_baked_file(cloud) -> None:
    cloud.ensure_bucket()
    cloud.push_bundle("cc", {"agent.yaml": "vars: {port: 8080}\n"})
    iid = cloud.run_standalone("cc", 1, cloud.agent_config("cc", heal={"mode": "off"}))[0]
    inst = cloud.instances[iid]
    baked = inst.root / "etc/ec2-agent/agent.yaml"
    baked.parent.mkdir(parents=True)
    baked.write_text("vars: {tier: web}\n")
    assert cloud.boot_all([iid]) == {iid: 0}
    layers = json.loads((inst.root / "var/lib/ec2-agent/instance.json").read_text())["layers"]
    assert layers["baked"] == {"vars": {"tier": "web"}} and layers["bundle_version"] == 1

    # Unchanged sources: from instance.json and the memo.
    out = _load_context_in_child(cloud, inst)
    assert out == {"vars": {"tier": "web", "port": 8080}, "bundle": {"vars": {"port": 8080}},
                   "modules": []}

    # The operator edits the baked file and restarts the daemon: a child parses it.
    baked.write_text("vars: {tier: api}\n")
    out = _load_context_in_child(cloud, inst)
    assert out["vars"] == {"tier": "api", "port": 8080} and out["modules"] == []
    layers = json.loads((inst.root / "var/lib/ec2-agent/instance.json").read_text())["layers"]
    assert layers["baked"] == {"vars": {"tier": "api"}}  # remembered for the next start

    # ... and breaks it: the error names the file and the line, as in-process.
    baked.write_text("vars: {tier: api\n")
    out = _load_context_in_child(cloud, inst)
    with pytest.raises(Exception) as in_process:
        config.load_yaml_file(baked)
    assert out["error"] == f"ConfigError: {in_process.value}" and "line" in out["error"]
    assert out["modules"] == []
    baked.write_text("heartbeat: {interval_s: -5}\n")
    out = _load_context_in_child(cloud, inst)
    assert out["error"].startswith("ConfigInvalid") and "interval_s" in out["error"]
    assert "baked /etc/ec2-agent/agent.yaml: heartbeat.interval_s" in out["error"]


def test_bundle_layer_is_read_with_the_capped_loader(tmp_path: Path) -> None:
    """The bundle's agent.yaml goes through the one YAML loader with its caps (it used a
    bare yaml.safe_load): an alias bomb and an oversized file are refused, naming the layer."""
    from agent.config.memo import read_bundle_config
    from agent.config.model import MAX_CONFIG_FILE_BYTES
    from agent.errors import ConfigError

    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        prev = chr(ord("a") + i - 1)
        bomb.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} " + "[" + ", ".join(
            [f"*{prev}"] * 10) + "]")
    (tmp_path / "agent.yaml").write_text("\n".join(bomb) + "\n")
    with pytest.raises(ConfigError) as info:
        read_bundle_config(tmp_path, 7)
    assert "bundle" in str(info.value) and "version 7" in str(info.value)
    (tmp_path / "agent.yaml").write_bytes(b"vars: {k: v}\n" + b"#" * MAX_CONFIG_FILE_BYTES)
    with pytest.raises(ConfigError, match="allowed"):
        read_bundle_config(tmp_path)
    (tmp_path / "agent.yaml").unlink()
    assert read_bundle_config(tmp_path) is None
