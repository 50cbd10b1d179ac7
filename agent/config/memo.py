"""Validated config, remembered across processes and, in the daemon, validated apart.

``config.load_layers`` needs jsonschema, and once imported jsonschema stays
resident (3.6 MiB measured, with ``referencing``, ``rpds`` and the format
checkers) in a daemon meant to stay under 50 MB. Two things keep it out:

* a memo, ``<state>/config.json``, keyed by ``config.layers_digest`` (the three
  layers, the schema, the agent version): the daemon starts from the layers its
  boot has just validated, and the same inputs give the same ``Config``. An
  edited baked file, new user-data or a new bundle changes the key; a memo that
  does not parse or build is ignored, never trusted;
* when the daemon must validate something new (a bundle update, an edited baked
  file), a child process does it (``python -m agent.config.memo``, layers or the
  files holding them as JSON on stdin): it parses the YAML too, so the daemon
  imports neither jsonschema nor PyYAML, and builds the ``Config`` from the
  child's answer. Errors come back as the same ``ConfigIssue`` list or
  ``ConfigError`` text. Layers that do not survive JSON, or a child that fails
  to answer, are handled in-process instead: correctness first, memory second.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.config.model import Config
    from agent.config.userdata import Metadata
    from agent.paths import Paths

log = logging.getLogger(__name__)

MEMO = "config.json"
CHILD_TIMEOUT_S = 60.0


def json_exact(doc: Any) -> str | None:
    """``doc`` as JSON if it round-trips unchanged (YAML may give dates, say), else None."""
    try:
        text = json.dumps(doc, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return text if json.loads(text) == doc else None


@dataclass(frozen=True)
class Validated:
    """A validated ``Config`` and the parsed layers it came from (for later merges)."""

    config: Any
    baked: dict[str, Any] | None
    bundle: dict[str, Any] | None


def read_bundle_config(vdir: Path, version: int | None = None) -> dict[str, Any] | None:
    """The bundle's ``agent.yaml`` as a mapping (None if absent); ConfigError names the layer.

    Read with the one capped YAML loader (``config.load_yaml_bytes``: size cap,
    alias budget, duplicate keys), like every other config layer.
    """
    from agent.config import model as config
    from agent.errors import ConfigError

    layer = config.LAYER_BUNDLE if version is None else f"{config.LAYER_BUNDLE} (version {version})"
    try:
        raw = (vdir / "agent.yaml").read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", layer=layer) from exc
    return config.load_yaml_bytes(raw, layer)


def config_on_host(paths: Paths, raw_user_data: bytes | None,
                   metadata: Metadata | None = None) -> Config:
    """The config from this host's layers, the one way every command builds it: the baked
    file, the user-data given (``ec2-agent config show``, backup/restore by hand), and the
    current bundle's ``agent.yaml``, merged and validated by ``config.load_layers``."""
    from agent.config import model as config
    from agent.config.userdata import NO_METADATA, parse_user_data

    baked = config.load_yaml_file(paths.config_file) if paths.config_file.exists() else None
    bundle = read_bundle_config(paths.bundles_dir / "current")
    user = parse_user_data(raw_user_data, metadata or NO_METADATA)
    return config.load_layers(baked, user, bundle)


