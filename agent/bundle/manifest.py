"""Bundle manifests: the model, its validation, path safety, and what changed.

A bundle version is one JSON manifest listing every file by path, sha256, size
and mode; the content lives in the store by sha256, so a version is just an
index and unchanged content is never uploaded or downloaded twice. The manifest
is the commit point of ``bundle push`` and the only thing ``pull`` trusts, so
every field is checked here before a single byte is written locally: a path that
is absolute, climbs with ``..``, collides with another entry, or is not in its
one canonical spelling is refused with ``IntegrityError`` (a manifest is data
from the network, and a path in it decides where we write).

Pure: no boto3, no files, no clock (``created`` is passed in).

Store layout (relative to the deployment prefix)::

    config/<group>/manifest.json          the current version (written last, CAS)
    config/<group>/objects/<sha256>       content, immutable, shared by versions
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import IntegrityError
from agent.layout import manifest_rel, object_rel, objects_prefix  # noqa: F401 - re-exported

FORMAT = 1
# Local metadata of an assembled version lives in this top-level directory of the
# version dir; a manifest may not claim it.
RESERVED = ".bundle"
MAX_FILES = 10_000
MAX_PATH = 1024
_SHA = re.compile(r"^[0-9a-f]{64}$")


_GROUP = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_group(group: Any) -> str:
    """A group name is part of every key; the same rule as the config schema's ``group``."""
    if not isinstance(group, str) or not _GROUP.match(group) or group in (".", ".."):
        raise IntegrityError(f"group {group!r}: expected 1-64 letters, digits, '.', '_' or '-'")
    return group








@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, '/'-separated, canonical
    sha256: str
    size: int
    mode: int  # permission bits only

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size": self.size,
            "mode": f"{self.mode:04o}",
        }


