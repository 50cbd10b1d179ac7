"""The layers of the house are executable: ``lint-imports`` (run by ``make lint``) fails on a
violation. Each case breaks one rule in a throwaway copy of the package and watches the
contract that names it fail; the unbroken copy passes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("house")
    shutil.copytree(REPO / "agent", root / "agent",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / ".importlinter", root / ".importlinter")
    return root


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def _append(path: Path, line: str) -> str:
    old = path.read_text()
    path.write_text(old + "\n" + line + "\n")
    return old


def source(root: Path, module: str) -> Path:
    return root / (module.replace(".", "/") + ".py")


def test_the_tree_as_it_is_keeps_every_contract(tree: Path) -> None:
    out = lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout and out.stdout.count("KEPT") == 4


def test_no_module_imports_itself_back() -> None:
    """No cycle between any two of the agent's modules, whatever packages they live in."""
    import grimp

    graph = grimp.build_graph("agent")
    mods = sorted(graph.modules)
    index = {m: i for i, m in enumerate(mods)}
    # Tarjan's strongly connected components over direct imports
    low, num, stack, on, cycles, count = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        num[v] = low[v] = count[0]
        count[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v), key=index.get):
            if w not in num:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], num[w])
        if low[v] == num[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in mods:
        if m not in num:
            visit(m)
    assert cycles == []


# Dotted names only (``import agent.x``), so the package move rewrites them with the tree.
@pytest.mark.parametrize(("module", "line", "contract"), [
    # a pure module that opens a socket, or reaches one through an adapter
    ("agent.heal.decide", "import socket", "Pure modules import no AWS SDK"),
    ("agent.group.membership", "import agent.aws.store", "Pure modules import no AWS SDK"),
    # boto3 outside the AWS adapters
    ("agent.heal.controller", "import boto3", "Only the AWS adapter modules import boto3"),
    # an adapter that reaches into the shell
    ("agent.group.peers", "import agent.daemon.loop", "Nothing imports the shell"),
    # a cycle between two modules (heartbeat already imports peers)
    ("agent.group.peers", "import agent.group.heartbeat", "No import cycles"),
])
def test_a_deliberate_violation_fails_the_lint(tree: Path, module: str, line: str,
                                               contract: str) -> None:
    path = source(tree, module)
    old = _append(path, line)
    try:
        out = lint(tree)
    finally:
        path.write_text(old)
    assert out.returncode != 0, out.stdout
    broken = out.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, out.stdout
    assert "BROKEN" in out.stdout
