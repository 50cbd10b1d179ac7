"""Rendered files onto the disk: stage, check, swap, reload; undo what a reload refuses.

For each template: render (``agent.bundle.render``, no side effects), then stage the
bytes next to the destination with the final mode and owner, run ``check`` on
the staged file (``{staged}`` replaced by its path), and rename it over the
destination keeping one ``.bak`` (``agent.host.files``: fsync file and directory).
Unchanged content, mode and owner: nothing is written and nothing reloads.
After all swaps, each distinct reload command runs once. A reload that fails
puts back the ``.bak`` of every file it covers (a file that did not exist before
is removed), runs the reload again, and records both outcomes.

A file that used a secret is written 0600 (or stricter), and everything this
module records (results, errors, check output) carries secret references only:
command output passes through the resolver's ``redact`` first.

The result says did-write / would-write per file (consul-template's
``RenderResult``), so ``dry_run`` writes nothing, runs no checks and no reloads.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shlex
import subprocess
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bootctx import BootContext, Done
from agent.bundle import manifest as bundle
from agent.bundle.render import build_context, peers_from_state, render
from agent.errors import AgentError, IntegrityError, RenderError
from agent.host import files

if TYPE_CHECKING:
    from agent.aws.imds import Identity
    from agent.clock import Deadline
    from agent.config.model import Config, TemplateSpec
    from agent.paths import Paths

CHECK_TIMEOUT_S = 60.0
RELOAD_TIMEOUT_S = 60.0
OUTPUT_TAIL = 400


@dataclass(frozen=True)
class FileResult:
    src: str
    dest: str  # as configured (not rooted)
    action: str  # wrote | would-write | unchanged | render-failed | check-failed |
    #              write-failed | restored | removed
    reload: str | None = None
    secrets: tuple[str, ...] = ()  # references only
    error: str | None = None

    @property
    def changed(self) -> bool:
        return self.action in ("wrote", "would-write")


@dataclass(frozen=True)
class ReloadResult:
    command: str
    ran: bool
    ok: bool
    files: tuple[str, ...]
    error: str | None = None
    restored: tuple[str, ...] = ()  # files put back after the failure
    retry_ok: bool | None = None  # the second reload, after the restore
    retry_error: str | None = None


@dataclass(frozen=True)
class ApplyResult:
    files: tuple[FileResult, ...]
    reloads: tuple[ReloadResult, ...]
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> tuple[str, ...]:
        out = [f"{f.src} -> {f.dest}: {f.error}" for f in self.files if f.error]
        for r in self.reloads:
            if r.error:
                msg = f"reload {r.command!r}: {r.error}"
                if r.restored:
                    msg += f"; restored {', '.join(r.restored)}"
                if r.retry_ok is not None:
                    msg += ("; reload after restore ok" if r.retry_ok
                            else f"; reload after restore failed: {r.retry_error}")
                out.append(msg)
        return tuple(out)

    @property
    def written(self) -> tuple[str, ...]:
        return tuple(f.dest for f in self.files if f.action == "wrote")

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for f in self.files:
            counts[f.action] = counts.get(f.action, 0) + 1
        parts = [f"{n} {a}" for a, n in sorted(counts.items())]
        ran = [r.command for r in self.reloads if r.ran]
        if ran:
            parts.append(f"reloaded: {', '.join(ran)}")
        elif self.dry_run and self.reloads:
            parts.append(f"would reload: {', '.join(r.command for r in self.reloads)}")
        return f"{len(self.files)} templates: " + ", ".join(parts) if parts else "no templates"

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "files": [f.__dict__ | {"changed": f.changed} for f in self.files],
            "reloads": [r.__dict__ for r in self.reloads],
            "errors": list(self.errors),
        }


@dataclass(frozen=True)
class Planned:
    """One template rendered and resolved to its final bytes, mode and owner (or an error)."""

    src: str
    dest: str
    path: Path  # rooted destination
    data: bytes = b""
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    check: str | None = None
    reload: str | None = None
    secrets: tuple[str, ...] = ()
    error: str | None = None


# -- planning (render) -------------------------------------------------------------------------

def _id(value: Any, kind: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    try:
        return (pwd.getpwnam(value).pw_uid if kind == "owner" else grp.getgrnam(value).gr_gid)
    except KeyError:
        raise RenderError(f"{kind} {value!r}: no such {'user' if kind == 'owner' else 'group'}") \
            from None


def _mode(spec: TemplateSpec) -> int | None:
    if spec.mode is None:
        return None
    if isinstance(spec.mode, int):
        return spec.mode
    return int(spec.mode, 8)


def _bundle_file(bundle_dir: Path, rel: str) -> Path:
    bundle.check_path(rel)
    p = bundle_dir / rel
    real = os.path.realpath(p)
    base = os.path.realpath(bundle_dir)
    if os.path.commonpath([real, base]) != base:
        raise IntegrityError(f"template {rel!r}: escapes the bundle through a symlink")
    return p


def _read_source(bundle_dir: Path | None, rel: str) -> str:
    if bundle_dir is None:
        raise RenderError(f"template {rel}: no bundle available for this group")
    try:
        return _bundle_file(bundle_dir, rel).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise RenderError(f"template {rel}: not in the bundle") from None
    except UnicodeDecodeError as exc:
        raise RenderError(f"template {rel}: not UTF-8 text ({exc.reason} at byte {exc.start})") \
            from None
    except OSError as exc:
        raise RenderError(f"template {rel}: cannot read: {exc.strerror}") from None


def plan(specs: Sequence[TemplateSpec], bundle_dir: Path | None, context: dict[str, Any], *,
         rooted: Callable[[str], Path], secret: Callable[[str], str] | None) -> list[Planned]:
    """Render every template; a failure is recorded on its item and the others go on."""

    def loader(name: str) -> str | None:
        try:
            return _read_source(bundle_dir, name)
        except RenderError:
            return None

    out: list[Planned] = []
    for spec in specs:
        dest_path = rooted(spec.dest)
        base = dict(src=spec.src, dest=spec.dest, path=dest_path, check=spec.check,
                    reload=spec.reload)
        try:
            source = _read_source(bundle_dir, spec.src)
            r = render(spec.src, source, context, secret=secret, loader=loader)
            mode = _mode(spec)
            if r.secrets:
                mode = 0o600 if mode is None else mode & 0o600
            out.append(Planned(**base, data=r.data, mode=mode,
                               uid=_id(spec.owner, "owner"),
                               gid=_id(spec.group, "group"),
                               secrets=r.secrets))
        except AgentError as exc:
            out.append(Planned(**base, error=str(exc)))
    return out


# -- applying ---------------------------------------------------------------------------------

def _unchanged(p: Planned) -> bool:
    try:
        st = os.stat(p.path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not os.path.isfile(p.path) or os.path.islink(p.path):
        return False
    if p.mode is not None and (st.st_mode & 0o7777) != p.mode:
        return False
    if p.uid is not None and st.st_uid != p.uid:
        return False
    if p.gid is not None and st.st_gid != p.gid:
        return False
    return st.st_size == len(p.data) and p.path.read_bytes() == p.data


def _run(cmd: str, timeout: float, redact: Callable[[str], str]) -> str | None:
    """None on success, else a short (redacted) reason."""
    try:
        proc = subprocess.run(cmd, shell=True, capture_output=True, timeout=timeout,  # noqa: S602
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f}s"
    except OSError as exc:
        return f"could not run: {exc.strerror}"
    if proc.returncode == 0:
        return None
    out = (proc.stderr or proc.stdout or b"").decode(errors="replace").strip()
    out = redact(out)[-OUTPUT_TAIL:]
    return f"exit {proc.returncode}" + (f": {out}" if out else "")


def _cleanup_stale(path: Path) -> None:
    """Staged temp files a killed render left beside this destination."""
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f".{path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def _restore(path: Path, had_old: bool) -> str:
    bak = path.with_name(path.name + ".bak")
    if had_old:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        os.link(bak, tmp)
        os.replace(tmp, path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    files.fsync_dir(path.parent)
    return "restored" if had_old else "removed"


def render_lock(state_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Boot and the daemon never write the same files at once."""
    return files.flocked(state_dir / "render.lock")


