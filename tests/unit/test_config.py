"""Config layers, schema errors (key path + layer), defaults, files, redaction."""

from __future__ import annotations

import copy
import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.model import (
    LAYER_BAKED,
    LAYER_BUNDLE,
    LAYER_MERGED,
    LAYER_USER_DATA,
    REDACTED,
    Config,
    ConfigInvalid,
    DepartureConfig,
    HealConfig,
    StoreConfig,
    TemplateSpec,
    apply_defaults,
    defaults,
    is_secret_key,
    layers_digest,
    load_layers,
    load_yaml_file,
    parse_mode,
    redact,
    schema,
    validate_file,
)
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BAKED = {"group": "web", "store": {"bucket": "my-fleet", "prefix": "prod"}}

# The example from DESIGN.md, verbatim in content.
DESIGN_EXAMPLE = yaml.safe_load(
    """
group: web
store: {bucket: my-fleet, prefix: prod}
boot: {deadline_s: 120}
bundle: {refresh_s: 30}
vars: {any: value}
templates:
  - src: nginx.conf.j2
    dest: /etc/nginx/nginx.conf
    mode: "0644"
    check: nginx -t -c {staged}
    reload: systemctl reload nginx
data:
  - {name: app, path: /var/lib/app, backup_interval_s: 300, keep: 10}
heartbeat: {interval_s: 10, dead_after_s: 30}
health:
  - {type: http, url: "http://127.0.0.1:8080/healthz"}
  - {type: process, name: nginx}
heal:
  mode: armed
  action: asg-terminate
  grace_s: 300
  max_per_window: 1
  window_s: 300
  freeze_fraction: 0.34
  confirm_observers: 2
  silent_after_s: 120
"""
)


def errors_of(*layers: dict | None) -> list[str]:
    with pytest.raises(ConfigInvalid) as info:
        load_layers(*layers)
    assert isinstance(info.value, ConfigError)
    return [str(e) for e in info.value.errors]


# --- the happy path and defaults ----------------------------------------------


def test_design_example_loads() -> None:
    cfg = load_layers(DESIGN_EXAMPLE, None)
    assert cfg.group == "web"
    assert cfg.store == StoreConfig(bucket="my-fleet", prefix="prod", region=None)
    assert cfg.templates == (
        TemplateSpec(
            src="nginx.conf.j2",
            dest="/etc/nginx/nginx.conf",
            mode="0644",
            check="nginx -t -c {staged}",
            reload="systemctl reload nginx",
        ),
    )
    assert cfg.templates[0].mode_int == 0o644
    assert [h.type for h in cfg.health] == ["http", "process"]
    assert cfg.data[0].keep == 10 and cfg.data[0].chunk_size is None
    assert cfg.vars == {"any": "value"}


def test_defaults_are_the_design_example_values() -> None:
    cfg = load_layers({"group": "web", "store": {"bucket": "my-fleet"}}, None)
    assert cfg.boot.deadline_s == 120
    assert cfg.bundle.refresh_s == 30 and cfg.bundle.keep == 3
    assert (cfg.heartbeat.interval_s, cfg.heartbeat.dead_after_s) == (10, 30)
    assert cfg.heal == HealConfig(**defaults("heal"))
    assert cfg.heal.mode == "armed" and cfg.heal.freeze_fraction == 0.34
    assert cfg.heal.replace_silent is True and cfg.heal.failed_before_freeze == 3
    assert (cfg.membership.quiescence_min_s, cfg.membership.quiescence_max_s) == (5, 30)
    # A fixed probe port (one security-group rule), documented where operators look.
    assert cfg.http.port == defaults("http")["port"] == 7467 and cfg.http.enabled
    assert "TCP 7467" in (ROOT / "docs" / "operations.md").read_text()
    assert cfg.templates == () and cfg.data == () and cfg.health == () and cfg.vars == {}
    assert cfg.store.prefix == "" and cfg.store.region is None
    # The example's values are exactly the defaults: applying defaults to it changes nothing
    # it set, and loading it gives the same records as the minimal config (but for lists/vars).
    full = load_layers(DESIGN_EXAMPLE, None)
    assert (full.heal, full.heartbeat, full.boot) == (cfg.heal, cfg.heartbeat, cfg.boot)


