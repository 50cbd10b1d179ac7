"""The HTML timeline of a run, opened in a real browser (Debian's chromium, headless).

The page is checked by what chromium renders (``--dump-dom``: the DOM after
parsing) and by a screenshot that must be a real, non-blank PNG. Skipped, with the
reason, only when no chromium is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.sim import fleetsim
from agent.sim.faults import Profile
from agent.sim.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="chromium is not installed (apt-get install chromium; "
                                       ".ci/run does it)")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def test_report_opens_in_chromium_and_shows_the_run(tmp_path: Path) -> None:
    logging.disable(logging.WARNING)
    try:
        sim = fleetsim.Simulation(4, 6, 0.5, Profile("no-faults"))
        victim: list[str] = []

        def kill() -> None:
            h = sim.hosts[sorted(sim.hosts)[2]]
            victim.append(h.iid)
            sim._death(h, "test")
            sim.kill(h, for_good=True, why="test kill")
        sim.at(fleetsim.T0 + 600.0, kill)
        res = sim.run()
    finally:
        logging.disable(logging.NOTSET)
    page = write_report(res, tmp_path / "run.html")
    url = page.resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "ec2-agent simulation: seed 4, 6 members" in html
    assert re.search(r'id="sum-deaths">\s*1<', html)
    assert re.search(r'id="sum-replacements">\s*1<', html)
    rows = re.findall(r'<g class="member" data-member="([^"]+)"', html)
    assert victim[0] in rows and len(rows) >= 6
    # the victim's row carries its death and the action against it, in that order
    row = html.split(f'data-member="{victim[0]}"', 1)[1].split("</g>", 1)[0]
    kinds = re.findall(r'data-kind="([a-zA-Z-]+)"', row)
    assert "kill" in kinds and "action" in kinds and kinds.index("kill") < kinds.index("action")
    assert "<li>none</li>" in html  # no violations in this run
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,700", url)
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
