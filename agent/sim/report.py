"""A self-contained HTML timeline of one simulation run (``ec2-agent simulate --report``).

One row per member (the members something happened to first, then the quiet ones,
up to ``max_rows``), time left to right: a bar while its agent ran and
heartbeated, marks for deaths, suspicions, leases, actions, freezes, faults and
violations; one row above for group-wide faults. No script, no external file: the
page is inline SVG and CSS, so it opens anywhere, and every mark has a ``<title>``.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path
from typing import Any

from agent.host.files import atomic_write
from agent.sim.fleetsim import T0, Result

MARKS = {  # timeline kind -> (css class, legend)
    "kill": ("death", "death / instance gone"),
    "crash": ("crash", "crash (restarts)"),
    "sigstop": ("stop", "process stopped"),
    "suspicion": ("susp", "suspicion written"),
    "lease": ("lease", "lease written"),
    "action": ("act", "mutating cloud call"),
    "freeze": ("freeze", "freeze (by this observer)"),
    "fault": ("fault", "fault injected"),
    "superseded": ("exile", "stepped down as superseded"),
    "leave": ("leave", "planned leave"),
    "VIOLATION": ("viol", "invariant violation"),
}
COLORS = {"death": "#000", "crash": "#888", "stop": "#a0a", "susp": "#e90", "lease": "#06c",
          "act": "#d00", "freeze": "#0aa", "fault": "#999", "exile": "#f0f", "leave": "#0a0",
          "viol": "#f00"}
CSS = """
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 4px} table.sum td{padding:1px 10px 1px 0}
.legend span{display:inline-block;margin-right:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
svg{display:block} text{font:10px monospace;fill:#333} .run{fill:#cfe8cf}
.viol{stroke:#000} .violations li{color:#b00}
""" + "".join(f".{c}{{fill:{v}}} .i-{c}{{background:{v}}}\n" for c, v in COLORS.items())


def _rows(res: Result, max_rows: int) -> tuple[list[str], dict[str, list[tuple[float, str, str]]],
                                                dict[str, tuple[float, float]]]:
    marks: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
    span: dict[str, list[float]] = {}
    busy: dict[str, int] = defaultdict(int)
    for t, kind, member, detail in res.timeline:
        if kind in ("start", "first-beat") and member:
            span.setdefault(member, [t, t])
        if member and member in span:
            span[member][1] = t
        if kind in MARKS:
            marks[member].append((t, kind, detail))
            busy[member] += 1
    members = sorted(span, key=lambda m: (-busy[m], m))[:max_rows]
    if "" in marks:
        members = ["", *members]
    ends = {m: (s[0], s[1]) for m, s in span.items()}
    return members, marks, ends


def render(res: Result, max_rows: int = 200) -> str:
    end = T0 + res.hours * 3600.0
    width, left, row_h = 1100, 170, 14
    members, marks, ends = _rows(res, max_rows)

    def x(t: float) -> float:
        return left + (t - T0) / max(1.0, end - T0) * (width - left - 10)

    died = {m: t for t, k, m, _ in res.timeline if k == "kill"}
    left_at = {m: t for t, k, m, _ in res.timeline if k in ("leave", "superseded")}
    out = []
    h = (len(members) + 2) * row_h
    out.append(f'<svg width="{width}" height="{h}" role="img" aria-label="timeline">')
    for hour in range(int(res.hours) + 1):
        xx = x(T0 + hour * 3600.0)
        anchor = "end" if hour == int(res.hours) and hour else "start"
        out.append(f'<line x1="{xx:.1f}" y1="0" x2="{xx:.1f}" y2="{h}" stroke="#eee"/>'
                   f'<text x="{xx + 2:.1f}" y="10" text-anchor="{anchor}">{hour}h</text>')
    for i, m in enumerate(members):
        y = (i + 1) * row_h
        label = m or "group"
        out.append(f'<g class="member" data-member="{html.escape(label)}">'
                   f'<text x="0" y="{y + 10}">{html.escape(label)}</text>')
        if m in ends:
            s, _ = ends[m]
            e = min(died.get(m, end), left_at.get(m, end))
            out.append(f'<rect class="run" x="{x(s):.1f}" y="{y + 2}" '
                       f'width="{max(1.0, x(e) - x(s)):.1f}" height="{row_h - 4}">'
                       f'<title>{html.escape(label)}: agent running and heartbeating '
                       f'{s - T0:.0f}s..{e - T0:.0f}s</title></rect>')
        for t, kind, detail in marks.get(m, []):
            cls = MARKS[kind][0]
            tip = html.escape(f"{t - T0:.1f}s {kind} {label}: {detail}")
            out.append(f'<rect class="{cls} mark" data-kind="{kind}" x="{x(t) - 1.5:.1f}" '
                       f'y="{y + 1}" width="3" height="{row_h - 2}"><title>{tip}</title></rect>')
        out.append("</g>")
    out.append("</svg>")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(res.faults.items())) or "none"
    summary = [("seed", res.seed), ("members", res.members), ("hours", f"{res.hours:g}"),
               ("faults profile", res.profile), ("deaths", res.deaths),
               ("replacements", res.replacements),
               ("false replacements", res.false_replacements),
               ("violations", len(res.violations)), ("freezes", res.freezes),
               ("faults injected", f"{sum(res.faults.values())} ({kinds})"),
               ("invariant checks", res.checks)]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td id=\"sum-{k.replace(' ', '-')}\">"
                   f"{html.escape(str(v))}</td></tr>" for k, v in summary)
    legend = "".join(f'<span><i class="i-{c}"></i>{html.escape(d)}</span>'
                     for c, d in MARKS.values())
    viols = "".join(f"<li>{v.t - T0:.1f}s {html.escape(v.kind)} {html.escape(v.member)}: "
                    f"{html.escape(v.detail)}</li>" for v in res.violations[:100])
    return ("<!doctype html><html><head><meta charset=\"utf-8\">"
            f"<title>ec2-agent simulation seed {res.seed}</title><style>{CSS}</style></head>"
            f"<body><h1>ec2-agent simulation: seed {res.seed}, {res.members} members, "
            f"{res.hours:g} h, faults {html.escape(res.profile)}</h1>"
            f"<table class=\"sum\">{rows}</table>"
            f"<h2>Violations</h2><ul class=\"violations\">{viols or '<li>none</li>'}</ul>"
            f"<p class=\"legend\">{legend}</p>"
            f"<p>{len(members)} rows (members with the most events first)</p>"
            + "".join(out) + "</body></html>\n")


def write_report(res: Result, path: str | Path, **kw: Any) -> Path:
    p = Path(path)
    atomic_write(p, render(res, **kw), mode=0o644)
    return p