def test_record_defaults_match_schema_defaults() -> None:
    """A config built from the minimal layers carries exactly the schema's defaults."""
    raw = load_layers(BAKED, None).raw
    for section in ("boot", "bundle", "heartbeat", "heal", "membership", "departure", "http",
                    "log"):
        assert raw[section] == defaults(section), section
    assert load_layers(BAKED, None).departure == DepartureConfig.from_raw(defaults("departure"))


def test_config_is_frozen_and_raw_has_defaults() -> None:
    cfg = load_layers(BAKED, None)
    assert isinstance(cfg, Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.group = "x"  # type: ignore[misc]
    assert cfg.raw["heal"]["mode"] == "armed"
    assert cfg.raw["store"] == {"bucket": "my-fleet", "prefix": "prod", "region": None}
    json.dumps(cfg.raw)  # plain data


def test_layers_are_not_modified() -> None:
    baked = copy.deepcopy(BAKED)
    ud = {"heal": {"mode": "dry-run"}}
    bundle = {"vars": {"a": [1]}}
    cfg = load_layers(baked, ud, bundle)
    cfg.raw["vars"]["a"].append(2)
    assert (baked, ud, bundle) == (BAKED, {"heal": {"mode": "dry-run"}}, {"vars": {"a": [1]}})


def test_health_defaults_and_template_mode_default() -> None:
    cfg = load_layers(
        {
            **BAKED,
            "health": [{"type": "tcp", "port": 22}],
            "templates": [{"src": "a.j2", "dest": "/etc/a"}],
        },
        None,
    )
    assert cfg.health[0].host == "127.0.0.1" and cfg.health[0].timeout_s == 5
    assert cfg.health[0].failures_before_critical == 3
    assert cfg.templates[0].mode is None and cfg.templates[0].mode_int is None


# --- precedence -----------------------------------------------------------------


def test_precedence_baked_user_data_bundle() -> None:
    baked = {**BAKED, "heal": {"mode": "off", "grace_s": 10}, "vars": {"a": 1, "b": 1, "c": 1}}
    ud = {"heal": {"mode": "dry-run"}, "vars": {"b": 2, "c": 2}}
    bundle = {
        "heal": {"grace_s": 99},
        "vars": {"c": 3},
        "health": [{"type": "process", "name": "x"}],
    }
    cfg = load_layers(baked, ud, bundle)
    assert cfg.heal.mode == "dry-run"  # user-data over baked
    assert cfg.heal.grace_s == 99  # bundle over baked
    assert cfg.vars == {"a": 1, "b": 2, "c": 3}
    assert cfg.health[0].name == "x"


def test_lists_replace_whole() -> None:
    baked = {
        **BAKED,
        "health": [{"type": "process", "name": "a"}, {"type": "process", "name": "b"}],
    }
    cfg = load_layers(baked, None, {"health": []})
    assert cfg.health == ()


def test_group_and_store_from_user_data() -> None:
    cfg = load_layers(None, {"group": "api", "store": {"bucket": "b-1"}})
    assert cfg.group == "api" and cfg.store.bucket == "b-1"
    cfg = load_layers(BAKED, {"store": {"prefix": "staging"}})
    assert cfg.store == StoreConfig(bucket="my-fleet", prefix="staging", region=None)


@pytest.mark.parametrize("key", ["group", "store"])
def test_group_or_store_from_bundle_rejected(key: str) -> None:
    bundle = {"group": "other"} if key == "group" else {"store": {"bucket": "evil-bucket"}}
    errs = errors_of(BAKED, None, bundle)
    assert errs == [
        f"{LAYER_BUNDLE}: {key}: may not be set by the bundle (it says where the bundle is); "
        "set it in the baked config or user-data"
    ]


@settings(max_examples=100, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "grace_s": st.integers(0, 1000),
            "window_s": st.integers(1, 1000),
            "max_per_window": st.integers(1, 5),
            "mode": st.sampled_from(["armed", "dry-run", "off"]),
        },
    ),
    st.fixed_dictionaries(
        {},
        optional={"grace_s": st.integers(0, 1000), "mode": st.sampled_from(["armed", "off"])},
    ),
    st.fixed_dictionaries(
        {},
        optional={"window_s": st.integers(1, 1000), "mode": st.sampled_from(["dry-run"])},
    ),
)
def test_property_highest_layer_wins(baked_heal: dict, ud_heal: dict, bundle_heal: dict) -> None:
    cfg = load_layers({**BAKED, "heal": baked_heal}, {"heal": ud_heal}, {"heal": bundle_heal})
    heal = defaults("heal")
    for key in ("grace_s", "window_s", "max_per_window", "mode"):
        for layer in (bundle_heal, ud_heal, baked_heal):
            if key in layer:
                expected = layer[key]
                break
        else:
            expected = heal[key]
        assert getattr(cfg.heal, key) == expected


