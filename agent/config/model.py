"""Config layers -> one validated, frozen ``Config``; plus redaction for ``config show``.

Three layers share one schema (``agent/config/schema/config.schema.json``), lowest first:

    baked /etc/ec2-agent/agent.yaml  <  user-data  <  bundle agent.yaml

They are deep-merged (mappings merge key by key, lists and scalars replace, see
``agent.config.userdata.deep_merge``). ``group`` and ``store`` may come only from the
first two: they say where the bundle is, so a bundle cannot move itself.

Each layer is validated on its own first, with the schema minus the ``required``
keywords of the object chain (a layer may be partial), so an error names the
layer it came from. Only when every layer is valid is the merged result checked
with ``required`` and the cross-field rules (heartbeat interval <= dead_after / 2,
heal.silent_after_s > heartbeat.dead_after_s, ...), under the layer name
"merged". Every error found is reported, not just the first: ``ConfigInvalid``
(a ``ConfigError``) lists them in its message and in ``.errors``.

Nothing here touches the network or the clock; ``load_yaml_file`` and
``validate_file`` read the one file they are given.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.departure import Policy
from agent.errors import ConfigError, UserDataError

LAYER_BAKED = "baked /etc/ec2-agent/agent.yaml"
LAYER_USER_DATA = "user-data"
LAYER_BUNDLE = "bundle agent.yaml"
LAYER_MERGED = "merged"

BUNDLE_FORBIDDEN = ("group", "store")
"""Keys the bundle layer may not set: they locate the bundle itself."""

MAX_CONFIG_FILE_BYTES = 1024 * 1024
REDACTED = "***REDACTED***"

_SCHEMA_PATH = Path(__file__).with_name("schema") / "config.schema.json"

if TYPE_CHECKING:  # jsonschema is imported only to validate (~3.6 MiB resident)
    import jsonschema


# --- records ----------------------------------------------------------------
# Defaults live in the schema only: ``load_layers`` fills every one in (``apply_defaults``)
# before ``_build`` makes these records, so a field the schema defaults has none here. A
# field the schema leaves out when absent (no default there) is ``None`` here: "not given".
# ``defaults(section)`` gives the schema's defaults of one section, for code and tests that
# need a record without a config.


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    bucket: str
    prefix: str
    region: str | None  # None: the instance's region from IMDS


@dataclass(frozen=True, kw_only=True)
class BootConfig:
    deadline_s: float
    lifecycle_hook: str | None  # ASG launch hook completed at the end (agent.boot.lifecycle)


@dataclass(frozen=True, kw_only=True)
class BundleConfig:
    refresh_s: float
    keep: int


@dataclass(frozen=True, kw_only=True)
class TemplateSpec:
    src: str
    dest: str
    mode: str | None  # None: keep the existing file's mode, else 0644
    owner: str | int | None = None
    group: str | int | None = None
    check: str | None = None
    reload: str | None = None

    @property
    def mode_int(self) -> int | None:
        """The mode as a number (``"0644"`` -> 0o644), or None when not given."""
        return parse_mode(self.mode) if self.mode is not None else None


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    name: str
    path: str
    backup_interval_s: float
    keep: int
    chunk_size: int | None
    required: bool


@dataclass(frozen=True, kw_only=True)
class HeartbeatConfig:
    interval_s: float
    dead_after_s: float


@dataclass(frozen=True, kw_only=True)
class HealthCheckSpec:
    type: str  # http | tcp | process | command
    url: str | None = None
    host: str
    port: int | None = None
    name: str | None = None
    command: str | None = None
    timeout_s: float
    failures_before_critical: int


@dataclass(frozen=True, kw_only=True)
class HealConfig:
    mode: str  # armed | dry-run | off
    action: str  # asg-mark | asg-terminate | launch | hook
    hook: str | None
    grace_s: float
    max_per_window: int
    window_s: float
    freeze_fraction: float
    confirm_observers: int
    silent_after_s: float
    replace_silent: bool
    failed_before_freeze: int


@dataclass(frozen=True, kw_only=True)
class MembershipConfig:
    quiescence_min_s: float
    quiescence_max_s: float


# The ``departure`` section is the pure departure module's own policy value.
DepartureConfig = Policy


@dataclass(frozen=True, kw_only=True)
class HttpConfig:
    enabled: bool
    # The endpoint peers probe (invariant 14). The schema's default is one fixed port (7467),
    # so a security group opens one port between members; not a default of any common
    # software (Prometheus exporters hold 9100-9999; Neo4j 7473/7474, Cassandra 7000/7199,
    # Serf 7946). 0: ephemeral; the real address goes into the member record.
    port: int
    bind: str


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    level: str

    @property
    def levelno(self) -> int:
        """The ``logging`` level number (the schema allows debug, info, warning, error)."""
        return {"debug": 10, "info": 20, "warning": 30, "error": 40}[self.level]


@dataclass(frozen=True)
class Config:
    """The agent's validated config. ``raw`` is the merged mapping with defaults applied.

    Records are frozen; ``vars`` and ``raw`` are plain dicts (deep copies owned by
    this object) because templates and ``config show`` need ordinary mappings.
    """

    group: str
    store: StoreConfig
    boot: BootConfig
    bundle: BundleConfig
    vars: dict[str, Any]
    templates: tuple[TemplateSpec, ...]
    data: tuple[DataSpec, ...]
    heartbeat: HeartbeatConfig
    health: tuple[HealthCheckSpec, ...]
    heal: HealConfig
    membership: MembershipConfig
    http: HttpConfig
    departure: DepartureConfig
    log: LogConfig
    raw: dict[str, Any]


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: which layer, which key path (``templates[1].dest``), what was wrong."""

    layer: str
    path: str
    message: str

    def __str__(self) -> str:
        return ": ".join(p for p in (self.layer, self.path, self.message) if p)


