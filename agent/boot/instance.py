"""``instance.json``: what ``ec2-agent run`` needs from the boot, and the context rebuilt from it.

The boot saves the identity, the user-data layer, the boot id and the parsed
layers; the daemon rebuilds its context from them without an IMDS call, and
without importing PyYAML or jsonschema (``agent.config.memo``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from agent.bootctx import BootContext
from agent.clock import SYSTEM_CLOCK, Clock, Deadline
from agent.config import jsontag
from agent.errors import StateError
from agent.host import state as statefile
from agent.paths import Paths

log = logging.getLogger("ec2-agent.instance")

INSTANCE_FILE = "instance.json"


def save_instance(paths: Paths, ctx: BootContext) -> None:
    """What ``run`` needs from the boot: identity, the layers, the boot id."""
    from agent.host.files import atomic_write

    doc = {
        "identity": dataclasses.asdict(ctx.identity) if ctx.identity is not None else None,
        "user_config": jsontag.encode(ctx.user_config),  # YAML's int keys, dates survive
        "boot_id": ctx.boot_id,
        "started": ctx.started_wall,
        "layers": _layers_record(ctx),
    }
    atomic_write(paths.state_dir / INSTANCE_FILE,
                 json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n", mode=0o600)


def _layers_record(ctx: BootContext) -> dict[str, Any] | None:
    """The parsed baked and bundle layers, with what identifies their sources.

    So ``run`` starts without parsing YAML (or importing PyYAML): it only checks that
    the baked file still hashes the same and the bundle is still the same version.
    None when the layers do not survive JSON (``run`` then parses them, in a child).
    """
    cur_version = None
    if ctx.bundle_dir is not None:
        from agent.bundle.pull import local_version

        cur = local_version(ctx.paths.bundles_dir, "current")
        cur_version = cur.manifest.version if cur else None
    from agent.config.memo import json_exact

    rec = {"baked": ctx.baked_config, "baked_sha256": ctx.baked_sha256,
           "bundle": ctx.bundle_config, "bundle_version": cur_version}
    return rec if json_exact(rec) is not None else None


def remember_layers(paths: Paths, ctx: BootContext) -> None:
    """Update ``instance.json``'s layers (after a refresh, or a start that parsed them)."""
    from agent.host.files import atomic_write

    p = paths.state_dir / INSTANCE_FILE
    try:
        doc = json.loads(p.read_text())
        doc["layers"] = _layers_record(ctx)
        atomic_write(p, json.dumps(doc, indent=1, sort_keys=True, default=str) + "\n",
                     mode=0o600)
    except (OSError, ValueError) as exc:
        log.warning("cannot update %s: %s", p, exc)


def _file_sha256(path: Path) -> str | None:
    from agent.host.files import sha256_file

    try:
        return sha256_file(path)[0]
    except FileNotFoundError:
        return None


def load_context(paths: Paths, clock: Clock = SYSTEM_CLOCK) -> BootContext:
    """Rebuild the boot's context from local files: no IMDS call needed to restart.

    The layers come from ``instance.json`` when their sources are unchanged (the
    baked file's hash, the bundle's version); otherwise a child process parses and
    validates them (``agent.config.memo``). Either way the daemon imports neither
    PyYAML nor jsonschema.
    """
    from agent.aws.imds import Identity
    from agent.bundle.pull import local_version
    from agent.config.memo import validated_config, validated_files

    st = statefile.read(paths.state_file) or {}
    if st.get("status") not in ("done", "degraded"):
        raise StateError(f"boot has not completed (status {st.get('status', 'not-started')!r}); "
                         "run `ec2-agent boot` first")
    try:
        inst = json.loads((paths.state_dir / INSTANCE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {paths.state_dir / INSTANCE_FILE}: {exc}") from exc
    cur = local_version(paths.bundles_dir, "current")
    bundle_dir = paths.bundles_dir / "current" if cur else None
    version = cur.manifest.version if cur else None
    user = jsontag.decode(inst.get("user_config"))
    baked_sha = _file_sha256(paths.config_file)
    layers = inst.get("layers") if isinstance(inst.get("layers"), dict) else {}
    unchanged = (layers.get("baked_sha256") == baked_sha
                 and layers.get("bundle_version") == version
                 and (baked_sha is None or isinstance(layers.get("baked"), dict)))
    if unchanged:
        baked, bundle = layers.get("baked"), layers.get("bundle")
        config = validated_config(paths.state_dir, baked, user, bundle, isolate=True)
    else:
        v = validated_files(paths.state_dir, user,
                            baked_path=paths.config_file if baked_sha else None,
                            bundle_dir=bundle_dir, bundle_version=version, isolate=True)
        config, baked, bundle = v.config, v.baked, v.bundle
    ctx = BootContext(paths=paths, clock=clock, deadline=Deadline.after(1e9, "run", clock),
                      started_wall=float(inst.get("started") or clock.time()), previous=st,
                      boot_id=str(inst.get("boot_id") or st.get("boot_id") or ""),
                      baked_config=baked, boot_kind=st.get("boot_kind", "reboot"),
                      baked_sha256=baked_sha, identity=Identity(**inst["identity"]),
                      user_config=user, bundle_dir=bundle_dir, bundle_config=bundle,
                      isolate_validation=True, config=config)
    if not unchanged:
        remember_layers(paths, ctx)  # so the next start need not parse them
    return ctx