def apply_planned(items: Sequence[Planned], *, dry_run: bool = False,
                  redact: Callable[[str], str] = lambda s: s,
                  check_timeout: float = CHECK_TIMEOUT_S,
                  reload_timeout: float = RELOAD_TIMEOUT_S) -> ApplyResult:
    results: list[FileResult] = []
    swapped: list[tuple[int, bool]] = []  # (index into results, dest existed before)
    for p in items:
        fr = dict(src=p.src, dest=p.dest, reload=p.reload, secrets=p.secrets)
        if p.error:
            results.append(FileResult(**fr, action="render-failed", error=p.error))
            continue
        if _unchanged(p):
            results.append(FileResult(**fr, action="unchanged"))
            continue
        if dry_run:
            results.append(FileResult(**fr, action="would-write"))
            continue
        staged: Path | None = None
        try:
            _cleanup_stale(p.path)
            had_old = p.path.exists()
            staged = files.stage(p.path, p.data, mode=p.mode, uid=p.uid, gid=p.gid)
            if p.check:
                err = _run(p.check.replace("{staged}", shlex.quote(str(staged))),
                           check_timeout, redact)
                if err is not None:
                    results.append(FileResult(**fr, action="check-failed",
                                              error=f"check {p.check!r} refused it: {err}"))
                    continue
            files.commit(staged, p.path, backup=True)
            staged = None
        except OSError as exc:
            results.append(FileResult(**fr, action="write-failed",
                                      error=f"cannot write: {exc.strerror or exc}"))
            continue
        finally:
            if staged is not None:
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
        swapped.append((len(results), had_old))
        results.append(FileResult(**fr, action="wrote"))

    # Reloads: de-duplicated, in first-use order, once each, after all swaps.
    order: list[str] = []
    for r in results:
        if r.changed and r.reload and r.reload not in order:
            order.append(r.reload)
    reloads: list[ReloadResult] = []
    for cmd in order:
        covered = tuple(r.dest for r in results if r.changed and r.reload == cmd)
        if dry_run:
            reloads.append(ReloadResult(cmd, ran=False, ok=True, files=covered))
            continue
        err = _run(cmd, reload_timeout, redact)
        if err is None:
            reloads.append(ReloadResult(cmd, ran=True, ok=True, files=covered))
            continue
        restored: list[str] = []
        for idx, had_old in swapped:
            r = results[idx]
            if r.reload != cmd:
                continue
            try:
                action = _restore(items[_item_index(items, r)].path, had_old)
            except OSError as exc:
                results[idx] = FileResult(r.src, r.dest, "wrote", r.reload, r.secrets,
                                          f"reload failed and restoring .bak failed: {exc}")
                continue
            results[idx] = FileResult(r.src, r.dest, action, r.reload, r.secrets,
                                      f"reload {cmd!r} failed; previous file {action}")
            restored.append(r.dest)
        retry = _run(cmd, reload_timeout, redact)
        reloads.append(ReloadResult(cmd, ran=True, ok=False, files=covered, error=err,
                                    restored=tuple(restored), retry_ok=retry is None,
                                    retry_error=retry))
    return ApplyResult(tuple(results), tuple(reloads), dry_run)


