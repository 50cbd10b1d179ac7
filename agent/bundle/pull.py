"""Bundle download: verified, assembled apart, switched atomically; last-known-good kept.

Local layout under ``Paths.bundles_dir``::

    objects/<sha256>          verified content cache (unchanged files are never re-downloaded)
    versions/<v>-<mhash>/     one assembled version; ``.bundle/manifest.json`` and
                              ``.bundle/etag`` record what it is
    current -> versions/...   the version in use (a symlink, swapped with rename)
    lkg -> versions/...       the previous good version
    .staging-*, objects/.dl-* work in progress (removed by the next pull)

Order of trust: the manifest is fetched and fully checked (paths, sizes,
hashes) before anything is written; every object is hashed before it enters the
cache and again while it is copied into the staging dir; only a complete,
fsynced version dir is renamed into ``versions/`` and only then does ``current``
move. A kill -9 at any moment leaves ``current`` pointing at a complete version.

Also here: the boot phase ``pull`` (S3 down or slow -> last-known-good and
``degraded``, within the boot deadline) and ``refresh`` for the daemon's change
watch (conditional GET; a 304 costs one request and no body).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bootctx import BootContext, Done
from agent.bundle import manifest as bundle
from agent.bundle.manifest import Manifest
from agent.clock import Deadline
from agent.errors import (
    AgentError,
    ConfigError,
    DeadlineExceeded,
    IntegrityError,
    NotFound,
    StoreError,
)
from agent.host.files import flocked, fsync_dir, sha256_file
from agent.interfaces import NotModified, Obj, StoreAPI

if TYPE_CHECKING:
    from agent.bundle.apply import ApplyResult
    from agent.config.memo import Validated
    from agent.config.model import Config

META = bundle.RESERVED  # ".bundle"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Remote:
    """A manifest as fetched: parsed, its exact bytes, and its ETag (for conditional GETs)."""

    manifest: Manifest
    body: bytes
    etag: str

    @property
    def dirname(self) -> str:
        return version_dirname(self.manifest, self.body)


@dataclass(frozen=True)
class LocalVersion:
    path: Path  # the resolved version dir
    manifest: Manifest
    etag: str


@dataclass(frozen=True)
class PullResult:
    version: int
    path: Path  # resolved version dir (stable even if ``current`` moves later)
    switched: bool  # False: this version was already current
    downloaded: int  # objects fetched from the store
    cached: int  # distinct objects already in the local cache
    bytes: int  # bytes downloaded
    previous: LocalVersion | None


def version_dirname(manifest: Manifest, body: bytes) -> str:
    """Zero-padded version (sorts by age) plus a hash of the exact manifest bytes."""
    return f"{manifest.version:010d}-{hashlib.sha256(body).hexdigest()[:12]}"


# -- the store side ------------------------------------------------------------------------------

def fetch_manifest(store: StoreAPI, group: str, *,
                   if_none_match: str | None = None) -> Remote | NotModified:
    """The group's manifest as a checked ``Remote``, or ``NotModified``; NotFound if none."""
    obj = store.get(bundle.manifest_rel(group), if_none_match=if_none_match)
    if isinstance(obj, NotModified):
        return obj
    assert isinstance(obj, Obj)
    return Remote(bundle.parse_manifest(obj.body), obj.body, obj.etag)


def poll(store: StoreAPI, group: str, etag: str | None) -> Remote | NotModified:
    """The change watch's probe: a conditional GET; ``NotModified`` (a 304) or a new ``Remote``."""
    return fetch_manifest(store, group, if_none_match=etag)


# -- local versions ----------------------------------------------------------------------------

def _read_local(vdir: Path) -> LocalVersion | None:
    try:
        body = (vdir / META / "manifest.json").read_bytes()
        etag = (vdir / META / "etag").read_text().strip()
        return LocalVersion(vdir, bundle.parse_manifest(body), etag)
    except (OSError, IntegrityError):
        return None