# --- errors: key path, expectation, layer -----------------------------------


@pytest.mark.parametrize(
    ("layer_index", "doc", "path", "expect"),
    [
        (0, {"heal": {"freeze_fraction": 0}}, "heal.freeze_fraction", "expected a number > 0"),
        (0, {"heal": {"freeze_fraction": 1.5}}, "heal.freeze_fraction", "expected a number <= 1"),
        (1, {"heal": {"confirm_observers": 0}}, "heal.confirm_observers", ">= 1"),
        (1, {"heal": {"mode": "on"}}, "heal.mode", "expected one of: armed, dry-run, off"),
        (1, {"heal": {"action": "reboot"}}, "heal.action", "asg-mark, asg-terminate, launch, hook"),
        (1, {"heal": {"replace_silent": "yes"}}, "heal.replace_silent", "expected true or false"),
        (
            2,
            {"templates": [{"src": "a", "dest": "/a"}, {"src": "b", "dest": "etc/b"}]},
            "templates[1].dest",
            "expected an absolute path",
        ),
        (
            2,
            {"templates": [{"src": "a", "dest": "/a", "mode": "999"}]},
            "templates[0].mode",
            'octal mode like "0644"',
        ),
        (
            2,
            {"templates": [{"src": "a", "dest": "/a", "mode": "rw"}]},
            "templates[0].mode",
            "octal",
        ),
        (
            2,
            {"templates": [{"src": "a", "dest": "/a", "mode": 420}]},
            "templates[0].mode",
            "unquoted 0644 is read by YAML as the number 420",
        ),
        (
            2,
            {"templates": [{"src": "../etc/passwd", "dest": "/a"}]},
            "templates[0].src",
            "relative path inside the bundle",
        ),
        (2, {"templates": [{"src": "/abs", "dest": "/a"}]}, "templates[0].src", "no leading '/'"),
        (2, {"templates": [{"dest": "/a"}]}, "templates[0].src", "is required"),
        (2, {"data": [{"name": "a b", "path": "/x"}]}, "data[0].name", "1-64 letters"),
        (2, {"data": [{"name": "a", "path": "/x", "keep": 0}]}, "data[0].keep", ">= 1"),
        (2, {"health": [{"type": "http"}]}, "health[0].url", "is required (for type: http)"),
        (2, {"health": [{"type": "tcp"}]}, "health[0].port", "is required (for type: tcp)"),
        (2, {"health": [{"type": "process"}]}, "health[0].name", "(for type: process)"),
        (2, {"health": [{"type": "command"}]}, "health[0].command", "(for type: command)"),
        (2, {"health": [{"type": "ping"}]}, "health[0].type", "http, tcp, process, command"),
        (2, {"health": [{"type": "http", "url": "ftp://x"}]}, "health[0].url", "http:// or"),
        (0, {"store": {"bucket": "My_Bucket"}}, "store.bucket", "an S3 bucket name"),
        (0, {"store": {"bucket": "ok-bucket", "prefix": "/prod/"}}, "store.prefix", "no leading"),
        (0, {"store": {"bucket": "ok-bucket", "region": "Europe"}}, "store.region", "eu-west-1"),
        (0, {"group": "web/../x"}, "group", "1-64 letters"),
        (0, {"group": "x" * 65}, "group", "1-64 letters"),
        (1, {"heartbeat": {"interval_s": -1}}, "heartbeat.interval_s", "> 0"),
        (1, {"heartbeat": {"interval_s": "10s"}}, "heartbeat.interval_s", "expected a number"),
        (1, {"http": {"port": 70000}}, "http.port", "<= 65535"),
        (1, {"heal": []}, "heal", "expected a mapping, got [] (list)"),
        (1, {"vars": "x"}, "vars", "expected a mapping"),
        (1, {"log": {"level": "trace"}}, "log.level", "debug, info, warning, error"),
    ],
)
def test_schema_errors_name_path_expectation_and_layer(
    layer_index: int, doc: dict, path: str, expect: str
) -> None:
    layers: list[dict | None] = [dict(BAKED), None, None]
    if layer_index == 0:
        layers[0] = {**BAKED, **doc}
    else:
        layers[layer_index] = doc
    name = [LAYER_BAKED, LAYER_USER_DATA, LAYER_BUNDLE][layer_index]
    errs = errors_of(*layers)
    assert len(errs) == 1, errs
    assert errs[0].startswith(f"{name}: {path}: "), errs
    assert expect in errs[0], errs


