"""Differential: the agent reads user-data as cloud-init 22.4 itself does.

cloud-init's own ``UserDataProcessor``, launch-index filter, cloud-config handler
(with its merging and JSON patches) and jinja handler run in the system python3
(tests/referee/cloudinit_referee.py); the agent must give the same ``ec2_agent``,
a clean "not mine", or a clean error on its own block (tests/referee/harness.py).

- a fixed-seed slice of the hypothesis corpus (tests/referee/gen.py); the long run
  (10,000+ cases, other seeds) is ``make soak``;
- every user-data example the cloud-init package ships
  (/usr/share/doc/cloud-init/examples, read at test time, not copied): alone,
  gzipped, and in a MIME message before and after a part carrying ``ec2_agent``.
"""

from __future__ import annotations

import gzip
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest

from tests.referee.gen import INSTANCE_DATA, generate
from tests.referee.harness import Case, agent, judge, referee, referee_available, run

pytestmark = pytest.mark.skipif(not referee_available(),
                                reason="cloud-init is not installed for /usr/bin/python3")

EXAMPLES = Path("/usr/share/doc/cloud-init/examples")
SLICE = 300  # make test; `make soak` runs 10,000+ with other seeds

AGENT_PART = "#cloud-config\nec2_agent:\n  group: web\n  store: {bucket: my-fleet}\n"


def _examples() -> list[tuple[str, bytes]]:
    out = []
    for path in sorted(EXAMPLES.rglob("*")):
        if not path.is_file() or path.name == "README":
            continue
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        out.append((str(path.relative_to(EXAMPLES)), data))
    return out


def _around(example: bytes, first: bool) -> bytes:
    outer = MIMEMultipart()
    ex = MIMEText(example.decode("utf-8", "surrogateescape"), "plain", "utf-8")
    agent_part = MIMEText(AGENT_PART, "cloud-config", "utf-8")
    for part in ((ex, agent_part) if first else (agent_part, ex)):
        outer.attach(part)
    return outer.as_bytes()


def test_generated_slice() -> None:
    cases = generate(SLICE, seed=0)
    assert len(cases) == SLICE
    bad = run(cases)
    assert not bad, "\n".join(f"{c.raw[:200]!r}: {why}" for c, why in bad[:5])


def test_every_shipped_example() -> None:
    examples = _examples()
    assert len(examples) >= 30, f"expected cloud-init's examples in {EXAMPLES}"
    cases = []
    for name, data in examples:
        for raw in (data, gzip.compress(data, mtime=0), _around(data, True),
                    _around(data, False)):
            cases.append(Case(raw=raw, launch_index=0, instance_data=INSTANCE_DATA, label=name))
    refs = referee(cases)
    bad = []
    taken = 0
    for case, ref in zip(cases, refs, strict=True):
        got = agent(case)
        why = judge(case, ref, got)
        if why:
            bad.append(f"{case.label}: {why}")
        # No example carries ec2_agent: the agent never fails on one.
        if got[0] == "error":
            bad.append(f"{case.label}: the agent failed on cloud-init's own example: {got[1]}")
        taken += got[0] == "ok"
    assert not bad, "\n".join(bad[:10])
    # The agent's part is found next to every example that cloud-init reads as a whole
    # (an example that wins the merge, or that cloud-init drops, may hide it: judged above).
    assert taken >= len(examples), taken


def test_the_referee_can_disagree() -> None:
    """The judge is not a rubber stamp: a wrong answer is reported."""
    case = Case(raw=b"#cloud-config\nec2_agent: {group: web}\n")
    (ref,) = referee([case])
    assert judge(case, ref, ("ok", ["d", []])) is not None
    assert judge(case, ref, ("none", None)) is not None
    assert judge(case, ref, ("error", "user-data: ec2_agent broken")) is not None
    assert judge(case, ref, agent(case)) is None
