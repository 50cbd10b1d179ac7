"""Where the real-boot test cannot run, it skips and says exactly why."""

from __future__ import annotations

import os
import socket

import pytest

from tests.realboot import container, image


def test_not_root_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = container.cannot_boot_reason()
    assert reason is not None and "needs root with CAP_SYS_ADMIN" in reason
    assert "uid 1000" in reason
    assert "needs root" in (image.cannot_build_reason() or "")


def test_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real = container.shutil.which
    monkeypatch.setattr(container.shutil, "which",
                        lambda t: None if t == "systemd-nspawn" else real(t))
    reason = container.cannot_boot_reason()
    assert reason == ("systemd-nspawn is not installed (package systemd-container; "
                      ".ci/run installs it)")


def test_a_namespace_with_more_than_lo_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "if_nameindex", lambda: [(1, "lo"), (2, "eth0")])
    reason = container.only_loopback_reason()
    assert reason is not None and "['eth0', 'lo']" in reason and "only lo" in reason
    monkeypatch.setattr(socket, "if_nameindex", lambda: [(1, "lo")])
    assert container.only_loopback_reason() is None


def test_cache_names_follow_their_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    before = image.rootfs_tar()
    monkeypatch.setattr(image, "ROOTFS_PACKAGES", (*image.ROOTFS_PACKAGES, "nginx"))
    assert image.rootfs_tar() != before
    assert image.rootfs_dir() == image.rootfs_tar().with_suffix("")
    assert image.rootfs_tar().parent == image.CACHE
    assert "requests>=2.28" in image.install_requires()
