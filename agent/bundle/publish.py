"""``ec2-agent bundle push DIR``: publish a directory as the group's next bundle version.

Content goes to ``config/<group>/objects/<sha256>`` (one listing tells what the
store already has, so unchanged content is never uploaded again; uploads run in
parallel through s3transfer), and the manifest is written last: it is the commit
point. The manifest write is a compare-and-swap on the ETag read at the start
(``If-None-Match: *`` for the first version), so of two racing pushes exactly one
wins; the loser gets ``PreconditionFailed`` saying which version beat it, and
nothing it did is visible (its objects are unreferenced content, harmless).
We chose "fail, tell, re-run" over "retry on top": a push is a whole-directory
snapshot, and silently stacking it on a version its author never saw would undo
the other push's changes without anyone having decided so.

Files are read once into memory, hashed, and uploaded from those same bytes, so
the stored object always matches its name even if the file changes meanwhile.
A bundle's own ``agent.yaml`` is validated as the bundle layer before anything
is uploaded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.aws.store import Obj
from agent.bundle import manifest as bundle
from agent.bundle.manifest import FileEntry, Manifest
from agent.clock import SYSTEM_CLOCK, Clock
from agent.errors import ConfigError, IntegrityError, NotFound, PreconditionFailed, StoreError
from agent.interfaces import StoreAPI

SKIP_NAMES = frozenset({".git", ".hg", ".svn", "__pycache__", ".DS_Store"})
MAX_BUNDLE_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class PushResult:
    group: str
    version: int
    previous_version: int | None
    etag: str
    files: int
    uploaded: int  # objects uploaded by this push
    already_stored: int  # distinct contents the store already had
    bytes_uploaded: int
    unchanged: bool  # the directory matched the current version: nothing was published

    def summary(self) -> str:
        if self.unchanged:
            return f"group {self.group}: unchanged, still version {self.version}"
        return (f"group {self.group}: published version {self.version} ({self.files} files; "
                f"{self.uploaded} uploaded, {self.bytes_uploaded} bytes; "
                f"{self.already_stored} already stored)")


def collect(src_dir: str | os.PathLike[str]) -> list[tuple[FileEntry, bytes]]:
    """Every regular file under ``src_dir`` with its entry; symlinks must stay inside."""
    root = Path(src_dir)
    if not root.is_dir():
        raise IntegrityError(f"bundle push: {root} is not a directory")
    real_root = os.path.realpath(root)
    out: list[tuple[FileEntry, bytes]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_NAMES)
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise IntegrityError(f"bundle push: {os.path.join(dirpath, d)} is a symlink to "
                                     f"a directory (not supported; copy it in)")
        for name in sorted(filenames):
            if name in SKIP_NAMES:
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            real = os.path.realpath(full)
            if os.path.commonpath([real, real_root]) != real_root:
                raise IntegrityError(f"bundle push: {rel} is a symlink leading outside {root}")
            if not os.path.isfile(real):
                raise IntegrityError(f"bundle push: {rel} is not a regular file")
            bundle.check_path(rel)
            with open(real, "rb") as f:
                data = f.read()
            total += len(data)
            if total > MAX_BUNDLE_BYTES:
                raise IntegrityError(f"bundle push: more than {MAX_BUNDLE_BYTES} bytes; "
                                     f"large data belongs in data snapshots, not the bundle")
            mode = os.stat(real).st_mode & 0o777
            out.append((FileEntry(rel, hashlib.sha256(data).hexdigest(), len(data), mode), data))
    bundle.check_tree(e for e, _ in out)
    return out


def _validate_agent_yaml(root: Path) -> None:
    p = root / "agent.yaml"
    if not p.exists():
        return
    from agent.config.model import LAYER_BUNDLE, validate_file

    errors = validate_file(p, layer=LAYER_BUNDLE)
    if errors:
        raise ConfigError("bundle push refused: " + "; ".join(errors))


def _current(store: StoreAPI, group: str) -> tuple[Manifest | None, str | None]:
    obj = store.get_or_none(bundle.manifest_rel(group))
    if obj is None:
        return None, None
    assert isinstance(obj, Obj)
    return bundle.parse_manifest(obj.body), obj.etag


def _upload(store: StoreAPI, group: str, items: dict[str, bytes], concurrency: int) -> None:
    try:
        store.upload_many({bundle.object_rel(group, sha): data for sha, data in items.items()},
                          concurrency=concurrency)
    except StoreError as exc:
        raise StoreError(f"bundle push: upload failed: {exc}") from exc


def push(store: StoreAPI, group: str, src_dir: str | os.PathLike[str], *,
         clock: Clock = SYSTEM_CLOCK, concurrency: int = 8) -> PushResult:
    """Publish ``src_dir`` as the next version of ``group``'s bundle (see the module doc)."""
    bundle.check_group(group)
    root = Path(src_dir)
    _validate_agent_yaml(root)
    files = collect(root)
    prev, prev_etag = _current(store, group)
    entries = [e for e, _ in files]
    candidate = bundle.build_manifest(entries, prev, created=clock.time())
    if prev is not None and candidate.same_content(prev):
        assert prev_etag is not None
        return PushResult(group, prev.version, prev.version, prev_etag, len(entries), 0,
                          len({e.sha256 for e in entries}), 0, True)
    listing = store.list(bundle.objects_prefix(group))
    stored = {e.key.rsplit("/", 1)[-1]: e.size for e in listing.entries}
    content = {e.sha256: data for e, data in files}
    todo = {sha: data for sha, data in content.items() if stored.get(sha) != len(data)}
    _upload(store, group, todo, concurrency)
    body = candidate.to_bytes()
    rel = bundle.manifest_rel(group)
    try:
        if prev_etag is None:
            etag = store.create(rel, body, content_type="application/json")
        else:
            etag = store.put(rel, body, if_match=prev_etag, content_type="application/json")
    except PreconditionFailed as exc:
        winner: Any = None
        try:
            winner, _ = _current(store, group)
        except (StoreError, NotFound, IntegrityError):
            pass
        now = f"version {winner.version}" if winner is not None else "another version"
        was = f"version {prev.version}" if prev is not None else "no bundle"
        raise PreconditionFailed(
            f"bundle push for group {group} lost a race: the manifest went from {was} to {now} "
            f"while this push ran; nothing from this push was published. Check what changed "
            f"and push again to publish on top of it.") from exc
    return PushResult(group, candidate.version, prev.version if prev else None, etag,
                      len(entries), len(todo), len(content) - len(todo),
                      sum(len(d) for d in todo.values()), False)
