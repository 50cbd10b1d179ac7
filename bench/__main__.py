"""``python -m bench [--tiny] [NAME ...]``: run every ``bench_*.py`` (or the named ones).

A full run updates ``docs/benchmarks.md``. ``--tiny`` runs each bench with its module's
``TINY`` arguments (seconds, not minutes) and writes nothing: ``make test`` runs every bench
that way so that none can silently break (``tests/integration/test_bench_tiny.py``).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Each section is written by `python -m bench NAME` (module `bench/bench_NAME.py`). Numbers are
ratios against a baseline measured in the same run on the same machine, so they compare
designs, not hardware. Re-run a bench to refresh its section; other sections are left as is.
"""


def available() -> list[str]:
    pkg = Path(__file__).resolve().parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(pkg)])
                  if m.name.startswith("bench_"))


def update_section(text: str, name: str, body: str) -> str:
    """Replace (or append) the ``name`` section; everything else is kept byte for byte."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: list[str]) -> int:
    tiny = "--tiny" in argv
    argv = [a for a in argv if a != "--tiny"]
    names = [a.removeprefix("bench_") for a in argv] or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown bench: {', '.join(unknown)} (have: {', '.join(available())})",
              file=sys.stderr)
        return 2
    failed: list[str] = []
    for name in names:
        mod = importlib.import_module(f"bench.bench_{name}")
        if tiny and getattr(mod, "TINY_SKIP", None):
            print(f"[bench {name} (tiny): skipped: {mod.TINY_SKIP}]")
            continue
        t0, load0 = time.monotonic(), os.getloadavg()[0]
        result = mod.run(**(getattr(mod, "TINY", {}) if tiny else {}))
        took = time.monotonic() - t0
        load = (f"\n\nMachine load while it ran (1-minute load average, start -> end): "
                f"{load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.\n")
        print(result.get("summary") or result["markdown"])
        print(f"[bench {name}{' (tiny)' if tiny else ''}: {took:.0f}s]")
        # bench_mutants: a required mutant no seed caught, or a seed not clean on the code
        if result.get("missed") or result.get("dirty"):
            failed.append(name)
        if tiny:
            continue
        text = DOC.read_text() if DOC.exists() else HEADER
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(update_section(text, name, result["markdown"].rstrip("\n") + load))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