def local_version(bundles_dir: Path, which: str = "current") -> LocalVersion | None:
    """What ``current`` (or ``lkg``) points at, if it is a complete version dir."""
    link = bundles_dir / which
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return _read_local((bundles_dir / target).resolve())


def last_known_good(bundles_dir: Path) -> LocalVersion | None:
    """The version to fall back on when the store cannot be reached: current, else lkg."""
    for which in ("current", "lkg"):
        lv = local_version(bundles_dir, which)
        if lv is not None and _verify_dir(lv.path, lv.manifest, raise_=False):
            return lv
    return None


def _sha_file(path: Path) -> tuple[str, int]:
    return sha256_file(path, _CHUNK)


def _verify_dir(vdir: Path, manifest: Manifest, *, raise_: bool = True) -> bool:
    try:
        for f in manifest.files:
            p = vdir / f.path
            if p.is_symlink() or not p.is_file():
                raise IntegrityError(f"{vdir.name}/{f.path}: missing or not a regular file")
            sha, size = _sha_file(p)
            if (sha, size) != (f.sha256, f.size):
                raise IntegrityError(f"{vdir.name}/{f.path}: content does not match manifest")
    except (OSError, IntegrityError) as exc:
        if raise_:
            if isinstance(exc, IntegrityError):
                raise
            raise IntegrityError(f"{vdir.name}: {exc}") from exc
        return False
    return True


def _locked(bundles_dir: Path) -> contextlib.AbstractContextManager[None]:
    """One pull at a time (boot and the daemon may both try)."""
    return flocked(bundles_dir / ".lock")


def _swap_link(bundles_dir: Path, name: str, target: str) -> None:
    tmp = bundles_dir / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    os.symlink(target, tmp)
    os.replace(tmp, bundles_dir / name)
    fsync_dir(bundles_dir)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# -- download -----------------------------------------------------------------------------------

class _Progress:
    """Aggregates s3transfer progress callbacks; reports at most twice a second."""

    def __init__(self, total: int, report: Callable[[dict[str, Any]], None] | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self.report = report
        self.clock = clock
        self.t0 = clock()
        self.last = 0.0
        self.lock = threading.Lock()

    def add(self, n: int, force: bool = False) -> None:
        with self.lock:
            self.done += n
            now = self.clock()
            if self.report is None or (not force and now - self.last < 0.5):
                return
            self.last = now
            elapsed = max(now - self.t0, 1e-6)
            info = {"bytes": self.done, "total": self.total, "rate": round(self.done / elapsed)}
        self.report(info)


def _download(store: StoreAPI, group: str, entries: tuple[bundle.FileEntry, ...], objects: Path,
              *, concurrency: int, deadline: Deadline | None, progress: _Progress) -> None:
    """Fetch objects in parallel into the cache, verifying each one as it lands."""
    if not entries:
        return
    items = [(bundle.object_rel(group, e.sha256),
              objects / f".dl-{e.sha256}-{uuid.uuid4().hex[:8]}", e.size) for e in entries]

    def expired() -> bool:
        if deadline is not None and deadline.expired():
            raise DeadlineExceeded(f"{deadline.what} deadline exceeded while downloading "
                                   f"the bundle")
        return False

    try:
        store.download_many(items, concurrency=concurrency, on_progress=progress.add,
                            on_done=lambda i: _admit(items[i][1], entries[i], objects),
                            expired=expired)
    except NotFound as exc:
        raise NotFound(f"bundle object missing from the store: {exc}") from exc
    finally:
        for _, tmp, _size in items:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _admit(tmp: Path, e: bundle.FileEntry, objects: Path) -> None:
    """Verify a downloaded object and move it into the cache under its sha256."""
    sha, size = _sha_file(tmp)
    if size != e.size:
        raise IntegrityError(f"bundle object {e.path}: {size} bytes, manifest says {e.size} "
                             f"(truncated or replaced object {e.sha256[:12]})")
    if sha != e.sha256:
        raise IntegrityError(f"bundle object {e.path}: sha256 {sha[:12]}..., manifest says "
                             f"{e.sha256[:12]}... (checksum mismatch)")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, objects / e.sha256)


