"""Every benchmark runs, at a tiny size, in ``make test``: none can silently break.

``python -m bench --tiny NAME`` runs the bench with its module's ``TINY`` arguments and
writes nothing to ``docs/benchmarks.md``. The numbers of a tiny run mean nothing; that it
finishes with exit code 0 does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import available

ROOT = Path(__file__).resolve().parents[2]


def test_every_bench_has_a_tiny_size() -> None:
    import importlib

    for name in available():
        mod = importlib.import_module(f"bench.bench_{name}")
        assert isinstance(getattr(mod, "TINY", None), dict) or getattr(mod, "TINY_SKIP", ""), (
            f"bench_{name} has no TINY arguments (nor a TINY_SKIP reason)")


@pytest.mark.parametrize("name", available())
def test_bench_runs_tiny(name: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", name], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"[bench {name} (tiny):" in proc.stdout
    assert doc.read_bytes() == before  # a tiny run records nothing


def test_the_restore_a_check_runs_tiny() -> None:
    """``python -m bench.bench_data restore-a``, the quiet re-check of the close call."""
    from bench import bench_data

    out = bench_data.restore_a(rounds=2, small_files=3, small_size=32 * 1024, big=1024 * 1024)
    lines = out.splitlines()
    assert lines[0].startswith("agent: ") and " requests; runs " in lines[0], out
    # one line per tool, then the ratio line only when a rival (restic, rclone) is installed
    tools = [line.split(":")[0] for line in lines if not line.startswith("ratio ")]
    assert set(tools) <= {"agent", "restic", "rclone"} and "agent" in tools, out
    if len(tools) > 1:
        assert lines[-1].startswith("ratio (faster rival / agent): "), out


def test_every_mutant_still_fits_the_code_it_patches() -> None:
    """Each mutant of ``make mutants`` applies to today's code and puts the original back.
    The tiny run applies one; session 15 changed ``_fence``'s parameters and ``no-fencing``
    no longer fitted, which only the full ``python -m bench mutants`` found (a TypeError)."""
    from agent.heal import controller as C
    from agent.heal import decide as D
    from agent.heal import leases as L
    from bench import bench_mutants

    patched = (C, C.HealController, D, L.Lease)
    before = [dict(vars(x)) for x in patched]
    for m in bench_mutants.MUTANTS:
        with m.patch():
            assert [dict(vars(x)) for x in patched] != before, f"{m.name} patched nothing here"
        assert [dict(vars(x)) for x in patched] == before, f"{m.name} left a patch behind"