@dataclass(frozen=True)
class Manifest:
    version: int
    created: float
    files: tuple[FileEntry, ...]

    def to_bytes(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": self.version,
            "created": self.created,
            "files": [f.to_json() for f in self.files],
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def same_content(self, other: Manifest | None) -> bool:
        """True when both list the same files with the same content and mode (version aside)."""
        return other is not None and self.by_path() == other.by_path()


def check_path(path: Any) -> str:
    """The path itself if it is a safe relative bundle path; IntegrityError otherwise.

    One spelling per file: no leading '/', no '.', '..' or empty components, no
    backslashes or control characters. Escaping through a symlink is prevented
    where files are written (``pull`` creates every directory itself and opens
    with ``O_NOFOLLOW``); here we refuse anything that could even name one.
    """
    if not isinstance(path, str) or not path:
        raise IntegrityError(f"bundle path {path!r}: must be a non-empty string")
    if len(path) > MAX_PATH:
        raise IntegrityError(f"bundle path {path[:60]!r}...: longer than {MAX_PATH} characters")
    if path.startswith("/"):
        raise IntegrityError(f"bundle path {path!r}: absolute paths are refused")
    if "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise IntegrityError(f"bundle path {path!r}: backslash or control character refused")
    parts = path.split("/")
    if ".." in parts:
        raise IntegrityError(f"bundle path {path!r}: '..' components are refused")
    if any(p in ("", ".") for p in parts):
        raise IntegrityError(f"bundle path {path!r}: empty or '.' component (not canonical)")
    if parts[0] == RESERVED:
        raise IntegrityError(f"bundle path {path!r}: '{RESERVED}/' is reserved for the agent")
    return path


def _mode(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise IntegrityError(f"{where}: mode must be an octal string or an integer")
    if isinstance(value, str):
        if not re.fullmatch(r"0?[0-7]{3,4}", value):
            raise IntegrityError(f"{where}: mode {value!r} is not an octal mode like '0644'")
        value = int(value, 8)
    if not isinstance(value, int) or not 0 <= value <= 0o7777:
        raise IntegrityError(f"{where}: mode {value!r} out of range")
    return value


def _file_entry(raw: Any, i: int) -> FileEntry:
    where = f"manifest files[{i}]"
    if not isinstance(raw, Mapping):
        raise IntegrityError(f"{where}: expected an object")
    unknown = set(raw) - {"path", "sha256", "size", "mode"}
    if unknown:
        raise IntegrityError(f"{where}: unknown keys {sorted(unknown)}")
    path = check_path(raw.get("path"))
    sha = raw.get("sha256")
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise IntegrityError(f"{where} ({path}): sha256 must be 64 lowercase hex digits")
    size = raw.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise IntegrityError(f"{where} ({path}): size must be a non-negative integer")
    mode = _mode(raw.get("mode", "0644"), f"{where} ({path})")
    return FileEntry(path, sha, size, mode)


def check_tree(files: Iterable[FileEntry]) -> None:
    """Refuse duplicates and a file that is also a directory of another (``a`` and ``a/b``)."""
    seen: set[str] = set()
    dirs: set[str] = set()
    for f in files:
        if f.path in seen:
            raise IntegrityError(f"bundle path {f.path!r}: listed twice")
        seen.add(f.path)
        parts = f.path.split("/")
        for n in range(1, len(parts)):
            dirs.add("/".join(parts[:n]))
    clash = sorted(seen & dirs)
    if clash:
        raise IntegrityError(f"bundle path {clash[0]!r}: is both a file and a directory")


def parse_manifest(body: bytes) -> Manifest:
    """Bytes from the store -> a checked Manifest, or IntegrityError saying what is wrong."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"manifest is not valid JSON: {exc}") from exc
    return manifest_from_dict(doc)


def manifest_from_dict(doc: Any) -> Manifest:
    if not isinstance(doc, Mapping):
        raise IntegrityError("manifest: expected a JSON object")
    fmt = doc.get("format", FORMAT)
    if fmt != FORMAT:
        raise IntegrityError(f"manifest: format {fmt!r} is not supported (expected {FORMAT})")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise IntegrityError("manifest: version must be a positive integer")
    created = doc.get("created", 0)
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise IntegrityError("manifest: created must be a number (epoch seconds)")
    raw_files = doc.get("files")
    if not isinstance(raw_files, list):
        raise IntegrityError("manifest: files must be a list")
    if len(raw_files) > MAX_FILES:
        raise IntegrityError(f"manifest: {len(raw_files)} files, more than {MAX_FILES}")
    files = tuple(_file_entry(r, i) for i, r in enumerate(raw_files))
    check_tree(files)
    return Manifest(version, float(created), tuple(sorted(files, key=lambda f: f.path)))


def build_manifest(
    files: Iterable[FileEntry], previous: Manifest | None, created: float
) -> Manifest:
    """The next version after ``previous`` (monotonic), with checked and sorted files."""
    entries = tuple(sorted(files, key=lambda f: f.path))
    for f in entries:
        check_path(f.path)
    check_tree(entries)
    version = previous.version + 1 if previous else 1
    return Manifest(version, created, entries)


@dataclass(frozen=True)
class Diff:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]  # content or mode differs

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(sorted(self.added + self.removed + self.changed))

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


def diff(old: Manifest | None, new: Manifest) -> Diff:
    """Which files a new version adds, removes or changes compared with ``old``."""
    a = old.by_path() if old else {}
    b = new.by_path()
    return Diff(
        added=tuple(sorted(set(b) - set(a))),
        removed=tuple(sorted(set(a) - set(b))),
        changed=tuple(
            sorted(
                p for p in set(a) & set(b) if (a[p].sha256, a[p].mode) != (b[p].sha256, b[p].mode)
            )
        ),
    )


def missing(manifest: Manifest, have: Iterable[str]) -> tuple[FileEntry, ...]:
    """One entry per distinct content not in ``have`` (the local cache's sha256s)."""
    have_set = set(have)
    out: dict[str, FileEntry] = {}
    for f in manifest.files:
        if f.sha256 not in have_set and f.sha256 not in out:
            out[f.sha256] = f
    return tuple(out.values())


def plan_prune(versions: Iterable[str], keep: int, protect: Iterable[str]) -> tuple[str, ...]:
    """Local version dirs to delete: all but the newest ``keep``, never a protected one.

    Version dir names start with the zero-padded version number, so sorting by
    name is sorting by age.
    """
    ordered = sorted(set(versions))
    protected = set(protect)
    keep_set = set(ordered[-keep:]) if keep > 0 else set()
    return tuple(v for v in ordered if v not in keep_set and v not in protected)