def test_unknown_keys_caught_everywhere_with_suggestion() -> None:
    errs = errors_of(
        {**BAKED, "hearbeat": {}},
        {"heal": {"freeze_fracton": 0.5}, "store": {"bucket": "ok-bucket", "regoin": "x"}},
        {
            "templates": [{"src": "a", "dest": "/a", "mdoe": "0644"}],
            "health": [{"type": "process", "name": "n", "x": 1}],
        },
    )
    assert any(
        e.startswith(f"{LAYER_BAKED}: hearbeat: unknown key") and "'heartbeat'" in e for e in errs
    )
    assert any(
        e.startswith(f"{LAYER_USER_DATA}: heal.freeze_fracton: unknown")
        and "'freeze_fraction'" in e
        for e in errs
    )
    assert any(
        e.startswith(f"{LAYER_USER_DATA}: store.regoin: unknown") and "'region'" in e for e in errs
    )
    assert any(
        e.startswith(f"{LAYER_BUNDLE}: templates[0].mdoe: unknown") and "'mode'" in e for e in errs
    )
    assert any(e.startswith(f"{LAYER_BUNDLE}: health[0].x: unknown") for e in errs)
    assert len(errs) == 5


def test_all_errors_reported_across_layers() -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_layers(
            {**BAKED, "heal": {"freeze_fraction": 2, "confirm_observers": 0}},
            {"templates": [{"src": "a", "dest": "rel"}]},
            {"group": "x"},
        )
    exc = info.value
    layers = [e.layer for e in exc.errors]
    assert layers == [LAYER_BAKED, LAYER_BAKED, LAYER_USER_DATA, LAYER_BUNDLE]
    paths = [e.path for e in exc.errors]
    assert paths == ["heal.confirm_observers", "heal.freeze_fraction", "templates[0].dest", "group"]
    msg = str(exc)
    assert msg.startswith("4 config errors:")
    for p in paths:
        assert p in msg
    assert exc.path == "heal.confirm_observers" and exc.layer == LAYER_BAKED


def test_required_checked_on_merged_only() -> None:
    # Neither layer alone has group+bucket; merged they do.
    load_layers({"group": "web"}, {"store": {"bucket": "my-fleet"}})
    errs = errors_of({"heal": {"mode": "off"}}, {"store": {"prefix": "p"}})
    assert errs == [
        f"{LAYER_MERGED}: group: is required",
        f"{LAYER_MERGED}: store.bucket: is required",
    ]


def test_nothing_at_all() -> None:
    assert errors_of(None, None) == [
        f"{LAYER_MERGED}: group: is required",
        f"{LAYER_MERGED}: store: is required",
    ]


def test_layer_not_a_mapping() -> None:
    errs = errors_of(["group", "web"], None)  # type: ignore[arg-type]
    assert errs == [f"{LAYER_BAKED}: expected a mapping of settings, got list"]


