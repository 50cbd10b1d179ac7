"""A Debian root filesystem booted by ``systemd-nspawn --boot``: real systemd as PID 1.

The root filesystem is the cached image, read-only, under an overlay whose upper layer
(the container's disk) is a fresh directory: a fresh copy for every run at no cost, kept
across the container's reboots. The overlay is mounted in a private mount namespace that only the
nspawn process holds, so it disappears with it.

The container joins the network namespace of the process that starts it (the test's,
which has only ``lo``): it gets no interface of its own, nothing routes anywhere, and the
emulators listening on 127.0.0.1 in that namespace are its IMDS and its AWS.

Commands run inside through ``nsenter`` into every namespace of the container's PID 1
(no machined here: the host may not run systemd), as a root login shell, so ``PATH``
is the one an operator gets. The container is stopped by its nspawn PID: SIGTERM asks
for an orderly poweroff; if that does not finish, SIGKILL to the container's PID 1
ends its PID namespace and everything in it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

# systemd-nspawn's exit status when the container rebooted (systemd-nspawn@.service
# restarts it on this status; we do the same).
REBOOT_STATUS = 133
LOGIN_ENV = ["TERM=dumb", "LANG=C.UTF-8", "HOME=/root", "USER=root", "LOGNAME=root"]


def cannot_boot_reason() -> str | None:
    """Why this machine cannot boot a container, or None."""
    if os.geteuid() != 0:
        return ("booting a container with systemd-nspawn needs root with CAP_SYS_ADMIN "
                f"(running as uid {os.geteuid()})")
    for tool, pkg in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux"),
                      ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (package {pkg}; .ci/run installs it)"
    try:
        with open("/proc/self/status") as fh:
            caps = next(line for line in fh if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return "cannot read this process's capabilities from /proc/self/status"
    if not int(caps.split()[1], 16) & (1 << 21):  # CAP_SYS_ADMIN
        return "this process lacks CAP_SYS_ADMIN (an unprivileged container?): cannot boot one"
    try:
        with open("/proc/filesystems") as fh:
            if not any(line.split()[-1:] == ["overlay"] for line in fh):
                return "the kernel has no overlay filesystem (the image is mounted under one)"
    except OSError:
        return "cannot read /proc/filesystems"
    return None


def only_loopback_reason() -> str | None:
    """None when this network namespace has no interface but ``lo``, else why not."""
    # Not /sys/class/net: sysfs shows the namespace of whoever mounted it.
    try:
        names = sorted(name for _, name in socket.if_nameindex())
    except OSError as exc:
        return f"cannot list network interfaces: {exc}"
    if names != ["lo"]:
        return (f"this network namespace has interfaces {names}; the container shares it, so "
                "it must have only lo (make test runs pytest under `unshare -n`)")
    return None


class Container:
    """One root filesystem, booted as often as needed (each boot: a new nspawn process)."""

    def __init__(self, image: Path, workdir: Path, name: str, disk: Path | None = None) -> None:
        """``disk``: where the container's writes go (the overlay's upper layer); a tmpfs
        makes the install and the cleanup fast. Default: ``workdir``."""
        self.image = image
        disk = disk or workdir
        self.upper = disk / "upper"
        self.work = disk / "work"
        self.merged = workdir / "merged"
        for d in (self.upper, self.work, self.merged):
            d.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.boots = 0
        self.started_at = 0.0  # time.monotonic() just before the last nspawn started

    def boot(self, *nspawn_args: str, timeout: float = 60) -> None:
        assert self.proc is None, "already running"
        overlay = f"lowerdir={self.image},upperdir={self.upper},workdir={self.work}"
        mount = (f"mount -t overlay overlay -o {shlex.quote(overlay)} "
                 f"{shlex.quote(str(self.merged))}")
        cmd = ["unshare", "--mount", "--propagation=private", "--", "sh", "-c",
               f'{mount} && exec "$@"', "sh",
               "systemd-nspawn", "--quiet", "--boot", f"--directory={self.merged}",
               f"--machine={self.name}",
               # No machined/bus needed (the host may not run systemd).
               "--register=no", "--keep-unit",
               # The test's own network namespace: only lo, shared with the emulators.
               f"--network-namespace-path=/proc/{os.getpid()}/ns/net",
               "--resolv-conf=off", "--timezone=off", "--link-journal=no",
               "--console=read-only", *nspawn_args]
        self.boots += 1
        with open(self.log, "ab") as out:
            out.write(f"\n===== boot {self.boots}: {shlex.join(cmd)}\n".encode())
            out.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        self.pid1 = self._find_pid1(timeout)
        self.wait_for_manager(timeout)

    def _find_pid1(self, timeout: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}: "
                                   f"{self.tail()}")
            try:
                for pid in children.read_text().split():
                    status = Path(f"/proc/{pid}/status").read_text()
                    nspid = next(line for line in status.splitlines()
                                 if line.startswith("NSpid:")).split()
                    if len(nspid) > 2 and nspid[-1] == "1":
                        return int(pid)
            except (OSError, StopIteration):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"no container PID 1 under nspawn {self.proc.pid}: {self.tail()}")

    def wait_for_manager(self, timeout: float) -> None:
        """Until systemd inside answers on its private bus (early boot is enough)."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.sh("systemctl is-system-running", timeout=10, check=False)
            if res.stdout.strip() in ("initializing", "starting", "running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"systemd in the container never answered: {res.stdout}"
                                   f"{res.stderr} {self.tail()}")
            time.sleep(0.05)

    def wait_for_boot(self, timeout: float = 120) -> str:
        """Until the boot is over (``running`` or ``degraded``). Early boot is no place to
        work: systemd-tmpfiles-setup empties /tmp then (Debian's ``D /tmp``), under whatever
        is using it, e.g. ensurepip's temporary files."""
        res = self.sh("systemctl is-system-running --wait", timeout=timeout, check=False)
        state = res.stdout.strip()
        if state not in ("running", "degraded"):
            raise AssertionError(f"the container's boot ended {state!r}: {res.stderr}")
        return state

    def sh(self, command: str, timeout: float = 60, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``command`` in a root login shell inside the container, as an operator types it."""
        assert self.pid1, "not booted"
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        res = subprocess.run(
            ["nsenter", f"--target={self.pid1}", "--all", "--",
             "/usr/bin/env", "-i", *LOGIN_ENV, *extra, "/bin/bash", "-lc", command],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
            check=False)
        if check and res.returncode != 0:
            raise AssertionError(f"`{command}` exited {res.returncode}\nstdout: {res.stdout}\n"
                                 f"stderr: {res.stderr}")
        return res

    def wait_until(self, command: str, timeout: float, interval: float = 0.3) -> str:
        """Run ``command`` until it exits 0; its stdout."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.sh(command, timeout=max(5.0, timeout), check=False)
            if res.returncode == 0:
                return res.stdout
            if time.monotonic() > deadline:
                raise AssertionError(f"`{command}` still failing after {timeout} s: exit "
                                     f"{res.returncode}\n{res.stdout}{res.stderr}")
            time.sleep(interval)

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        self.pid1 = 0
        return rc

    def reboot(self, timeout: float = 90) -> None:
        """``systemctl reboot`` inside; nspawn exits 133 and is started again, same disk."""
        self.sh("systemctl reboot --no-block")
        rc = self.wait_exit(timeout)
        if rc != REBOOT_STATUS:
            raise AssertionError(f"nspawn exited {rc} on reboot, not {REBOOT_STATUS}: "
                                 f"{self.tail()}")
        self.boot()

    def poweroff(self, timeout: float = 60) -> int | None:
        """Orderly shutdown (SIGTERM to nspawn); SIGKILL the PID namespace if it hangs."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        rc = proc.wait(timeout=30)
        self.proc = None
        self.pid1 = 0
        return rc

    def kill(self) -> None:
        """SIGKILL the container's PID 1 (the whole PID namespace dies), then nspawn."""
        if self.pid1:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def tail(self, n: int = 4000) -> str:
        try:
            data = self.log.read_bytes()[-n:]
        except OSError:
            return ""
        return data.decode(errors="replace")