def _cached(objects: Path, manifest: Manifest) -> set[str]:
    """The manifest's sha256s present and intact in the cache (corrupt entries are dropped)."""
    good: set[str] = set()
    sizes = {f.sha256: f.size for f in manifest.files}
    for sha, size in sizes.items():
        p = objects / sha
        try:
            if p.stat().st_size == size and _sha_file(p)[0] == sha:
                good.add(sha)
            else:
                p.unlink()
        except FileNotFoundError:
            pass
    return good


# -- assembly -----------------------------------------------------------------------------------

def _safe_parent(staging: Path, rel: str) -> Path:
    """Create the parent dirs of ``rel`` inside ``staging``, refusing any symlink on the way."""
    d = staging
    for part in rel.split("/")[:-1]:
        d = d / part
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            if d.is_symlink() or not d.is_dir():
                raise IntegrityError(f"bundle path {rel!r}: {part!r} would escape via a symlink "
                                     f"or is not a directory") from None
    real = os.path.realpath(d)
    if os.path.commonpath([real, os.path.realpath(staging)]) != os.path.realpath(staging):
        raise IntegrityError(f"bundle path {rel!r}: escapes the bundle directory")
    return d


def _assemble(staging: Path, remote: Remote, objects: Path) -> None:
    for f in remote.manifest.files:
        parent = _safe_parent(staging, f.path)
        dest = parent / f.path.rsplit("/", 1)[-1]
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            got = sha256_file(objects / f.sha256, _CHUNK, copy_to=out)
            out.flush()
            os.fchmod(out.fileno(), f.mode)
            os.fsync(out.fileno())
        if got != (f.sha256, f.size):
            with contextlib.suppress(FileNotFoundError):
                (objects / f.sha256).unlink()
            raise IntegrityError(f"bundle object {f.path}: local cache entry changed while "
                                 f"assembling; dropped, pull again")
    meta = staging / META
    meta.mkdir()
    for name, data in (("manifest.json", remote.body), ("etag", remote.etag.encode())):
        fd = os.open(meta / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    for d in sorted({p for p in staging.rglob("*") if p.is_dir() and not p.is_symlink()},
                    key=lambda p: len(p.parts), reverse=True):
        fsync_dir(d)
    fsync_dir(staging)


def _prune(bundles_dir: Path, keep: int) -> list[str]:
    versions = bundles_dir / "versions"
    protect = []
    for which in ("current", "lkg"):
        with contextlib.suppress(OSError):
            protect.append(Path(os.readlink(bundles_dir / which)).name)
    names = [p.name for p in versions.iterdir() if p.is_dir()] if versions.exists() else []
    doomed = bundle.plan_prune(names, keep, protect)
    for name in doomed:
        # Rename first so a half-deleted version is never mistaken for a complete one.
        trash = bundles_dir / f".trash-{name}-{uuid.uuid4().hex[:6]}"
        with contextlib.suppress(OSError):
            os.rename(versions / name, trash)
            _rmtree(trash)
    # The cache keeps what the remaining versions reference.
    referenced: set[str] = set()
    for name in set(names) - set(doomed):
        lv = _read_local(versions / name)
        if lv is not None:
            referenced |= {f.sha256 for f in lv.manifest.files}
    objects = bundles_dir / "objects"
    if objects.exists():
        for p in objects.iterdir():
            if p.name not in referenced and not p.name.startswith(".dl-"):
                with contextlib.suppress(OSError):
                    p.unlink()
    return list(doomed)


def _clean_leftovers(bundles_dir: Path) -> None:
    """Remove what a killed pull left behind (we hold the lock: nobody else is working)."""
    for p in bundles_dir.glob(".staging-*"):
        _rmtree(p)
    for p in bundles_dir.glob(".trash-*"):
        _rmtree(p)
    for p in bundles_dir.glob(".*.tmp-*"):
        with contextlib.suppress(OSError):
            p.unlink()
    objects = bundles_dir / "objects"
    if objects.exists():
        for p in objects.glob(".dl-*"):
            with contextlib.suppress(OSError):
                p.unlink()


def pull(store: StoreAPI, group: str, bundles_dir: Path, *, keep: int = 3,
         remote: Remote | None = None, accept: Callable[[Path, Remote], None] | None = None,
         deadline: Deadline | None = None,
         progress: Callable[[dict[str, Any]], None] | None = None,
         concurrency: int = 8) -> PullResult:
    """Make the group's bundle version (``remote``, else fetched now) ``current``.

    ``accept(staging_dir, remote)`` may refuse the assembled version by raising
    (``phase_pull`` validates the bundle's ``agent.yaml`` there) before ``current``
    moves. Raises IntegrityError / StoreError / NotFound / DeadlineExceeded with
    ``current`` untouched; a refused manifest writes nothing at all.
    """
    if remote is None:
        remote = fetch_manifest(store, group)
        assert isinstance(remote, Remote)
    manifest = remote.manifest
    name = remote.dirname
    with _locked(bundles_dir):
        previous = local_version(bundles_dir, "current")
        _clean_leftovers(bundles_dir)
        versions = bundles_dir / "versions"
        objects = bundles_dir / "objects"
        versions.mkdir(exist_ok=True)
        objects.mkdir(exist_ok=True)
        vdir = versions / name
        if (previous is not None and previous.path.name == name
                and _verify_dir(vdir, manifest, raise_=False)):
            return PullResult(manifest.version, vdir, False, 0, len(bundle.missing(manifest, ())),
                              0, previous)
        have = _cached(objects, manifest)
        need = bundle.missing(manifest, have)
        prog = _Progress(sum(e.size for e in need), progress)
        _download(store, group, need, objects, concurrency=concurrency, deadline=deadline,
                  progress=prog)
        if need:
            prog.add(0, force=True)
        if vdir.exists() and not _verify_dir(vdir, manifest, raise_=False):
            trash = bundles_dir / f".trash-{name}-{uuid.uuid4().hex[:6]}"
            os.rename(vdir, trash)
            _rmtree(trash)
        if not vdir.exists():
            staging = bundles_dir / f".staging-{uuid.uuid4().hex[:10]}"
            staging.mkdir()
            try:
                _assemble(staging, remote, objects)
                if accept is not None:
                    accept(staging, remote)
                os.rename(staging, vdir)
            except BaseException:
                _rmtree(staging)
                raise
            fsync_dir(versions)
        elif accept is not None:
            accept(vdir, remote)
        if previous is not None and previous.path.name != name:
            _swap_link(bundles_dir, "lkg", f"versions/{previous.path.name}")
        _swap_link(bundles_dir, "current", f"versions/{name}")
        _prune(bundles_dir, keep)
        return PullResult(manifest.version, vdir, True, len(need), len(have), prog.done, previous)


# -- boot phase ---------------------------------------------------------------------------------

def _merge_dir(ctx: BootContext, vdir: Path, version: int | None) -> Validated:
    """The bundle's agent.yaml in ``vdir`` merged with the other layers and validated
    (``configcache.Validated``); in the daemon a child process parses and validates."""
    from agent.config.memo import validated_files

    return validated_files(ctx.paths.state_dir, ctx.user_config, baked=ctx.baked_config,
                           bundle_dir=vdir, bundle_version=version,
                           isolate=ctx.isolate_validation)


def _validating(ctx: BootContext) -> tuple[Callable[[Path, Remote], None],
                                           Callable[[Path, int], Validated]]:
    """``pull``'s ``accept`` (a staged bundle whose config does not validate is refused,
    ``current`` untouched) and the lookup of the version then taken, which reuses that
    validation instead of doing it again."""
    checked: dict[int, Validated] = {}

    def accept(staged: Path, r: Remote) -> None:
        checked[r.manifest.version] = _merge_dir(ctx, staged, r.manifest.version)

    def merged(vdir: Path, version: int) -> Any:
        return checked.get(version) or _merge_dir(ctx, vdir, version)

    return accept, merged


def _boot_store(ctx: BootContext, budget: float) -> StoreAPI:
    """A store whose S3 client cannot outlive ``budget`` seconds (timeouts and attempts)."""
    if ctx.store is not None:
        return ctx.store
    from agent.aws import session as aws
    from agent.aws.store import Store

    cfg = ctx.cfg
    region = cfg.store.region or (ctx.identity.region if ctx.identity else None)
    connect = max(0.2, min(2.0, budget / 4))
    read = max(0.5, min(10.0, budget / 2))
    attempts = max(1, min(3, int(budget // (connect + read))))
    client = aws.client("s3", region, connect_timeout=connect, read_timeout=read,
                        max_attempts=attempts, max_pool_connections=16)
    # The later boot phases (restore, register) reuse it: one S3 client per boot, and its
    # timeouts are bounded by the boot's own budget anyway.
    return Store(cfg.store.bucket, cfg.store.prefix, client=client)


def _budget_deadline(ctx: BootContext, fraction: float) -> Deadline:
    left = ctx.deadline.remaining()
    return Deadline(ctx.deadline.clock.monotonic() + left * fraction, "boot (bundle pull share)",
                    ctx.deadline.clock)


def phase_pull(ctx: BootContext) -> Done:
    """Boot phase ``pull``: the group's bundle becomes ``current``; lkg if the store is sick.

    Adds the store (the later phases reuse its client), the bundle's dir and layer,
    and the config merged with that layer.
    """
    cfg = ctx.cfg
    bundles_dir = ctx.paths.bundles_dir
    lkg = last_known_good(bundles_dir)
    # With a fallback, spend at most half of what is left on S3; without one, nearly all.
    share = 0.5 if lkg is not None else 0.9
    sub = _budget_deadline(ctx, share)
    try:
        store = _boot_store(ctx, sub.remaining())
        ctx = ctx.add(store=store)
        etag = lkg.etag if lkg is not None and lkg.path.name == _current_name(bundles_dir) else None
        remote = fetch_manifest(store, cfg.group, if_none_match=etag)
    except NotFound as exc:
        if lkg is not None:
            return _fallback(ctx, lkg, exc)
        return Done(ctx.add(bundle_dir=None, bundle_config=None),
                    f"no bundle published for group {cfg.group}")
    except (StoreError, DeadlineExceeded, IntegrityError, OSError) as exc:
        return _fallback(ctx, lkg, exc)
    accept, merged = _validating(ctx)
    if isinstance(remote, NotModified):
        assert lkg is not None
        chosen, version = lkg.path, lkg.manifest.version
        detail = f"version {version} (unchanged)"
    else:
        try:
            res = pull(store, cfg.group, bundles_dir, keep=cfg.bundle.keep, remote=remote,
                       accept=accept, deadline=sub, progress=ctx.progress)
        except ConfigError:
            raise  # a bad bundle agent.yaml: an error naming the layer; current untouched
        except (StoreError, DeadlineExceeded, IntegrityError, OSError) as exc:
            return _fallback(ctx, lkg, exc)
        chosen, version = res.path, res.version
        detail = (f"version {version}: {res.downloaded} objects downloaded "
                  f"({res.bytes} bytes), {res.cached} cached")
    got = merged(chosen, version)
    return Done(ctx.add(bundle_dir=chosen, bundle_config=got.bundle, config=got.config), detail)


def _current_name(bundles_dir: Path) -> str | None:
    try:
        return Path(os.readlink(bundles_dir / "current")).name
    except OSError:
        return None


def _fallback(ctx: BootContext, lkg: LocalVersion | None, exc: BaseException) -> Done:
    reason = f"{type(exc).__name__}: {exc}"
    if lkg is None:
        raise StoreError(f"bundle: cannot get version from the store and no last-known-good "
                         f"version: {reason}") from exc
    got = _merge_dir(ctx, lkg.path, lkg.manifest.version)
    ctx = ctx.add(config=got.config, bundle_dir=lkg.path, bundle_config=got.bundle)
    ctx = ctx.degrade(f"bundle: using last-known-good version {lkg.manifest.version}: {reason}")
    return Done(ctx, f"version {lkg.manifest.version} (last-known-good)")


# -- change watch (daemon) ----------------------------------------------------------------------

@dataclass(frozen=True)
class RefreshResult:
    status: str  # not-modified | updated | error | no-bundle
    version: int | None = None
    previous_version: int | None = None
    changed_paths: tuple[str, ...] = ()  # bundle files added, removed or changed
    apply: ApplyResult | None = None  # when rendered
    config: Config | None = None  # the re-merged config when the bundle changed
    ctx: BootContext | None = None  # the context with the new bundle, when one was taken
    error: str | None = None
    etag: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reloaded(self) -> tuple[str, ...]:
        return tuple(r.command for r in self.apply.reloads) if self.apply is not None else ()


def refresh(ctx: BootContext, *, store: StoreAPI | None = None,
            dry_run: bool = False) -> RefreshResult:
    """One tick of the change watch: conditional GET; on a new version pull, render, reload.

    ``store`` defaults to ``ctx.get_store()``; a taken bundle comes back as
    ``RefreshResult.ctx`` (the caller keeps it). Only services whose rendered files changed are
    reloaded (``agent.bundle.apply`` skips unchanged files). Never raises an
    ``AgentError``: failures come back as ``status="error"`` for the daemon to record;
    ``current`` and the rendered files stay as they were.
    """
    cfg = ctx.cfg
    bundles_dir = ctx.paths.bundles_dir
    cur = local_version(bundles_dir, "current")
    try:
        if store is None:
            store = ctx.get_store()
        remote = poll(store, cfg.group, cur.etag if cur else None)
    except NotFound:
        if cur is None:
            return RefreshResult("no-bundle")
        return RefreshResult("error", version=cur.manifest.version,
                             error=f"bundle manifest for group {cfg.group} vanished from the "
                                   f"store; keeping version {cur.manifest.version}")
    except AgentError as exc:
        return RefreshResult("error", version=cur.manifest.version if cur else None,
                             error=f"{type(exc).__name__}: {exc}")
    try:
        if isinstance(remote, NotModified):
            return RefreshResult("not-modified", version=cur.manifest.version if cur else None,
                                 etag=cur.etag if cur else None)
        assert isinstance(remote, Remote)
        changed = bundle.diff(cur.manifest if cur else None, remote.manifest).paths

        accept, merged = _validating(ctx)
        res = pull(store, cfg.group, bundles_dir, keep=cfg.bundle.keep, remote=remote,
                   accept=accept)
        got = merged(res.path, res.version)
        new_cfg, bundle_config = got.config, got.bundle
        from agent.bundle.apply import render_all

        applied = render_all(new_cfg, res.path, paths=ctx.paths, identity=ctx.identity,
                             peers=_peers(ctx), dry_run=dry_run)
    except AgentError as exc:
        return RefreshResult("error", version=cur.manifest.version if cur else None,
                             error=f"{type(exc).__name__}: {exc}")
    new_ctx = ctx.add(config=new_cfg, bundle_dir=res.path, bundle_config=bundle_config)
    return RefreshResult("updated" if applied.ok else "error", version=res.version,
                         previous_version=cur.manifest.version if cur else None,
                         changed_paths=changed, apply=applied, config=new_cfg, ctx=new_ctx,
                         error=None if applied.ok else "; ".join(applied.errors),
                         etag=remote.etag)


def _peers(ctx: BootContext) -> list[dict[str, Any]]:
    from agent.bundle.render import peers_from_state
    from agent.host import state as statefile

    try:
        st = statefile.read(ctx.paths.state_file) or {}
    except AgentError:
        return []
    return peers_from_state(st.get("peers"))
