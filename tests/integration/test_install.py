"""packaging/install.sh: wheel -> PREFIX/opt/ec2-agent venv, units, default config; idempotent.

Offline by construction (the suite runs in a network namespace): the wheel is
built with ``python -m build --wheel --no-isolation`` from a copy of the source
tree (no build-dependency download, nothing written into the work tree), and
installed with ``EC2_AGENT_PIP_ARGS="--no-index --no-deps"``. The runtime
dependencies (boto3, jinja2, ...) are not installed into the new venv: a
``.pth`` file added by the test makes the dev venv's site-packages visible
*after* the venv's own, so ``ec2-agent --help`` runs the installed copy of the
agent with the dev venv's libraries. On a real image install.sh resolves the
dependencies from an index or a wheelhouse (``--find-links``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "packaging" / "install.sh"

pytestmark = pytest.mark.slow  # builds a wheel and a venv: 10-30 s, mostly ensurepip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wheel for the module: building it is most of the time."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def build_wheel(tmp_path: Path) -> Path:
    pytest.importorskip("build", reason="`build` is a dev dependency")
    try:
        import setuptools

        major = int(setuptools.__version__.split(".")[0])
    except (ImportError, ValueError):  # pragma: no cover
        major = 0
    if major < 70:
        # setuptools < 70.1 builds wheels through the `wheel` package.
        pytest.importorskip("wheel", reason="setuptools < 70.1 needs `wheel` to build a wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "agent", src / "agent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path / "dist"
    res = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out),
         str(src)],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (tmp_path / "build.log").write_text(res.stdout + res.stderr)
    wheels = list(out.glob("ec2_agent-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def install(prefix: Path, wheel: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EC2_AGENT_PIP_ARGS": "--no-index --no-deps",
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INPUT": "1"}
    env.pop("PIP_FIND_LINKS", None)
    res = subprocess.run(
        ["sh", str(INSTALL), "--wheel", str(wheel), "--python", sys.executable, *extra,
         str(prefix)],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
        check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under root: (mode, size, mtime_ns, link target) - any rewrite shows."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            link = os.readlink(p) if p.is_symlink() else ""
            size = 0 if p.is_dir() else st.st_size
            out[str(p.relative_to(root))] = (st.st_mode, size, st.st_mtime_ns, link)
    return out


def test_install_twice_into_a_temp_root(tmp_path: Path, wheel: Path) -> None:
    prefix = tmp_path / "root"

    first = install(prefix, wheel, "--enable")
    assert "installing ec2_agent-" in first.stdout

    venv = prefix / "opt" / "ec2-agent"
    units = prefix / "etc" / "systemd" / "system"
    for unit in ("ec2-agent-boot.service", "ec2-agent.service", "ec2-agent.target"):
        assert (units / unit).read_bytes() == (REPO / "packaging" / "systemd" / unit).read_bytes()
        assert (units / unit).stat().st_mode & 0o777 == 0o644
    if shutil.which("systemctl"):
        wants = units / "multi-user.target.wants"
        assert sorted(p.name for p in wants.iterdir()) == [
            "ec2-agent-boot.service", "ec2-agent.service", "ec2-agent.target"]
    # On the PATH: /usr/local/bin/ec2-agent -> the venv's (the path on the installed system).
    link = prefix / "usr" / "local" / "bin" / "ec2-agent"
    assert os.readlink(link) == "/opt/ec2-agent/bin/ec2-agent"
    assert f"linked {link} -> /opt/ec2-agent/bin/ec2-agent" in first.stdout
    config = prefix / "etc" / "ec2-agent" / "agent.yaml"
    assert config.read_bytes() == (REPO / "packaging" / "config" / "agent.yaml").read_bytes()

    # Dependencies for the smoke run (see the module docstring), after the venv's own path.
    purelib = Path(sysconfig.get_paths()["purelib"])
    site = next((venv / "lib").glob("python3.*/site-packages"))
    (site / "zz_test_deps.pth").write_text(f"{purelib}\n")

    # An operator edits the config; the reinstall must keep it.
    config.write_text("# operator's own\nboot: {deadline_s: 300}\n")
    before = snapshot(prefix)

    second = install(prefix, wheel, "--enable")
    assert "nothing to do" in second.stdout, second.stdout
    assert snapshot(prefix) == before
    assert config.read_text() == "# operator's own\nboot: {deadline_s: 300}\n"

    exe = venv / "bin" / "ec2-agent"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # cwd outside the work tree: `python -c` puts the cwd first on sys.path.
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60,
                         env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, check=False)
    assert res.returncode == 0, res.stderr
    assert "usage: ec2-agent" in res.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import agent; print(agent.__file__)"],
                           capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
                           check=True)
    assert where.stdout.strip().startswith(str(site)), where.stdout  # the installed copy

    # Third run (same venv: creating one is most of this test's time): a rebuilt
    # wheel with the same version but other bytes is reinstalled (keyed by
    # sha256, not by version), and a unit edited by hand is put back.
    unit = units / "ec2-agent.service"
    unit.write_text("stale\n")
    rebuilt = tmp_path / "rebuilt" / wheel.name
    rebuilt.parent.mkdir()
    shutil.copy2(wheel, rebuilt)
    with open(rebuilt, "ab") as fh:
        fh.write(b"\0")  # zip readers ignore bytes after the end of central directory
    third = install(prefix, rebuilt, "--enable")
    assert "installing ec2_agent-" in third.stdout
    assert f"wrote {unit}" in third.stdout
    assert unit.read_bytes() == (REPO / "packaging" / "systemd" / unit.name).read_bytes()
    assert config.read_text() == "# operator's own\nboot: {deadline_s: 300}\n"


def test_link_on_the_path_is_repaired_and_a_foreign_file_kept(tmp_path: Path,
                                                              wheel: Path) -> None:
    prefix = tmp_path / "root"
    bindir = prefix / "usr" / "local" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "ec2-agent").symlink_to("/somewhere/old")
    first = install(prefix, wheel)
    assert os.readlink(bindir / "ec2-agent") == "/opt/ec2-agent/bin/ec2-agent", first.stdout
    # An operator's own file there is not ours to replace.
    (bindir / "ec2-agent").unlink()
    (bindir / "ec2-agent").write_text("#!/bin/sh\necho mine\n")
    second = install(prefix, wheel)
    assert (bindir / "ec2-agent").read_text() == "#!/bin/sh\necho mine\n"
    assert "left " in second.stdout and "not a link" in second.stdout, second.stdout


def test_build_says_nothing_about_package_data(wheel: Path) -> None:
    """setuptools warned on every build that agent.schema is "absent from the packages
    configuration" (setup.cfg used find:); the schema must still ship in the wheel."""
    import zipfile

    log = (wheel.parent.parent / "build.log").read_text()
    assert "absent from the `packages` configuration" not in log, log[-3000:]
    assert "Package would be ignored" not in log
    noisy = [line for line in log.splitlines()
             if re.search(r"SetuptoolsDeprecationWarning|BuildBackendWarning|^WARNING ", line)]
    assert noisy == [], noisy
    names = zipfile.ZipFile(wheel).namelist()
    assert "agent/config/schema/config.schema.json" in names
    assert not [n for n in names if "__pycache__" in n]


def test_refuses_bad_usage(tmp_path: Path) -> None:
    res = subprocess.run(["sh", str(INSTALL)], capture_output=True, text=True, timeout=30,
                         check=False)
    assert res.returncode == 2 and "usage" in res.stderr
    res = subprocess.run(["sh", str(INSTALL), "--wheel", str(tmp_path / "none.whl"),
                          "--python", sys.executable, str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 1 and "no wheel" in res.stderr