@pytest.mark.parametrize(
    ("bundle", "path", "expect"),
    [
        (
            {"heartbeat": {"interval_s": 16}},
            "heartbeat.interval_s",
            "must be <= heartbeat.dead_after_s / 2 (15)",
        ),
        ({"heartbeat": {"dead_after_s": 19}}, "heartbeat.interval_s", "/ 2 (9.5)"),
        (
            {"heal": {"silent_after_s": 30}},
            "heal.silent_after_s",
            "must be > heartbeat.dead_after_s (30)",
        ),
        (
            {"membership": {"quiescence_min_s": 40}},
            "membership.quiescence_min_s",
            "<= membership.quiescence_max_s",
        ),
        ({"heal": {"action": "hook"}}, "heal.hook", "is required when heal.action is hook"),
        (
            {"templates": [{"src": "a", "dest": "/x"}, {"src": "b", "dest": "/x"}]},
            "templates[1].dest",
            "duplicate of templates[0].dest",
        ),
        (
            {"data": [{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}]},
            "data[1].name",
            "duplicate",
        ),
    ],
)
def test_cross_field_rules(bundle: dict, path: str, expect: str) -> None:
    errs = errors_of(BAKED, None, bundle)
    assert len(errs) == 1, errs
    assert errs[0].startswith(f"{LAYER_MERGED}: {path}: ")
    assert expect in errs[0]


def test_cross_field_error_says_which_layer_set_the_value() -> None:
    errs = errors_of(BAKED, {"heartbeat": {"interval_s": 20}})
    assert errs[0].endswith("(value from user-data)")
    errs = errors_of(BAKED, None, {"heartbeat": {"dead_after_s": 12}})
    assert "(value from default)" in errs[0]  # interval_s=10 is the default


def test_hook_action_with_hook_from_another_layer() -> None:
    cfg = load_layers(
        {**BAKED, "heal": {"hook": "/usr/local/bin/replace"}}, None, {"heal": {"action": "hook"}}
    )
    assert cfg.heal.action == "hook" and cfg.heal.hook == "/usr/local/bin/replace"


def test_heal_mode_unquoted_off() -> None:
    doc = yaml.safe_load("heal: {mode: off}")
    assert doc["heal"]["mode"] is False
    assert load_layers(BAKED, doc).heal.mode == "off"


def test_true_where_enum_expected_gets_yaml_hint() -> None:
    errs = errors_of(BAKED, {"heal": {"mode": True}})
    assert "expected one of: armed, dry-run, off; got true" in errs[0]


# --- modes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "value"),
    [("0644", 0o644), ("644", 0o644), ("0600", 0o600), ("1777", 0o1777), ("0755", 0o755)],
)
def test_parse_mode_ok(mode: str, value: int) -> None:
    assert parse_mode(mode) == value
    load_layers({**BAKED, "templates": [{"src": "a", "dest": "/a", "mode": mode}]}, None)


@pytest.mark.parametrize("mode", ["999", "rw", "", "64", "08644", "0o644", "-644"])
def test_parse_mode_bad(mode: str) -> None:
    with pytest.raises(ValueError):
        parse_mode(mode)
    errs = errors_of({**BAKED, "templates": [{"src": "a", "dest": "/a", "mode": mode}]}, None)
    assert errs[0].startswith(f"{LAYER_BAKED}: templates[0].mode: expected a quoted octal mode")


# --- schema file ---------------------------------------------------------------


def _objects(node: dict, path: str = "") -> list[tuple[str, dict]]:
    out = []
    if node.get("type") == "object" and "properties" in node:
        out.append((path, node))
    for key, sub in node.get("properties", {}).items():
        out.extend(_objects(sub, f"{path}.{key}"))
    if isinstance(node.get("items"), dict):
        out.extend(_objects(node["items"], f"{path}[]"))
    return out


def test_schema_forbids_unknown_keys_everywhere() -> None:
    objects = _objects(schema())
    assert len(objects) > 10
    for path, node in objects:
        assert node.get("additionalProperties") is False, path


def test_schema_is_valid_and_defaults_validate() -> None:
    import jsonschema

    sch = schema()
    jsonschema.validators.validator_for(sch).check_schema(sch)
    full = apply_defaults(BAKED)
    assert list(jsonschema.validators.validator_for(sch)(sch).iter_errors(full)) == []


# --- files -----------------------------------------------------------------------


