"""``state.json``: the agent's local record of itself, and what ``status`` reads.

Written atomically (temp, fsync, rename, dir fsync) so a reader never sees a
torn file, and updated read-modify-write under an ``flock`` because two
processes share it: ``boot`` owns the phases, ``run`` owns heartbeat, peers and
heal. Kept free of heavy imports: ``status`` loads this module.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.errors import StateError
from agent.host.files import atomic_write, flocked

SCHEMA_VERSION = 1


def read(path: Path) -> dict[str, Any] | None:
    """The state, or None when there is none yet. A corrupt file is an error, not 'no state'."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StateError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write(path: Path, data: dict[str, Any]) -> None:
    data = dict(data)
    data["schema"] = SCHEMA_VERSION
    try:
        atomic_write(
            path, json.dumps(data, indent=1, sort_keys=True, default=str) + "\n", mode=0o644
        )
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc}") from exc


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(flocked(lock, 0o644))
    except OSError as exc:
        raise StateError(f"cannot lock {lock}: {exc}") from exc
    with stack:
        yield


def replace(path: Path, data: dict[str, Any]) -> None:
    """Write the whole state under the lock, without reading what was there."""
    with locked(path):
        write(path, data)


def update(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read-modify-write under the lock; ``change`` mutates the dict in place."""
    with locked(path):
        data = read(path) or {}
        change(data)
        write(path, data)
        return data


FINAL = ("done", "error", "degraded")


def wait_final(path: Path, timeout: float | None, poll: float = 0.1) -> dict[str, Any] | None:
    """Poll until the boot is final (``status --wait``); returns the last state seen."""
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            st = read(path)
        except StateError:
            st = None  # mid-replace on a filesystem without atomic rename semantics: retry
        if st and st.get("status") in FINAL:
            return st
        if end is not None and time.monotonic() >= end:
            return st
        time.sleep(poll)


# -- member.json: what `register` recorded (the member's store, group and seq) --------------

MEMBER_FILE = "member.json"


def member_file(paths: Any) -> Path:
    return Path(paths.state_dir) / MEMBER_FILE


def read_member_file(paths: Any) -> dict[str, Any] | None:
    try:
        return json.loads(member_file(paths).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {member_file(paths)}: {exc}") from exc
