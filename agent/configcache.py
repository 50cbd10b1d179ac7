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
  file), a child process does it (``python -m agent.configcache``, layers as
  JSON on stdin) and the daemon builds the ``Config`` from the child's answer.
  Errors come back as the same ``ConfigIssue`` list. Layers that do not survive
  JSON, or a child that fails to answer, are validated in-process instead:
  correctness first, memory second.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MEMO = "config.json"
CHILD_TIMEOUT_S = 60.0


def _json_exact(doc: Any) -> str | None:
    """``doc`` as JSON if it round-trips unchanged (YAML may give dates, say), else None."""
    try:
        text = json.dumps(doc, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return text if json.loads(text) == doc else None


def validated_config(state_dir: Path, baked: dict[str, Any] | None,
                     user: dict[str, Any] | None, bundle: dict[str, Any] | None,
                     *, isolate: bool = False) -> Any:
    """``config.load_layers(baked, user, bundle)``, from the memo when it is for these.

    ``isolate``: validate in a child process (the daemon), so jsonschema is never
    imported here. Raises ``ConfigInvalid`` exactly as ``load_layers`` would.
    """
    from agent import config
    from agent.files import atomic_write

    key = config.layers_digest(baked, user, bundle)
    memo = state_dir / MEMO
    try:
        doc = json.loads(memo.read_text())
        if isinstance(doc, dict) and doc.get("key") == key:
            return config.from_validated(doc["config"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    cfg = _validate_in_child(baked, user, bundle) if isolate else None
    if cfg is None:
        cfg = config.load_layers(baked, user, bundle)
    text = _json_exact({"key": key, "config": cfg.raw})
    if text is not None:  # only what survives JSON is remembered
        try:
            atomic_write(memo, text + "\n", mode=0o600)
        except OSError as exc:
            log.warning("cannot remember the validated config in %s: %s", memo, exc)
    return cfg


def _validate_in_child(baked: Any, user: Any, bundle: Any) -> Any:
    """The ``Config`` from a child's validation; None when the child cannot answer."""
    from agent import config

    payload = _json_exact({"baked": baked, "user": user, "bundle": bundle})
    if payload is None:
        return None
    try:
        proc = subprocess.run([sys.executable, "-m", "agent.configcache"], input=payload,
                              capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                              check=False)
        answer = json.loads(proc.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        log.warning("config validation child failed (%s); validating in-process", exc)
        return None
    if proc.returncode == 0 and isinstance(answer.get("config"), dict):
        return config.from_validated(answer["config"])
    if proc.returncode == 1 and answer.get("issues"):
        raise config.ConfigInvalid(config.ConfigIssue(**i) for i in answer["issues"])
    log.warning("config validation child exited %d: %s; validating in-process",
                proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1])
    return None


def main() -> int:
    """Child side: layers as JSON on stdin -> ``{"config": raw}`` or ``{"issues": [...]}``."""
    from dataclasses import asdict

    from agent import config

    layers = json.load(sys.stdin)
    try:
        cfg = config.load_layers(layers["baked"], layers["user"], layers["bundle"])
    except config.ConfigInvalid as exc:
        json.dump({"issues": [asdict(i) for i in exc.errors]}, sys.stdout)
        return 1
    json.dump({"config": cfg.raw}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