def test_load_yaml_file(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text("group: web\nstore: {bucket: my-fleet}\n")
    assert load_yaml_file(p) == {"group": "web", "store": {"bucket": "my-fleet"}}
    p.write_text("")
    assert load_yaml_file(p) == {}
    p.write_text("# only a comment\n")
    assert load_yaml_file(p) == {}


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        (b"group: web\nstore: {bucket: x\n", r"agent\.yaml: YAML error at line 3, column 1"),
        (b"group: web\n  store: 1\n", r"line 2, column 8"),
        (b"group: a\ngroup: b\n", r"line 2, column 1: found duplicate key 'group'"),
        (b"- a\n", "expected a YAML mapping, got list"),
        (b"group: caf\xe9\n", r"not valid UTF-8 \(at byte offset 10\)"),
    ],
)
def test_load_yaml_file_errors(tmp_path: Path, content: bytes, pattern: str) -> None:
    p = tmp_path / "agent.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_yaml_file(p)
    assert info.value.layer == str(p)


def test_load_yaml_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml_file(tmp_path / "nope.yaml")


def test_validate_file_plain(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text("heal: {mode: dry-run}\n")  # a partial layer is fine
    assert validate_file(p) == []
    p.write_text("heal: {mode: armd}\ntemplates: [{src: a, dest: rel}]\n")
    errs = validate_file(p)
    assert errs == [
        f"{p}: heal.mode: expected one of: armed, dry-run, off; got 'armd'",
        f"{p}: templates[0].dest: expected an absolute path (starting with '/'), got 'rel'",
    ]
    p.write_text("heartbeat: {interval_s: 20, dead_after_s: 30}\n")
    assert validate_file(p)[0].startswith(f"{p}: heartbeat.interval_s: must be <=")
    p.write_text("heartbeat: {interval_s: 20}\n")  # dead_after_s may come from elsewhere
    assert validate_file(p) == []


def test_validate_file_bundle_layer(tmp_path: Path) -> None:
    p = tmp_path / "agent.yaml"
    p.write_text("group: web\n")
    assert validate_file(p) == []
    assert validate_file(p, layer=LAYER_BUNDLE)[0].startswith(f"{LAYER_BUNDLE}: group: may not")


def test_validate_file_user_data(tmp_path: Path) -> None:
    p = tmp_path / "ud"
    p.write_bytes(gzip.compress(b"#cloud-config\nec2_agent:\n  group: web\n  heal: {mode: x}\n"))
    assert validate_file(p) == [
        f"user-data {p}: heal.mode: expected one of: armed, dry-run, off; got 'x'"
    ]
    p.write_bytes(b"#cloud-config\nec2_agent: {group: web}\n")
    assert validate_file(p) == []
    p.write_bytes(b"#cloud-config\npackages: [a]\n")
    assert validate_file(p) == [f"user-data {p}: no ec2_agent config found in this user-data"]
    p.write_bytes(b"#cloud-config\nec2_agent: {group: [\n")
    assert "line 3, column 1" in validate_file(p)[0]


def test_validate_file_wrapper_hint(tmp_path: Path) -> None:
    """A bundle agent.yaml with the user-data wrapper: the hint. As FILE alone it is
    plain-YAML user-data, which the boot accepts: validate says the same."""
    p = tmp_path / "agent.yaml"
    p.write_text("ec2_agent:\n  group: web\n")
    (err,) = validate_file(p, layer=LAYER_BUNDLE)
    assert "drop the ec2_agent: wrapper" in err
    assert validate_file(p) == []


SAME_BYTES = {
    "plain": b"ec2_agent:\n  group: web\n  heal: {mode: bogus}\n",
    "template": b"## Template: Jinja\n#cloud-config\nec2_agent:\n  group: '{{ v1.region }}'\n"
                b"  heal: {mode: bogus}\n",
    "from-mime": b"From nobody Tue Dec  1 00:00:00 2026\nContent-Type: multipart/mixed; "
                 b'boundary="B"\nMIME-Version: 1.0\n\n--B\nContent-Type: text/cloud-config\n\n'
                 b"#cloud-config\nec2_agent:\n  group: web\n  heal: {mode: bogus}\n--B--\n",
}


@pytest.mark.parametrize("name", sorted(SAME_BYTES))
def test_validate_and_boot_agree_on_the_same_bytes(tmp_path: Path, name: str) -> None:
    """Regression: these bytes were valid for one and an error (or nothing) for the other."""
    from agent.config.udtemplate import EXAMPLE_INSTANCE_DATA
    from agent.config.userdata import StaticMetadata, read_user_data

    raw = SAME_BYTES[name]
    p = tmp_path / "user-data"
    p.write_bytes(raw)
    errs = validate_file(p)
    user = read_user_data(raw, StaticMetadata(None, EXAMPLE_INSTANCE_DATA)).config
    with pytest.raises(ConfigInvalid) as info:
        load_layers(None, user, None)
    assert len(errs) == 1 and "heal.mode" in errs[0], errs
    assert any(i.path == "heal.mode" for i in info.value.errors)
    fixed = raw.replace(b"heal: {mode: bogus}", b"heal: {mode: armed}")
    p.write_bytes(fixed)
    assert validate_file(p) == []
    user = read_user_data(fixed, StaticMetadata(None, EXAMPLE_INSTANCE_DATA)).config
    assert user is not None and user["heal"] == {"mode": "armed"}


def test_mixed_type_keys_validate_and_digest() -> None:
    """Regression: ``vars: {ports: {80: http, admin: 8443}}`` validated, then the boot's
    layers digest (json.dumps sort_keys) raised TypeError."""
    user = {"group": "web", "store": {"bucket": "my-fleet"},
            "vars": {"ports": {80: "http", "admin": 8443}}}
    cfg = load_layers(None, user, None)
    assert cfg.vars["ports"] == {80: "http", "admin": 8443}
    d1 = layers_digest(None, user, None)
    assert d1 == layers_digest(None, copy.deepcopy(user), None)
    other = copy.deepcopy(user)
    other["vars"]["ports"] = {"80": "http", "admin": 8443}
    assert layers_digest(None, other, None) != d1


def test_validate_file_missing(tmp_path: Path) -> None:
    (err,) = validate_file(tmp_path / "nope")
    assert "cannot read" in err


# --- redaction -------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password",
        "db_password",
        "DB_PASSWORD",
        "dbPassword",
        "secret",
        "client-secret",
        "api_key",
        "apiKey",
        "APIKEY",
        "key",
        "ssh_key",
        "token",
        "github_token",
        "AWS_SECRET_ACCESS_KEY",
        "credentials",
        "auth",
        "private_key",
        "passwd",
        "accessKey",
        "dbXKey",  # a one-letter word before the secret one (found by hypothesis)
        "myAPIKey",
    ],
)
def test_secret_keys(key: str) -> None:
    assert is_secret_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "keep",
        "group",
        "bucket",
        "heal",
        "monkey",
        "keyboard",
        "mode",
        "store",
        "prefix",
        "interval_s",
        "backup_interval_s",
        "check",
        "reload",
        "hook",
        "url",
        "name",
        "vars",
    ],
)
def test_not_secret_keys(key: str) -> None:
    assert not is_secret_key(key)


