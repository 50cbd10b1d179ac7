"""agent.host.metrics: names, labels, exposition, the textfile write, and lazy import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from agent.host import metrics
from agent.host.metrics import Metrics


def _samples(data: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(data.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_every_series_is_exposed_with_its_labels() -> None:
    m = Metrics()
    m.observe_phase("identity", 0.2)
    m.observe_phase("pull", 3.0)
    m.set_heartbeat_age(4.5)
    m.set_peers({"alive": 3, "dead": 1})
    m.set_frozen(True)
    m.replacement("asg-terminate", "ok")
    m.replacement("asg-terminate", "ok")
    m.freeze("mass-death")
    s = _samples(m.render())
    assert s[("ec2_agent_boot_phase_duration_seconds_count", (("phase", "pull"),))] == 1
    assert s[("ec2_agent_boot_phase_duration_seconds_sum", (("phase", "identity"),))] == 0.2
    assert s[("ec2_agent_heartbeat_age_seconds", ())] == 4.5
    assert s[("ec2_agent_peers", (("state", "alive"),))] == 3
    assert s[("ec2_agent_peers", (("state", "dead"),))] == 1
    assert s[("ec2_agent_heal_frozen", ())] == 1
    key = ("ec2_agent_replacements_total", (("action", "asg-terminate"), ("result", "ok")))
    assert s[key] == 2
    assert s[("ec2_agent_freezes_total", (("reason", "mass-death"),))] == 1


def test_peers_states_that_disappear_drop_to_zero() -> None:
    m = Metrics()
    m.set_peers({"alive": 2, "suspect": 1})
    m.set_peers({"alive": 3})
    s = _samples(m.render())
    assert s[("ec2_agent_peers", (("state", "suspect"),))] == 0
    assert s[("ec2_agent_peers", (("state", "alive"),))] == 3


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()
    a.freeze("api-errors")
    assert b"api-errors" not in b.render()
    # No process/platform collectors: only our own series.
    names = {f.name for f in text_string_to_metric_families(a.render().decode())}
    assert all(n.startswith("ec2_agent_") for n in names), names


def test_boot_textfile_is_atomic_readable_and_only_the_boot(tmp_path: Path) -> None:
    target = tmp_path / "textfile" / "ec2_agent.prom"
    metrics.write_boot_textfile(target, [("identity", 0.2), ("pull", 1.5)])
    s = _samples(target.read_bytes())
    assert s[("ec2_agent_boot_phase_duration_seconds_count", (("phase", "pull"),))] == 1
    assert s[("ec2_agent_boot_phase_duration_seconds_sum", (("phase", "identity"),))] == 0.2
    # the daemon's gauges would read 0 in a boot: a lie, so they are not in the file
    assert not any(name.startswith("ec2_agent_heal_frozen") for name, _ in s)
    metrics.write_boot_textfile(target, [("identity", 0.1)])  # a second boot: its own numbers
    s = _samples(target.read_bytes())
    assert ("ec2_agent_boot_phase_duration_seconds_count", (("phase", "pull"),)) not in s
    assert [p.name for p in target.parent.iterdir()] == ["ec2_agent.prom"]  # no temp left
    assert target.stat().st_mode & 0o777 == 0o644


def test_module_level_helpers_share_one_registry() -> None:
    metrics.get().freeze("test")
    assert metrics.get() is metrics.get()
    assert b'reason="test"' in metrics.render()


def test_importing_metrics_does_not_import_prometheus_client() -> None:
    code = "import sys, agent.host.metrics; print('prometheus_client' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_first_use_from_two_threads_makes_one_registry(monkeypatch) -> None:
    """The daemon's loop and the endpoint's first scrape race to create it (seen once)."""
    import threading
    import time

    monkeypatch.setattr(metrics, "_default", None)
    real_init = Metrics.__init__

    def slow_init(self: Metrics) -> None:
        time.sleep(0.2)  # as the first import of prometheus_client is
        real_init(self)

    monkeypatch.setattr(Metrics, "__init__", slow_init)
    got: list[Metrics] = []
    threads = [threading.Thread(target=lambda: got.append(metrics.get())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 2 and got[0] is got[1]