class ConfigInvalid(ConfigError):
    """One or more config problems; ``.errors`` holds every ``ConfigIssue`` found.

    ``.path`` and ``.layer`` are those of the first issue, for callers that only
    look at one.
    """

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.errors: tuple[ConfigIssue, ...] = tuple(issues)
        if not self.errors:
            raise ValueError("ConfigInvalid needs at least one issue")
        first = self.errors[0]
        if len(self.errors) == 1:
            super().__init__(first.message, path=first.path, layer=first.layer)
        else:
            lines = "\n".join(f"  - {issue}" for issue in self.errors)
            super().__init__(f"{len(self.errors)} config errors:\n{lines}")
            self.path, self.layer = first.path, first.layer


# --- schema -----------------------------------------------------------------


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The config JSON Schema (package data next to this module)."""
    with _SCHEMA_PATH.open(encoding="utf-8") as f:
        return json.load(f)


def _without_required(node: dict[str, Any]) -> dict[str, Any]:
    """Drop ``required`` along the object chain (not inside list items).

    A layer may omit ``group`` or ``store.bucket`` (another layer gives them), but a
    list item is always whole in one layer (lists replace), so its ``required``
    stays and the error names the layer that has the incomplete item.
    """
    out = dict(node)
    out.pop("required", None)
    if "properties" in node:
        out["properties"] = {k: _without_required(v) for k, v in node["properties"].items()}
    return out


@lru_cache(maxsize=2)
def _validator(partial: bool) -> jsonschema.protocols.Validator:
    import jsonschema

    full = schema()
    sch = _without_required(full) if partial else full
    cls = jsonschema.validators.validator_for(full)
    return cls(sch)


def _fmt_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", str(p)):
            out += f".{p}" if out else str(p)
        else:
            out += f"[{str(p)!r}]"
    return out


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_JSON_TYPES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _issues_from(err: jsonschema.ValidationError, layer: str) -> list[ConfigIssue]:
    """Translate one jsonschema error into issues that say path, expectation, layer."""
    import difflib  # only on errors

    parts = list(err.absolute_path)
    path = _fmt_path(parts)
    kw = err.validator
    sch = err.schema if isinstance(err.schema, dict) else {}
    got = f"got {_show(err.instance)}"
    if kw == "additionalProperties":
        allowed = sorted(sch.get("properties", {}))
        issues = []
        for key in sorted((k for k in err.instance if k not in allowed), key=str):
            hint = ""
            close = [a for a in allowed if str(key) in a] if len(str(key)) > 3 else []
            close = close or difflib.get_close_matches(str(key), allowed, n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
            elif key == "ec2_agent" and not path:
                hint = "; this file is the agent config itself, drop the ec2_agent: wrapper"
            msg = f"unknown key (allowed: {', '.join(allowed)}){hint}"
            issues.append(ConfigIssue(layer, _fmt_path([*parts, key]), msg))
        return issues
    if kw == "required":
        why = f" ({sch['x-why']})" if "x-why" in sch else ""
        return [
            ConfigIssue(layer, _fmt_path([*parts, key]), f"is required{why}")
            for key in err.validator_value
            if isinstance(err.instance, dict) and key not in err.instance
        ]
    if kw == "type":
        types = (
            err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        )
        want = " or ".join(_JSON_TYPES.get(t, t) for t in types)
        if "x-expected" in sch and "string" in types:
            want = sch["x-expected"]
        return [ConfigIssue(layer, path, f"expected {want}, {got} ({_type_name(err.instance)})")]
    if kw in ("enum", "const"):
        options = err.validator_value if kw == "enum" else [err.validator_value]
        hint = ""
        if err.instance is False and "off" in options:
            hint = " (YAML reads unquoted off/no as false: quote it)"
        want = ", ".join(str(o) for o in options)
        return [ConfigIssue(layer, path, f"expected one of: {want}; {got}{hint}")]
    if kw == "pattern":
        want = sch.get("x-expected", f"a string matching {err.validator_value}")
        return [ConfigIssue(layer, path, f"expected {want}, {got}")]
    bounds = {
        "minimum": ">=",
        "maximum": "<=",
        "exclusiveMinimum": ">",
        "exclusiveMaximum": "<",
    }
    if kw in bounds:
        return [
            ConfigIssue(layer, path, f"expected a number {bounds[kw]} {err.validator_value}, {got}")
        ]
    if kw in ("minLength", "maxLength"):
        word = "at least" if kw == "minLength" else "at most"
        return [
            ConfigIssue(layer, path, f"expected {word} {err.validator_value} characters, {got}")
        ]
    return [ConfigIssue(layer, path, err.message)]


def _schema_issues(doc: Any, layer: str, *, partial: bool) -> list[ConfigIssue]:
    errors = sorted(
        _validator(partial).iter_errors(doc),
        key=lambda e: (_fmt_path(e.absolute_path), str(e.validator)),
    )
    issues: list[ConfigIssue] = []
    for err in errors:
        for issue in _issues_from(err, layer):
            if issue not in issues:
                issues.append(issue)
    return issues


# --- normalisation, defaults, cross-field rules -----------------------------


def _normalise(doc: dict[str, Any]) -> dict[str, Any]:
    """Undo YAML 1.1's worst surprise where it is unambiguous: ``heal: {mode: off}``.

    Unquoted ``off`` loads as ``False``; for heal.mode there is only one thing it
    can have meant, and refusing it would block an operator turning healing off.
    """
    heal = doc.get("heal")
    if isinstance(heal, dict) and heal.get("mode") is False:
        doc = dict(doc)
        doc["heal"] = {**heal, "mode": "off"}
    return doc


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        merged = dict(schema()["$defs"][ref.rsplit("/", 1)[1]])
        merged.update({k: v for k, v in node.items() if k != "$ref"})
        return merged
    return node


def apply_defaults(doc: Any, node: dict[str, Any] | None = None) -> Any:
    """Fill in every schema ``default`` that is missing (returns a new value)."""
    node = _resolve(schema() if node is None else node)
    if isinstance(doc, dict) and "properties" in node:
        out = dict(doc)
        for key, sub in node["properties"].items():
            sub = _resolve(sub)
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
            if key in out:
                out[key] = apply_defaults(out[key], sub)
        return out
    if isinstance(doc, list) and isinstance(node.get("items"), dict):
        return [apply_defaults(item, node["items"]) for item in doc]
    return doc


def defaults(section: str) -> dict[str, Any]:
    """The schema's defaults of one top-level section (``heal``, ``departure``...)."""
    value = apply_defaults({})[section]
    if not isinstance(value, dict):
        raise KeyError(f"config section {section!r} has no defaults of its own")
    return value