def test_redact_config() -> None:
    doc = {
        "group": "web",
        "data": [{"name": "app", "keep": 10}],
        "vars": {
            "db": {"password": "hunter2", "user": "app", "port": 5432},
            "api_key": {"nested": "whole subtree hidden"},
            "dsn": "postgres://app:hunter2@db.internal:5432/app",
            "url": "https://user:s3cr3t@example.invalid/x",
            "aws": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "akid": "AKIAIOSFODNN7EXAMPLE",
            "sha": "da39a3ee5e6b4b0d3255bfef95601890afd80709",
            "cmd": "mysql --password=hunter2 -u app",
            "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIE...\n",
            "token": None,
        },
    }
    before = copy.deepcopy(doc)
    out = redact(doc)
    assert doc == before
    assert out["group"] == "web" and out["data"] == [{"name": "app", "keep": 10}]
    v = out["vars"]
    assert v["db"] == {"password": REDACTED, "user": "app", "port": 5432}
    assert v["api_key"] == REDACTED
    assert v["dsn"] == REDACTED  # 'dsn' is a secret key
    assert v["url"] == f"https://user:{REDACTED}@example.invalid/x"
    assert v["aws"] == REDACTED and v["akid"] == REDACTED and v["pem"] == REDACTED
    assert v["sha"] == before["vars"]["sha"]  # hex digests are not credentials
    assert v["cmd"] == f"mysql --password={REDACTED} -u app"
    assert v["token"] is None
    assert "hunter2" not in json.dumps(out) and "s3cr3t" not in json.dumps(out)


