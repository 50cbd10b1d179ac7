"""The boot's context: what the phases learned so far, immutable, handed phase to phase.

identity -> userdata -> config -> pull -> restore -> render -> register

A phase is a plain function ``BootContext -> Done``: it never changes the context
it was given; it returns a new one with what it adds (``ctx.add(identity=...)``,
``ctx.degrade(reason)``) and a one-line detail for ``status``. The driver
(``agent.boot.run.run_boot``) keeps the latest context, so what each phase depends on
is in its signature and its reads, and what it adds is in its return.

The daemon rebuilds the same context from ``instance.json`` (``agent.boot.instance``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.clock import Clock, Deadline
from agent.interfaces import StoreAPI
from agent.paths import Paths

if TYPE_CHECKING:  # types only: this module must not import the adapters
    from agent.aws.imds import Identity, ImdsClient
    from agent.config.model import Config


def _no_progress(info: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class BootContext:
    paths: Paths
    clock: Clock
    deadline: Deadline
    started_wall: float
    previous: Mapping[str, Any]  # the state.json of the last boot (or {})
    boot_id: str
    baked_config: dict[str, Any] | None = None
    baked_sha256: str | None = None  # of the bytes baked_config was parsed from
    # The daemon validates new config in a child process (``agent.config.memo``).
    isolate_validation: bool = False
    # identity
    imds: ImdsClient | None = None
    identity: Identity | None = None
    boot_kind: str = "first"
    # userdata
    raw_user_data: bytes | None = None
    user_config: dict[str, Any] | None = None
    # config (then pull, which merges the bundle's layer)
    config: Config | None = None
    bundle_dir: Path | None = None
    bundle_config: dict[str, Any] | None = None
    store: StoreAPI | None = None
    # what every phase may add
    degraded: tuple[str, ...] = ()
    state_updates: Mapping[str, Any] = field(default_factory=dict)  # merged into state.json
    # bytes and rate of the running phase, for ``status`` (set by the driver per phase)
    progress: Callable[[dict[str, Any]], None] = field(default=_no_progress, compare=False,
                                                       repr=False)

    def add(self, **changes: Any) -> BootContext:
        """A copy with ``changes`` (field names checked by ``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def degrade(self, reason: str) -> BootContext:
        """A copy that records ``reason``: the boot goes on and ends ``degraded``."""
        return dataclasses.replace(self, degraded=(*self.degraded, reason))

    @property
    def cfg(self) -> Config:
        """The validated config; only phases after ``config`` may ask."""
        if self.config is None:
            raise RuntimeError("no config yet: a phase ran before the config phase")
        return self.config

    @property
    def ident(self) -> Identity:
        """The instance identity; only phases after ``identity`` may ask."""
        if self.identity is None:
            raise RuntimeError("no identity yet: a phase ran before the identity phase")
        return self.identity

    def get_store(self) -> StoreAPI:
        """The boot's store (the pull phase adds one), else a new one for the config."""
        if self.store is not None:
            return self.store
        from agent.aws.store import Store

        cfg = self.cfg
        region = cfg.store.region or (self.identity.region if self.identity else None)
        return Store(cfg.store.bucket, cfg.store.prefix, region=region)


@dataclass(frozen=True)
class Done:
    """What a phase returns: the context with what it added, and a line for ``status``."""

    ctx: BootContext
    detail: str = ""


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[BootContext], Done]
    uses_aws: bool = False  # the driver warms botocore up while the first phases run