def _num(doc: Mapping[str, Any], section: str, key: str) -> float | None:
    value = doc.get(section, {}).get(key) if isinstance(doc.get(section), dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _cross_issues(doc: dict[str, Any], layer: str) -> list[ConfigIssue]:
    """Rules the schema cannot say. Checks only values present in ``doc``.

    Called on the merged config with defaults (everything present), and on a
    single file by ``validate_file`` (only pairs the file sets itself).
    """
    issues: list[ConfigIssue] = []
    interval = _num(doc, "heartbeat", "interval_s")
    dead = _num(doc, "heartbeat", "dead_after_s")
    if interval is not None and dead is not None and interval > dead / 2:
        issues.append(
            ConfigIssue(
                layer,
                "heartbeat.interval_s",
                f"must be <= heartbeat.dead_after_s / 2 ({dead / 2:g}) so one lost write "
                f"never looks like death, got {interval:g}",
            )
        )
    silent = _num(doc, "heal", "silent_after_s")
    if silent is not None and dead is not None and silent <= dead:
        issues.append(
            ConfigIssue(
                layer,
                "heal.silent_after_s",
                f"must be > heartbeat.dead_after_s ({dead:g}), got {silent:g}",
            )
        )
    qmin = _num(doc, "membership", "quiescence_min_s")
    qmax = _num(doc, "membership", "quiescence_max_s")
    if qmin is not None and qmax is not None and qmin > qmax:
        issues.append(
            ConfigIssue(
                layer,
                "membership.quiescence_min_s",
                f"must be <= membership.quiescence_max_s ({qmax:g}), got {qmin:g}",
            )
        )
    heal = doc.get("heal")
    if isinstance(heal, dict) and heal.get("action") == "hook" and not heal.get("hook"):
        issues.append(ConfigIssue(layer, "heal.hook", "is required when heal.action is hook"))
    for section, key in (("templates", "dest"), ("data", "name"), ("data", "path")):
        items = doc.get(section)
        if not isinstance(items, list):
            continue
        seen: dict[Any, int] = {}
        for i, item in enumerate(items):
            if not isinstance(item, dict) or key not in item:
                continue
            value = item[key]
            if value in seen:
                issues.append(
                    ConfigIssue(
                        layer,
                        f"{section}[{i}].{key}",
                        f"duplicate of {section}[{seen[value]}].{key} ({_show(value)})",
                    )
                )
            else:
                seen[value] = i
    return issues


def _with_provenance(issues: list[ConfigIssue], layers: list[tuple[str, Any]]) -> list[ConfigIssue]:
    """Say which layer set a merged value ("set by bundle agent.yaml", or "default")."""
    out = []
    for issue in issues:
        m = re.match(r"([A-Za-z0-9_-]+)(?:\.([A-Za-z0-9_-]+))?", issue.path)
        source = "default"
        if m:
            top, sub = m.group(1), m.group(2)
            for name, doc in layers:
                if not isinstance(doc, dict) or top not in doc:
                    continue
                value = doc[top]
                whole = sub is None or isinstance(value, list)
                if whole or (isinstance(value, dict) and sub in value):
                    source = name
        out.append(ConfigIssue(issue.layer, issue.path, f"{issue.message} (value from {source})"))
    return out


def _layer_issues(doc: Any, layer: str) -> list[ConfigIssue]:
    if not isinstance(doc, dict):
        return [ConfigIssue(layer, "", f"expected a mapping of settings, got {_type_name(doc)}")]
    issues: list[ConfigIssue] = []
    if layer == LAYER_BUNDLE:
        for key in BUNDLE_FORBIDDEN:
            if key in doc:
                issues.append(
                    ConfigIssue(
                        layer,
                        key,
                        "may not be set by the bundle (it says where the bundle is); "
                        "set it in the baked config or user-data",
                    )
                )
    return issues + _schema_issues(doc, layer, partial=True)


# --- public API --------------------------------------------------------------


def load_layers(
    baked: dict[str, Any] | None,
    user_data: dict[str, Any] | None,
    bundle: dict[str, Any] | None = None,
) -> Config:
    """Validate each layer, merge baked < user-data < bundle, validate, build ``Config``.

    Raises ConfigInvalid (a ConfigError) listing every problem with its layer and
    key path. Layers are not modified.
    """
    layers = [
        (LAYER_BAKED, baked),
        (LAYER_USER_DATA, user_data),
        (LAYER_BUNDLE, bundle),
    ]
    issues: list[ConfigIssue] = []
    merged: dict[str, Any] = {}
    for name, doc in layers:
        if doc is None:
            continue
        if isinstance(doc, dict):
            doc = _normalise(doc)
        layer_issues = _layer_issues(doc, name)
        issues.extend(layer_issues)
        if not layer_issues:
            from agent.config.userdata import deep_merge  # (imports PyYAML: not at module level)

            merged = deep_merge(merged, doc)
    if issues:
        raise ConfigInvalid(issues)
    issues = _schema_issues(merged, LAYER_MERGED, partial=False)
    if issues:
        raise ConfigInvalid(issues)
    full = apply_defaults(merged)
    issues = _cross_issues(full, LAYER_MERGED)
    if issues:
        raise ConfigInvalid(_with_provenance(issues, layers))
    return _build(full)


def _build(raw: dict[str, Any]) -> Config:
    raw = copy.deepcopy(raw)
    return Config(
        group=raw["group"],
        store=StoreConfig(**raw["store"]),
        boot=BootConfig(**raw["boot"]),
        bundle=BundleConfig(**raw["bundle"]),
        vars=copy.deepcopy(raw["vars"]),
        templates=tuple(TemplateSpec(**t) for t in raw["templates"]),
        data=tuple(DataSpec(**d) for d in raw["data"]),
        heartbeat=HeartbeatConfig(**raw["heartbeat"]),
        health=tuple(HealthCheckSpec(**h) for h in raw["health"]),
        heal=HealConfig(**raw["heal"]),
        membership=MembershipConfig(**raw["membership"]),
        departure=DepartureConfig.from_raw(raw["departure"]),
        http=HttpConfig(**raw["http"]),
        log=LogConfig(**raw["log"]),
        raw=raw,
    )


def from_validated(raw: dict[str, Any]) -> Config:
    """The ``Config`` of a ``Config.raw`` that ``load_layers`` produced before.

    For a memo of an earlier validation (see ``layers_digest``); a mapping that did
    not come from ``load_layers`` may raise KeyError or TypeError.
    """
    return _build(raw)


@lru_cache(maxsize=1)
def _schema_digest() -> str:
    return hashlib.sha256(_SCHEMA_PATH.read_bytes()).hexdigest()


def layers_digest(baked: Any, user_data: Any, bundle: Any) -> str:
    """What ``load_layers`` result depends on: the three layers, the schema, the agent.

    Equal digests mean validating again would give the same ``Config`` (the
    validation is a pure function of exactly these), so a memo keyed by it is sound.
    """
    from agent import __version__

    doc = [__version__, _schema_digest(), baked, user_data, bundle]
    return hashlib.sha256(json.dumps(_canonical(doc)).encode()).hexdigest()


def _canonical(value: Any) -> Any:
    """A JSON-able form in which equal YAML values are equal: mappings become sorted
    ``[key, value]`` pairs with typed keys, so ``{80: http, admin: 8443}`` (int and str
    keys, which ``json.dumps(sort_keys=True)`` cannot order) has one digest, and
    ``{1: x}`` differs from ``{"1": x}``.
    """
    if isinstance(value, dict):
        pairs = [[_canonical_key(k), _canonical(v)] for k, v in value.items()]
        return {"{}": sorted(pairs, key=lambda kv: json.dumps(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return {type(value).__name__: repr(value)}


def _canonical_key(key: Any) -> Any:
    return key if isinstance(key, str) else {type(key).__name__: repr(key)}


def parse_mode(mode: str) -> int:
    """``"0644"``, ``"644"``, ``"0600"``, ``"1777"`` -> int; anything else ValueError."""
    if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3,4}", mode):
        raise ValueError(f"not an octal file mode: {mode!r}")
    value = int(mode, 8)
    if value > 0o7777:
        raise ValueError(f"not an octal file mode: {mode!r}")
    return value


def load_yaml_file(path: str | Path) -> dict[str, Any]:
    """Read one config file: a YAML mapping; empty file -> {}.

    Errors (unreadable, too big, not UTF-8, YAML with line/column, not a mapping)
    are ConfigError naming the file as the layer.
    """
    path = Path(path)
    layer = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", layer=layer) from exc
    return _yaml_mapping(raw, layer)


def load_yaml_bytes(raw: bytes, path: str | Path) -> dict[str, Any]:
    """``load_yaml_file`` for bytes already read from ``path`` (hashed, say)."""
    return _yaml_mapping(raw, str(path))


def _yaml_mapping(raw: bytes, layer: str) -> dict[str, Any]:
    if len(raw) > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(
            f"{len(raw)} bytes, more than the {MAX_CONFIG_FILE_BYTES} allowed", layer=layer
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not valid UTF-8 (at byte offset {exc.start})", layer=layer) from exc
    from agent.config.userdata import load_yaml

    doc = load_yaml(text, "", error=lambda msg: ConfigError(msg, layer=layer))
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"expected a YAML mapping, got {_type_name(doc)}", layer=layer)
    return doc


def validate_file(path: str | Path, *, layer: str | None = None,
                  launch_index: int | None = None) -> list[str]:
    """Check one layer file for ``ec2-agent config validate FILE``; [] means valid.

    FILE may be an agent config file (baked or bundle ``agent.yaml``) or user-data
    (``#cloud-config``, MIME, gzip), which is decoded first. It is checked as a
    single layer: ``group``/``store`` need not be present, cross-field rules apply
    to the values it sets itself. ``layer=LAYER_BUNDLE`` also refuses
    ``group``/``store``; by default the layer is named after the file.

    User-data goes through ``agent.config.userdata.read_user_data``, the boot's own reader:
    ``launch_index`` selects ``Launch-Index`` parts as on that instance (None: all),
    and ``## template: jinja`` renders with stand-in instance metadata
    (``udtemplate.EXAMPLE_INSTANCE_DATA``).
    """
    from agent.config.udtemplate import EXAMPLE_INSTANCE_DATA
    from agent.config.userdata import StaticMetadata, looks_like_user_data, read_user_data

    path = Path(path)
    name = layer or str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return [f"{path}: cannot read: {exc.strerror or exc}"]
    try:
        if layer in (None, LAYER_USER_DATA) and looks_like_user_data(raw):
            name = layer or f"user-data {path}"
            got = read_user_data(raw, StaticMetadata(launch_index, EXAMPLE_INSTANCE_DATA))
            doc: Any = got.config
            if doc is None:
                why = "; ".join(got.notes)
                return [f"{name}: no ec2_agent config found in this user-data"
                        + (f" ({why})" if why else "")]
        else:
            doc = _yaml_mapping(raw, name)
    except (ConfigError, UserDataError) as exc:
        return [str(exc)]
    doc = _normalise(doc)
    issues = _layer_issues(doc, name)
    if not issues:
        issues = _cross_issues(doc, name)
    return [str(i) for i in issues]


# --- redaction ---------------------------------------------------------------

_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "pass",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "tokens",
        "credential",
        "credentials",
        "creds",
        "key",
        "keys",
        "apikey",
        "privatekey",
        "accesskey",
        "secretkey",
        "auth",
        "authorization",
        "cookie",
        "signature",
        "dsn",
        "sas",
        "cert",
        "pem",
    }
)
_SECRET_SUBSTRINGS = (
    "password",
    "passwd",
    "secret",
    "token",
    "credential",
    "apikey",
    "privatekey",
    "accesskey",
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")  # dbXKey: db X Key

_INLINE_SECRETS = (
    # AWS secret access key: 40 base64 chars with mixed case (a hex sha1 is not one).
    re.compile(
        r"(?<![A-Za-z0-9/+=])(?=[A-Za-z0-9/+]*[a-z])(?=[A-Za-z0-9/+]*[A-Z])"
        r"[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"
    ),
    re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{16}\b"),  # AWS key ids
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(?:ghp|gho|ghu|ghs|ghr|github_pat)_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+"),  # JWT
)
_URL_USERINFO = re.compile(r"(?P<pre>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s/]+)(?=@)")
_INLINE_ASSIGN = re.compile(
    r"(?i)(?P<pre>\b[\w-]*(?:password|passwd|secret|token|api[_-]?key)[\w-]*\s*[=:]\s*)"
    r"(?P<val>[^\s'\",;&]+)"
)


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key names a secret: ``password``, ``api_key``, ``sshKey``...

    Split into words (snake, kebab, dots, camelCase) so ``keep`` or ``keyboard``
    are not secrets but ``key``, ``db_password`` and ``AWS_SECRET_ACCESS_KEY`` are.
    """
    text = str(key)
    words = [w.lower() for w in re.split(r"[^A-Za-z0-9]+", _CAMEL.sub("_", text)) if w]
    joined = "".join(words)
    return any(w in _SECRET_WORDS for w in words) or any(s in joined for s in _SECRET_SUBSTRINGS)


def redact_string(value: str) -> str:
    """Hide credentials inside a string (URL passwords, key=value, known token shapes)."""
    if any(p.search(value) for p in _INLINE_SECRETS):
        return REDACTED
    value = _URL_USERINFO.sub(lambda m: m.group("pre") + REDACTED, value)
    return _INLINE_ASSIGN.sub(lambda m: m.group("pre") + REDACTED, value)


def redact(mapping: Any) -> Any:
    """A copy of ``mapping`` safe to print: secret-looking keys' values and inline
    credentials replaced by ``REDACTED``. Never modifies its input.
    """
    if isinstance(mapping, Mapping):
        return {
            k: (REDACTED if is_secret_key(k) and v is not None else redact(v))
            for k, v in mapping.items()
        }
    if isinstance(mapping, (list, tuple)):
        return [redact(v) for v in mapping]
    if isinstance(mapping, str):
        return redact_string(mapping)
    return mapping
