"""Differential harness: the agent's reading of user-data against cloud-init's own.

``referee(cases)`` runs tests/referee/cloudinit_referee.py under the system python3
(one subprocess per batch); ``judge`` says whether the agent's answer is allowed:
the same ``ec2_agent`` as cloud-init's assembled cloud-config (plus the agent's own
``text/x-ec2-agent`` parts and plain-YAML form, which cloud-init leaves alone), a
clean "not mine", or a clean error on the agent's own block.
"""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.config.userdata import AGENT_KEY, StaticMetadata, deep_merge, read_user_data
from agent.errors import UserDataError
from tests.referee.canon import canon

SYSTEM_PYTHON = "/usr/bin/python3"
SCRIPT = Path(__file__).with_name("cloudinit_referee.py")


@dataclass
class Case:
    raw: bytes
    launch_index: int | None = None
    instance_data: dict[str, Any] | None = None
    agent_fault: bool = False  # the generator broke the agent's own block on purpose
    label: str = ""
    notes: list[str] = field(default_factory=list)


def referee_available() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    proc = subprocess.run([SYSTEM_PYTHON, "-c", "import cloudinit.user_data, jsonpatch"],
                          capture_output=True, timeout=60, check=False)
    return proc.returncode == 0


def referee(cases: list[Case]) -> list[dict[str, Any]]:
    lines = "".join(
        json.dumps({"raw": base64.b64encode(c.raw).decode(), "launch_index": c.launch_index,
                    "instance_data": c.instance_data}) + "\n" for c in cases)
    proc = subprocess.run([SYSTEM_PYTHON, str(SCRIPT)], input=lines, capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"referee failed: {proc.stderr[-2000:]}")
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    if len(out) != len(cases):
        raise RuntimeError(f"referee answered {len(out)} of {len(cases)}: {proc.stderr[-2000:]}")
    return out


def agent(case: Case) -> tuple[str, Any]:
    """("ok", canon) | ("none", None) | ("error", message)."""
    meta = StaticMetadata(case.launch_index, case.instance_data)
    try:
        got = read_user_data(case.raw, meta).config
    except UserDataError as exc:
        return "error", str(exc)
    except Exception as exc:  # a bug: reported as a disagreement, the run goes on
        return "crash", f"{type(exc).__name__}: {exc}"
    return ("none", None) if got is None else ("ok", canon(got))


def _uncanon_agent(cc: Any) -> Any:
    """The ec2_agent value out of a canon'd cloud-config mapping, still canon'd."""
    if cc is None or cc[0] != "d":
        return None
    for key, value in cc[1]:
        if key == ["s", AGENT_KEY]:
            return value
    return None


def _plain_yaml_expected(raw: bytes) -> Any:
    """The agent's plain-YAML extension: a non-MIME user-data no handler takes."""
    if raw.startswith(b"\x1f\x8b"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    try:
        doc = yaml.safe_load(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return None
    if isinstance(doc, dict) and AGENT_KEY in doc:
        return doc[AGENT_KEY] if doc[AGENT_KEY] is not None else {}
    return None


def expected(case: Case, ref: dict[str, Any]) -> tuple[str, Any]:
    """What the agent must answer when it does not error: ("ok", canon) or ("none", None)."""
    if "crash" in ref:
        return "none", None
    value = _uncanon_agent(ref["cloud_config"])
    base: Any = None
    if value is not None:
        base = ["d", []] if value == ["n"] else value
    parts = ref["agent_parts"]
    if parts:
        merged: dict[str, Any] = {}
        if base is not None:
            if base[0] != "d":
                return "invalid", None
            merged = _decanon(base)
        for text in parts:
            try:
                doc = yaml.safe_load(text) or {}
            except yaml.YAMLError:  # e.g. non-ASCII in an 8bit part, mangled by email
                return "invalid", None
            if not isinstance(doc, dict):
                return "invalid", None
            if isinstance(doc, dict) and set(doc) == {AGENT_KEY}:
                doc = doc[AGENT_KEY] or {}
            merged = deep_merge(merged, doc)
        return "ok", canon(merged)
    if base is not None:
        return ("ok", base) if base[0] == "d" else ("invalid", None)
    if ref["cloud_config"] is None and ref["types"] == ["text/x-not-multipart"]:
        plain = _plain_yaml_expected(case.raw)
        if plain is not None:
            return ("ok", canon(plain)) if isinstance(plain, dict) else ("invalid", None)
    return "none", None


def _decanon(c: Any) -> Any:
    tag = c[0]
    if tag == "d":
        return {_decanon(k): _decanon(v) for k, v in c[1]}
    if tag == "l":
        return [_decanon(v) for v in c[1]]
    if tag == "i":
        return int(c[1])
    if tag == "f":
        return float(c[1])
    if tag == "n":
        return None
    return c[1]


def judge(case: Case, ref: dict[str, Any], got: tuple[str, Any]) -> str | None:
    """None when the agent's answer is allowed, else why not."""
    want = expected(case, ref)
    kind, value = got
    if kind == "crash":
        return f"the agent crashed: {value}"
    if kind == "error":
        if not any(word in str(value) for word in (AGENT_KEY, "x-ec2-agent", "YAML error",
                                                     "JSON error")):
            return f"error that does not name the agent's block: {value}"
        if case.agent_fault or want[0] == "invalid":
            return None
        why_dropped = ("would drop it", "cannot read it", "YAML error", "JSON error")
        if ("crash" in ref or _dropped_agent_part(ref)) and any(
                w in str(value) for w in why_dropped):
            return None
        return f"error on user-data cloud-init reads cleanly (want {want}): {value}"
    if want[0] == "invalid":
        return f"cloud-init's ec2_agent is not a mapping but the agent said {kind}"
    if kind == "none":
        return None if want[0] == "none" else f"missed config: want {want[1]}"
    if want[0] == "none":
        return f"took config cloud-init does not have: {value}"
    return None if value == want[1] else f"different config: agent {value} != {want[1]}"


def _dropped_agent_part(ref: dict[str, Any]) -> bool:
    """cloud-init warned about a part (dropped it) and the agent errored on its block."""
    return any(("Failed" in w or "Ignoring" in w or "Could not" in w) for w in ref["warnings"])


def run(cases: list[Case]) -> list[tuple[Case, str]]:
    refs = referee(cases)
    bad = []
    for case, ref in zip(cases, refs, strict=True):
        why = judge(case, ref, agent(case))
        if why:
            bad.append((case, why))
    return bad
