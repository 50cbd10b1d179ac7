"""Where the agent reads and writes, all under ``EC2_AGENT_ROOT``.

Every path the agent touches is prefixed by the root (default ``/``) so a test
or a simulated instance lives entirely inside a temp dir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "EC2_AGENT_ROOT"


def root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or "/")


def rooted(path: str | os.PathLike[str], base: Path | None = None) -> Path:
    """Map an absolute path from config (``/etc/nginx/x.conf``) under the root."""
    base = root() if base is None else base
    p = Path(path)
    if p.is_absolute():
        p = p.relative_to(p.anchor)
    return base / p


@dataclass(frozen=True)
class Paths:
    base: Path

    @classmethod
    def from_env(cls) -> Paths:
        return cls(root())

    @property
    def config_file(self) -> Path:
        return rooted("/etc/ec2-agent/agent.yaml", self.base)

    @property
    def state_dir(self) -> Path:
        return rooted("/var/lib/ec2-agent", self.base)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def bundles_dir(self) -> Path:
        return self.state_dir / "bundles"

    @property
    def aws_data_dir(self) -> Path:
        """Lean copies of botocore's data (``agent.aws.botodata``), per botocore version."""
        return self.state_dir / "aws-data"

    def rooted(self, path: str | os.PathLike[str]) -> Path:
        return rooted(path, self.base)
