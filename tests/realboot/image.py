"""The real-boot test's inputs that need the network: a Debian 12 root filesystem and a wheelhouse.

Run on the host, outside the test's network namespace, by ``make image-cache`` (which
``make test`` depends on): both need a package index (the Debian mirror, PyPI) and the
suite itself runs with only ``lo``. Idempotent and quick once cached::

    python3 tests/realboot/image.py            # build what is missing, print the paths
    python3 tests/realboot/image.py --check    # exit 1 (and say why) when something is missing

Both live outside the repository, under ``$EC2_AGENT_TEST_CACHE`` (default
``/var/cache/ec2-agent-test``), named by a hash of what went into them, so a changed
package list or dependency list builds a new one and an unchanged one is reused:

* ``rootfs-<hash>.tar``: ``mmdebstrap`` of bookworm with systemd, python3, python3-venv,
  cloud-init, iproute2 (``ROOTFS_PACKAGES``), and ``rootfs-<hash>/``, the same unpacked:
  the test mounts it read-only as the lower layer of an overlay, a fresh copy per run.
* ``wheelhouse-<hash>/``: wheels of the agent's ``install_requires`` (from setup.cfg) for
  the container's Python, so ``install.sh`` installs offline inside the container.

Stdlib only: it runs before the venv exists.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EC2_AGENT_TEST_CACHE", "/var/cache/ec2-agent-test"))
SUITE = "bookworm"
MIRROR = os.environ.get("EC2_AGENT_TEST_MIRROR", "http://deb.debian.org/debian")
# What the image needs: an init (systemd as PID 1), the interpreter and venv for
# install.sh, cloud-init (the real one), iproute2 (cloud-init's network probes), dbus
# (systemd-logind, hostnamectl), procps (the operator's ps/pgrep in docs/operations.md),
# locales (cloud-init's locale module runs update-locale, as on Debian's cloud images).
ROOTFS_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "cloud-init",
    "iproute2", "procps", "locales",
)
# Bump when the way the tarball is built changes (not only the package list).
ROOTFS_RECIPE = 2


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def rootfs_tar() -> Path:
    key = _digest(str(ROOTFS_RECIPE), SUITE, MIRROR, *sorted(ROOTFS_PACKAGES))
    return CACHE / f"rootfs-{SUITE}-{key}.tar"


def rootfs_dir() -> Path:
    """The unpacked image the test mounts read-only under an overlay."""
    return rootfs_tar().with_suffix("")


def unpack(tar: Path, dest: Path) -> float:
    """tar -> dest, atomically (GNU tar: device nodes, xattrs and owners as they are)."""
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-xpf", str(tar), "-C", str(tmp)],
                       check=True, stdin=subprocess.DEVNULL)
        tmp.chmod(0o755)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return time.monotonic() - start


def install_requires() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    raw = cfg.get("options", "install_requires", fallback="")
    return sorted(line.strip() for line in raw.splitlines() if line.strip())


def wheelhouse() -> Path:
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return CACHE / f"wheelhouse-py{py}-{_digest(py, *install_requires())}"


def cannot_build_reason() -> str | None:
    """Why this machine cannot build the root filesystem, or None."""
    if os.geteuid() != 0:
        return "building the Debian root filesystem needs root (mmdebstrap, unpacking device nodes)"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (.ci/run installs it)"
    return None


def build_rootfs(dest: Path) -> float:
    """mmdebstrap into dest (a tarball), atomically; returns the seconds it took."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tar", dir=dest.parent)
    os.close(fd)
    try:
        subprocess.run(
            ["mmdebstrap", "--variant=apt", "--mode=root", "--format=tar",
             '--aptopt=APT::Install-Recommends "false"',
             "--include=" + ",".join(ROOTFS_PACKAGES),
             # An image ships without a machine id (systemd makes one at first boot)
             # and without apt lists; cloud-init must not be told it already ran.
             "--customize-hook=rm -f $1/etc/machine-id $1/var/lib/dbus/machine-id",
             "--customize-hook=touch $1/etc/machine-id",
             # cloud-init sets LANG=en_US.UTF-8 by default: generate it, as cloud images do.
             "--customize-hook=sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' "
             "$1/etc/locale.gen && chroot $1 locale-gen",
             "--customize-hook=rm -rf $1/var/lib/apt/lists/* $1/var/cache/apt/*.bin",
             SUITE, tmp, MIRROR],
            check=True, stdin=subprocess.DEVNULL)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return time.monotonic() - start


def build_wheelhouse(dest: Path) -> float:
    """Wheels of the agent's runtime dependencies (and theirs), atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
             "--wheel-dir", str(tmp), *install_requires()],
            check=True, stdin=subprocess.DEVNULL)
        tmp.chmod(0o755)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report what is missing")
    args = ap.parse_args(argv)
    tar, rootfs, wh = rootfs_tar(), rootfs_dir(), wheelhouse()
    if args.check:
        missing = [str(p) for p in (rootfs, wh) if not p.exists()]
        for p in missing:
            print(f"missing: {p}")
        return 1 if missing else 0
    reason = cannot_build_reason()
    if reason is not None:
        # Not an error: the real-boot test then skips and says the same.
        print(f"image-cache: not built: {reason}")
        return 0
    try:
        build(tar, rootfs, wh)
    except (subprocess.CalledProcessError, OSError) as exc:
        # Not fatal for `make test`: the real-boot test then says what is missing (and
        # fails under CI=1, where this must work).
        print(f"image-cache: FAILED, the real-boot test will skip: {exc}", file=sys.stderr)
    return 0


def build(tar: Path, rootfs: Path, wh: Path) -> None:
    if tar.exists():
        print(f"image-cache: rootfs cached: {tar}")
    else:
        print(f"image-cache: building {tar} (mmdebstrap {SUITE}: {' '.join(ROOTFS_PACKAGES)})")
        print(f"image-cache: rootfs built in {build_rootfs(tar):.0f} s")
    if rootfs.exists():
        print(f"image-cache: rootfs unpacked: {rootfs}")
    else:
        print(f"image-cache: rootfs unpacked in {unpack(tar, rootfs):.0f} s: {rootfs}")
    if wh.exists():
        print(f"image-cache: wheelhouse cached: {wh}")
    else:
        print(f"image-cache: building {wh}")
        print(f"image-cache: wheelhouse built in {build_wheelhouse(wh):.0f} s")


if __name__ == "__main__":
    sys.exit(main())
