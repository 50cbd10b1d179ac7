"""`ec2-agent status` as operators run it: a real process, exit codes, --json, --wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from agent.host import state as statefile
from agent.paths import Paths


def _run(root: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = dict(os.environ, EC2_AGENT_ROOT=str(root))
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _write(root: Path, st: dict) -> None:
    statefile.write(Paths(root).state_file, st)


def test_not_started(root: Path) -> None:
    r = _run(root, "status")
    assert r.returncode == 0 and "not-started" in r.stdout


def test_exit_codes_and_json(root: Path) -> None:
    for status, code in (("done", 0), ("error", 1), ("degraded", 2)):
        _write(root, {"status": status, "instance_id": "i-123", "group": "web",
                      "boot_kind": "first", "phases": [], "errors": ["x"] if code == 1 else []})
        r = _run(root, "status", "--json")
        assert r.returncode == code, r.stderr
        d = json.loads(r.stdout)
        assert d["status"] == status and d["instance_id"] == "i-123"
        for key in ("status", "instance_id", "group", "boot_kind", "phases", "errors",
                    "heartbeat", "peers", "heal"):
            assert key in d


def test_corrupt_state_is_an_error_naming_the_file(root: Path) -> None:
    p = Paths(root).state_file
    p.parent.mkdir(parents=True)
    p.write_text("{")
    r = _run(root, "status")
    assert r.returncode == 1
    assert "state.json" in r.stderr and "not valid JSON" in r.stderr


def test_wait_times_out_then_succeeds(root: Path) -> None:
    _write(root, {"status": "running", "phases": []})
    t0 = time.monotonic()
    r = _run(root, "status", "--wait", "--timeout", "0.5", timeout=120)
    assert r.returncode == 1 and "timed out" in r.stderr
    assert time.monotonic() - t0 < 120  # it gave up by itself (a busy machine: issue #16)

    def finish() -> None:
        time.sleep(0.5)
        _write(root, {"status": "done", "phases": []})

    t = threading.Thread(target=finish)
    t.start()
    r = _run(root, "status", "--wait", "--timeout", "60", timeout=120)
    t.join()
    assert r.returncode == 0 and "status: done" in r.stdout


def test_status_never_imports_boto3(root: Path) -> None:
    _write(root, {"status": "done", "phases": []})
    code = ("import sys; from agent.cli import main; rc = main(['status', '--json']); "
            "bad = [m for m in ('boto3', 'botocore', 'jinja2', 'jsonschema', 'yaml', 'urllib3') "
            "if m in sys.modules]; print('LOADED', bad, file=sys.stderr); sys.exit(rc)")
    env = dict(os.environ, EC2_AGENT_ROOT=str(root))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0
    assert "LOADED []" in r.stderr


def test_usage_error_exits_2(root: Path) -> None:
    r = _run(root, "status", "--bogus")
    assert r.returncode == 2