def validated_config(state_dir: Path, baked: dict[str, Any] | None,
                     user: dict[str, Any] | None, bundle: dict[str, Any] | None,
                     *, isolate: bool = False) -> Any:
    """``config.load_layers(baked, user, bundle)``, from the memo when it is for these.

    ``isolate``: validate in a child process (the daemon), so jsonschema is never
    imported here. Raises ``ConfigInvalid`` exactly as ``load_layers`` would.
    """
    from agent.config import model as config

    key = config.layers_digest(baked, user, bundle)
    try:
        doc = json.loads((state_dir / MEMO).read_text())
        if isinstance(doc, dict) and doc.get("key") == key:
            return config.from_validated(doc["config"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return validated_files(state_dir, user, baked=baked, bundle=bundle, isolate=isolate).config


def validated_files(state_dir: Path, user: dict[str, Any] | None, *,
                    baked: dict[str, Any] | None = None, baked_path: Path | None = None,
                    bundle: dict[str, Any] | None = None, bundle_dir: Path | None = None,
                    bundle_version: int | None = None, isolate: bool = False) -> Validated:
    """Validate layers of which some are still files: the baked config at ``baked_path``,
    the bundle's ``agent.yaml`` in ``bundle_dir``. With ``isolate`` the child parses
    them too, so the caller imports neither PyYAML nor jsonschema. Remembers the result.
    """
    from agent.config import model as config

    got = _in_child(user, baked, baked_path, bundle, bundle_dir, bundle_version) \
        if isolate else None
    if got is None:
        if baked_path is not None:
            baked = config.load_yaml_file(baked_path)
        if bundle_dir is not None:
            bundle = read_bundle_config(bundle_dir, bundle_version)
        got = Validated(config.load_layers(baked, user, bundle), baked, bundle)
    _remember(state_dir, config.layers_digest(got.baked, user, got.bundle), got.config)
    return got


def _remember(state_dir: Path, key: str, cfg: Any) -> None:
    from agent.host.files import atomic_write

    memo = state_dir / MEMO
    text = json_exact({"key": key, "config": cfg.raw})
    if text is not None:  # only what survives JSON is remembered
        try:
            atomic_write(memo, text + "\n", mode=0o600)
        except OSError as exc:
            log.warning("cannot remember the validated config in %s: %s", memo, exc)


def _in_child(user: Any, baked: Any, baked_path: Path | None, bundle: Any,
              bundle_dir: Path | None, bundle_version: int | None) -> Validated | None:
    """The child's validation; None when it cannot answer (the caller then validates)."""
    from agent.config import model as config
    from agent.errors import ConfigError

    payload = json_exact({
        "user": user, "baked": baked, "bundle": bundle, "bundle_version": bundle_version,
        "baked_path": str(baked_path) if baked_path is not None else None,
        "bundle_dir": str(bundle_dir) if bundle_dir is not None else None})
    if payload is None:
        return None
    try:
        proc = subprocess.run([sys.executable, "-m", "agent.config.memo"], input=payload,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              check=False)
        answer = json.loads(proc.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        log.warning("config validation child failed (%s); validating in-process", exc)
        return None
    if not isinstance(answer, dict):
        answer = {}
    if proc.returncode == 0 and isinstance(answer.get("config"), dict):
        layers = answer.get("layers") or {}
        return Validated(config.from_validated(answer["config"]), layers.get("baked"),
                         layers.get("bundle"))
    if proc.returncode == 1 and answer.get("issues"):
        raise config.ConfigInvalid(config.ConfigIssue(**i) for i in answer["issues"])
    if proc.returncode == 1 and isinstance(answer.get("error"), dict):
        err = answer["error"]
        exc = ConfigError(str(err.get("text")))  # the text already names layer and path
        exc.layer, exc.path = str(err.get("layer") or ""), str(err.get("path") or "")
        raise exc
    log.warning("config validation child exited %d: %s; validating in-process",
                proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1])
    return None


def main() -> int:
    """Child side: layers (docs or files) as JSON on stdin -> layers + config, or errors."""
    from dataclasses import asdict

    from agent.config import model as config
    from agent.errors import ConfigError

    req = json.load(sys.stdin)
    try:
        baked, bundle = req.get("baked"), req.get("bundle")
        if req.get("baked_path"):
            baked = config.load_yaml_file(req["baked_path"])
        if req.get("bundle_dir"):
            bundle = read_bundle_config(Path(req["bundle_dir"]), req.get("bundle_version"))
        cfg = config.load_layers(baked, req.get("user"), bundle)
    except config.ConfigInvalid as exc:
        json.dump({"issues": [asdict(i) for i in exc.errors]}, sys.stdout)
        return 1
    except ConfigError as exc:
        json.dump({"error": {"text": str(exc), "layer": exc.layer, "path": exc.path}},
                  sys.stdout)
        return 1
    out = json_exact({"layers": {"baked": baked, "bundle": bundle}, "config": cfg.raw})
    if out is None:
        print("layers do not survive JSON", file=sys.stderr)
        return 2
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