def _item_index(items: Sequence[Planned], r: FileResult) -> int:
    for i, p in enumerate(items):
        if p.src == r.src and p.dest == r.dest:
            return i
    raise KeyError(r.dest)  # pragma: no cover - results are built from items


# -- the shell around it --------------------------------------------------------------------------

def render_all(config: Config, bundle_dir: Path | None, *, paths: Paths,
               identity: Identity | None, peers: Sequence[dict[str, Any]] = (),
               dry_run: bool = False, secret: Callable[[str], str] | None = None,
               deadline: Deadline | None = None) -> ApplyResult:
    """Render, check, swap and reload every configured template (under the render lock)."""
    from agent.aws.secrets import SecretResolver

    specs = tuple(config.templates)
    if not specs:
        return ApplyResult((), (), dry_run)
    instance = identity.as_context() if identity is not None else {}
    context = build_context(instance, config.group, dict(config.vars), peers)
    if secret is None:
        timeout = deadline.remaining() if deadline is not None else None
        secret = SecretResolver(identity.region if identity is not None else None,
                                timeout=timeout)
    # the resolver knows the values it handed out; a plain callable (tests) redacts nothing
    redact = secret.redact if isinstance(secret, SecretResolver) else (lambda s: s)
    check_t = CHECK_TIMEOUT_S if deadline is None else deadline.cap(CHECK_TIMEOUT_S)
    reload_t = RELOAD_TIMEOUT_S if deadline is None else deadline.cap(RELOAD_TIMEOUT_S)
    with render_lock(paths.state_dir):
        items = plan(specs, bundle_dir, context, rooted=paths.rooted, secret=secret)
        return apply_planned(items, dry_run=dry_run, redact=redact, check_timeout=check_t,
                             reload_timeout=reload_t)


def phase_render(ctx: BootContext) -> Done:
    """Boot phase ``render``: every template; any failure fails the phase, after all were tried."""
    peers = peers_from_state(ctx.previous.get("peers"))
    result = render_all(ctx.cfg, ctx.bundle_dir, paths=ctx.paths, identity=ctx.identity,
                        peers=peers, deadline=ctx.deadline)
    if not result.ok:
        raise RenderError("; ".join(result.errors))
    return Done(ctx, result.summary())