_word = st.sampled_from(["db", "app", "my", "x", "prod", "aws", "user"])
_secret_word = st.sampled_from(
    ["password", "secret", "token", "key", "credential", "apiKey", "Password", "SECRET"]
)


@st.composite
def _secret_keys(draw: st.DrawFn) -> str:
    sep = draw(st.sampled_from(["_", "-", ".", ""]))
    parts = [draw(_word) for _ in range(draw(st.integers(0, 2)))]
    parts.insert(draw(st.integers(0, len(parts))), draw(_secret_word))
    key = sep.join(parts)
    if sep == "":  # camelCase join keeps word boundaries visible
        key = parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
    return key


_values = st.recursive(
    st.text(min_size=1, max_size=20) | st.integers() | st.booleans(),
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3)
        | st.dictionaries(_word, inner, min_size=1, max_size=3)
    ),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None)
@given(_secret_keys(), _values, st.lists(_word, max_size=3))
def test_property_redact_never_leaks_secret_key_values(
    key: str, value: object, path: list[str]
) -> None:
    doc: dict = {key: value}
    for p in reversed(path):
        doc = {p: [doc]}
    out = redact(doc)
    node = out
    for p in path:
        node = node[p][0]
    assert node[key] == REDACTED


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_word, _values, max_size=4))
def test_property_redact_keeps_shape_and_is_idempotent(doc: dict) -> None:
    out = redact(doc)
    assert set(out) == set(doc)
    assert redact(out) == out


def test_data_required_flag_defaults_true_and_can_be_turned_off() -> None:
    from agent.config.model import load_layers

    base = {"group": "web", "store": {"bucket": "fleet-bucket"}}
    cfg = load_layers(base, {"data": [{"name": "app", "path": "/var/lib/app"}]})
    assert cfg.data[0].required is True
    cfg = load_layers(base, {"data": [{"name": "app", "path": "/var/lib/app", "required": False}]})
    assert cfg.data[0].required is False


@pytest.mark.parametrize(("level", "number"), [("debug", 10), ("info", 20), ("warning", 30),
                                               ("error", 40)])
def test_log_level_has_a_logging_number(level: str, number: int) -> None:
    from agent.config.model import load_layers

    cfg = load_layers(None, {"group": "web", "store": {"bucket": "fleet-bucket"},
                             "log": {"level": level}})
    assert cfg.log.levelno == number


def test_the_schema_is_where_defaults_live() -> None:
    """No config record carries a default of its own: a field the schema defaults has none
    (``load_layers`` fills it in), and a field the schema leaves absent is ``None`` ("not
    given"). So the numbers live in one place and cannot drift."""
    import dataclasses
    import json

    from agent.config import model as C

    schema = json.loads(C._SCHEMA_PATH.read_text())
    props = schema["properties"]
    items = {k: schema["$defs"][v["items"]["$ref"].rsplit("/", 1)[1]]
             if "$ref" in v["items"] else v["items"]
             for k, v in props.items() if isinstance(v.get("items"), dict)}
    records = {"store": C.StoreConfig, "boot": C.BootConfig, "bundle": C.BundleConfig,
               "heartbeat": C.HeartbeatConfig, "heal": C.HealConfig,
               "membership": C.MembershipConfig, "http": C.HttpConfig, "log": C.LogConfig,
               "departure": C.DepartureConfig}
    lists = {"templates": C.TemplateSpec, "data": C.DataSpec, "health": C.HealthCheckSpec}
    checked = 0
    for name, cls in [*((n, (c, props[n])) for n, c in records.items()),
                      *((n, (c, items[n])) for n, c in lists.items())]:
        record, node = cls
        fields = {f.name: f for f in dataclasses.fields(record)}
        assert set(fields) == set(node["properties"]), name
        for f in fields.values():
            in_schema = "default" in node["properties"][f.name]
            has_own = f.default is not dataclasses.MISSING
            assert not (in_schema and has_own), f"{name}.{f.name}: a default beside the schema's"
            assert not has_own or f.default is None, f"{name}.{f.name}: a default of its own"
            checked += 1
    assert checked > 50
