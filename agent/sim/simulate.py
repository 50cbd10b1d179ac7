"""``ec2-agent simulate``: boot a group on the embedded cloud and print what each instance did.

With ``--scenario NAME`` it runs a rehearsal from ``agent.sim.scenarios`` instead.
Kept apart from ``agent.sim.cloud`` so the cloud does not import the scenarios
(which import the fleet, which imports the cloud).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from agent.sim.cloud import EmbeddedCloud

# -- the `simulate` command -----------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    cols = ["instance", "az", "ip", "status", "boot", "phases", "seconds"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    out = ["  ".join(c.ljust(widths[c]) for c in cols)]
    for r in rows:
        out.append("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))
    return "\n".join(out)


def status_rows(cloud: EmbeddedCloud) -> list[dict[str, Any]]:
    rows = []
    for iid, inst in sorted(cloud.instances.items()):
        st = inst.state() or {}
        ident = st.get("identity", {})
        phases = st.get("phases", [])
        ok = sum(1 for p in phases if p.get("status") in ("ok", "degraded"))
        rows.append(
            {
                "instance": iid,
                "az": ident.get("az", "-"),
                "ip": ident.get("ip", "-"),
                "status": st.get("status", "not-started"),
                "boot": st.get("boot_kind", "-"),
                "phases": f"{ok}/{len(phases)}",
                "seconds": f"{st.get('duration_s', 0):.2f}",
                "errors": st.get("errors", []),
            }
        )
    return rows


# What `simulate` publishes: templates over the instance, the group and its peers. Rendered
# files land under each instance's EC2_AGENT_ROOT; no check or reload commands run.
SIM_BUNDLE = {
    "agent.yaml": (
        "vars: {service: demo, port: 8080}\n"
        "templates:\n"
        "  - {src: service.conf.j2, dest: /etc/demo/service.conf, mode: '0644'}\n"
        "  - {src: upstream.conf.j2, dest: /etc/demo/upstream.conf, mode: '0644'}\n"
    ),
    "service.conf.j2": (
        "# rendered by ec2-agent for {{ instance.id }} ({{ instance.az }}, {{ instance.ip }})\n"
        "service {{ vars.service }} listen {{ instance.ip }}:{{ vars.port }} group {{ group }}\n"
    ),
    "upstream.conf.j2": (
        "upstream {{ group }} {\n"
        "{% for p in peers %}  server {{ p.ip }}:{{ vars.port }};  # {{ p.id }} {{ p.az }}\n"
        "{% endfor %}}\n"
    ),
}


def simulate(
    instances: int = 3,
    scenario: str | None = None,
    keep: bool = False,
    as_json: bool = False,
    group: str = "web",
) -> int:
    if scenario:
        from agent.sim.scenarios import run_scenario

        return run_scenario(scenario, instances=instances, keep=keep, as_json=as_json)
    t0 = time.monotonic()
    cloud = EmbeddedCloud()
    try:
        cloud.start()
        print(
            f"emulated cloud: moto {cloud.moto.url}, IMDS {cloud.imds.base_url}, "
            f"dir {cloud.workdir}",
            file=sys.stderr,
        )
        ids = cloud.create_asg(group, instances)
        version = cloud.push_bundle(group, SIM_BUNDLE)
        print(f"auto scaling group {group!r}: {len(ids)} instances; bundle v{version} "
              f"published; booting an agent on each", file=sys.stderr)
        codes = cloud.boot_all(ids)
        rows = status_rows(cloud)
        if as_json:
            print(json.dumps(rows, indent=1))
        else:
            print(_table(rows))
            for r in rows:
                for e in r["errors"]:
                    print(f"{r['instance']}: error: {e}")
            print(
                f"{sum(1 for c in codes.values() if c == 0)}/{len(codes)} booted in "
                f"{time.monotonic() - t0:.1f}s"
            )
        return 0 if all(c == 0 for c in codes.values()) else 1
    finally:
        cloud.stop(keep_dir=keep)
        if keep:
            print(f"kept {cloud.workdir}", file=sys.stderr)
