"""Hypothesis strategies for user-data in every form cloud-init reads (and some it does not).

A case is built from parts: cloud-config (with or without ``ec2_agent``, header in
any case, ``merge_how``, ``launch-index``, duplicate keys outside the block),
``#cloud-config-jsonp`` patches, ``#cloud-config-archive`` lists, ``## template:
jinja`` (any case), scripts and PowerShell in UTF-8/latin-1/cp1252, boothooks,
``text/x-ec2-agent``, binary and gzip parts, ``text/plain`` and
``text/x-shellscript`` parts holding cloud-config, ``charset=iso-8859-1`` parts,
``#include`` lines, broken YAML; sent bare or as MIME (base64, 7bit,
quoted-printable; a ``From`` line or other headers first; ``Merge-Type`` and
``Launch-Index`` headers), optionally gzipped. ``agent_fault`` marks cases whose
agent block was broken on purpose: only those may make the agent fail.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import quopri
import tarfile
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.referee.harness import Case

INSTANCE_DATA = {
    "v1": {"instance_id": "i-0123456789abcdef0", "instance-id": "i-0123456789abcdef0",
           "region": "eu-west-1", "availability_zone": "eu-west-1b",
           "availability-zone": "eu-west-1b", "cloud_name": "aws", "platform": "ec2",
           "local_hostname": "ip-10-0-0-5", "local-hostname": "ip-10-0-0-5"},
    "ds": {"meta_data": {"instance-type": "t3.micro", "local-ipv4": "10.0.0.5",
                         "placement": {"availability-zone": "eu-west-1b"}}},
}

_key = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
_scalar = (st.none() | st.booleans() | st.integers(-1000, 10**6)
           | st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                     max_size=12)
           | st.sampled_from(["off", "yes", "0644", "1.5", "2026-01-01", "~", "ec2_agent"]))
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(_key | st.integers(0, 99), inner, max_size=3),
                      max_leaves=8)
_agent = st.dictionaries(_key, _value, max_size=4)
_other = st.dictionaries(st.sampled_from(["packages", "runcmd", "write_files", "apt", "users",
                                          "bootcmd", "disk_setup", "hostname"]), _value,
                         max_size=3)
_merge = st.sampled_from([None, "list(append)+dict(recurse_array)+str()",
                          "dict(replace)+list()+str()",
                          "dict(no_replace,recurse_list)+list(append)",
                          "dict(recurse_array,allow_delete)+list(prepend)+str(append)",
                          "list(append)", "bogus(x)", "dict()", "dict(replace)",
                          # the rules cloud-init's own merge tests use
                          "dict(replace)+list(append)", "dict(recurse_str)+str(append)",
                          "dict(recurse_list)+list(append)",
                          "dict(recurse_array,no_replace)+list(prepend)",
                          "dict(recurse_array)+list(recurse_list,recurse_str)+str()",
                          "dict(allow_delete,no_replace)+list()", "List(Append)+Dict()",
                          "dict(no_replace)+list(no_replace)"])
_merge_list = st.lists(st.sampled_from([["dict", "recurse_array"], ["list", "append"],
                                        {"name": "dict", "settings": ["no_replace"]},
                                        {"name": "list", "settings": ["prepend"]},
                                        ["str", "append"], {"name": "bogus", "settings": []},
                                        "dict"]), min_size=1, max_size=3)
_cc_header = st.sampled_from(["#cloud-config", "#cloud-config", "#Cloud-Config",
                              "#CLOUD-CONFIG", "  #cloud-config", "#cloud-config  "])
_jinja_header = st.sampled_from(["## template: jinja", "## Template: Jinja",
                                 "## TEMPLATE: JINJA", "##template: jinja",
                                 "## template: jinja  "])
_encoding = st.sampled_from(["utf-8", "latin-1", "cp1252"])


def _dump(doc: Any) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, default_flow_style=False, sort_keys=False)


@st.composite
def cloud_config(draw: st.DrawFn) -> tuple[str, bool, bool]:
    """(text, mentions ec2_agent, agent fault injected)."""
    doc: dict[Any, Any] = dict(draw(_other))
    has_agent = draw(st.booleans())
    if has_agent:
        doc["ec2_agent"] = draw(_agent | st.just(None) | st.just({"group": "web"}))
    merge = draw(_merge)
    if merge and draw(st.booleans()):
        doc[draw(st.sampled_from(["merge_how", "merge_type"]))] = merge
    elif draw(st.integers(0, 6)) == 0:
        doc["merge_how"] = draw(_merge_list)
    if draw(st.integers(0, 5)) == 0:
        doc["launch-index"] = draw(st.integers(0, 2))
    items = list(doc.items())
    draw(st.randoms()).shuffle(items)
    body = "".join(_dump({k: v}) for k, v in items)
    fault = False
    kind = draw(st.integers(0, 9))
    if kind == 0:  # duplicate a top-level key outside ec2_agent
        body += _dump({"packages": ["dup"]})
    elif kind == 1:  # broken YAML appended
        body += "broken: [unclosed\n"
        fault = "ec2_agent" in body
    elif kind == 2 and has_agent:  # duplicate key inside the agent block
        body = body.replace("ec2_agent:\n", "ec2_agent:\n  dupkey: 1\n  dupkey: 2\n", 1)
        fault = "dupkey: 1" in body
    elif kind == 3 and has_agent:  # agent block that is not a mapping
        body = body.replace("ec2_agent:", "ec2_agent: [a]\nxx_ignored:", 1)
        fault = True
    text = f"{draw(_cc_header)}\n{body}"
    return text, "ec2_agent" in text, fault


@st.composite
def jsonp(draw: st.DrawFn) -> tuple[str, bool, bool]:
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["add", "replace", "remove", "test", "bogus"]))
        path = draw(st.sampled_from(["/ec2_agent", "/ec2_agent/group", "/packages", "/ec2_agent/x",
                                     "/runcmd/-", "/nope/deep"]))
        entry: dict[str, Any] = {"op": op, "path": path}
        if op in ("add", "replace", "test"):
            entry["value"] = draw(_agent if path == "/ec2_agent" else _value)
        ops.append(entry)
    text = "#cloud-config-jsonp\n" + json.dumps(ops)
    if draw(st.integers(0, 8)) == 0:
        text = text[:-3]
    return text, "ec2_agent" in text, False


JINJA_BODIES = [
    "#cloud-config\nec2_agent:\n  group: web-{{ v1.region }}\n"
    "  vars: {az: '{{ v1.availability_zone }}'}\n",
    "#cloud-config\nec2_agent:\n  group: '{{ ds.meta_data.instance_type }}'\n",
    "#cloud-config\nec2_agent:\n  group: '{{ missing_var }}'\n",
    "#cloud-config\nec2_agent:\n  group: '{{ nope.deeper }}'\n",
    "#cloud-config\nec2_agent:\n"
    "  group: '{% if v1.region == \"eu-west-1\" %}eu{% else %}other{% endif %}'\n",
    "#cloud-config\nruncmd: [echo {{ v1.instance_id }}]\n",
    "#!/bin/sh\necho {{ v1.region }}\n",
    "#cloud-config\nec2_agent: {group: {{ broken\n",
    "#cloud-config-jsonp\n"
    '[{"op": "add", "path": "/ec2_agent", "value": {"group": "{{ v1.region }}"}}]\n',
]


@st.composite
def jinja(draw: st.DrawFn) -> tuple[str, bool, bool]:
    inner = draw(st.sampled_from(JINJA_BODIES))
    return f"{draw(_jinja_header)}\n{inner}", "ec2_agent" in inner, "{{ broken" in inner


@st.composite
def archive(draw: st.DrawFn) -> tuple[str, bool, bool]:
    entries: list[Any] = []
    mentions = fault = False
    for _ in range(draw(st.integers(1, 3))):
        text, m, f = draw(cloud_config())
        mentions |= m
        fault |= f
        form = draw(st.integers(0, 3))
        if form == 0:
            entries.append(text)
        else:
            entry: dict[str, Any] = {"content": text}
            if form == 2:
                entry["type"] = draw(st.sampled_from(["text/cloud-config", "text/x-shellscript",
                                                      "text/plain"]))
            if form == 3:
                entry["launch-index"] = draw(st.integers(0, 2))
            entries.append(entry)
    return "#cloud-config-archive\n" + _dump(entries), mentions, fault


@st.composite
def script(draw: st.DrawFn) -> tuple[bytes, bool, bool]:
    body = draw(st.sampled_from(["#!/bin/sh\necho café ec2_agent: 1\n",
                                 "<powershell>\nWrite-Host 'naïve €'\n</powershell>\n",
                                 "#cloud-boothook\n#!/bin/sh\necho ü\n",
                                 "#!/bin/bash\n#cloud-config\n"]))
    return body.encode(draw(_encoding), "replace"), False, False


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _tar_gz() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"#cloud-config\nec2_agent: {group: tar}\n"
        info = tarfile.TarInfo("user-data")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@st.composite
def part(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str], bool, bool]:
    """(content type, body bytes, extra headers, mentions agent, fault)."""
    kind = draw(st.sampled_from(["cc", "cc", "cc", "jsonp", "jinja", "archive", "script",
                                 "x-ec2-agent", "octet", "gzip", "plain-cc", "shell-cc",
                                 "latin1-cc", "include", "unknown"]))
    headers: dict[str, str] = {}
    if draw(st.integers(0, 4)) == 0:
        headers["Merge-Type"] = draw(_merge) or "dict(replace)+list()+str()"
    if draw(st.integers(0, 5)) == 0:
        headers["Launch-Index"] = str(draw(st.integers(0, 2)))
    if kind in ("cc", "plain-cc", "shell-cc"):
        text, m, f = draw(cloud_config())
        ctype = {"cc": draw(st.sampled_from(["text/cloud-config", "text/plain",
                                             "text/x-not-multipart"])),
                 "plain-cc": "text/plain", "shell-cc": "text/x-shellscript"}[kind]
        return ctype, text.encode(), headers, m, f
    if kind == "latin1-cc":
        text = "#cloud-config\nruncmd: [echo café]\n"
        if draw(st.booleans()):
            text += "ec2_agent: {group: caf\u00e9}\n"
        return "text/plain; charset=iso-8859-1", text.encode("latin-1"), headers, \
            "ec2_agent" in text, False
    if kind == "jsonp":
        text, m, f = draw(jsonp())
        return draw(st.sampled_from(["text/cloud-config-jsonp", "text/plain"])), text.encode(), \
            headers, m, f
    if kind == "jinja":
        text, m, f = draw(jinja())
        return draw(st.sampled_from(["text/jinja2", "text/plain"])), text.encode(), headers, m, f
    if kind == "archive":
        text, m, f = draw(archive())
        return draw(st.sampled_from(["text/cloud-config-archive", "text/plain"])), \
            text.encode(), headers, m, f
    if kind == "script":
        body, m, f = draw(script())
        ctype = draw(st.sampled_from(["text/x-shellscript", "text/plain",
                                      "text/x-shellscript; charset=iso-8859-1"]))
        return ctype, body, headers, m, f
    if kind == "x-ec2-agent":
        doc = draw(_agent)
        if draw(st.booleans()):
            doc = {"ec2_agent": doc}
        return "text/x-ec2-agent", _dump(doc).encode(), headers, True, False
    if kind == "octet":
        return "application/octet-stream", draw(st.binary(max_size=64)) + b"\xff\x00", headers, \
            False, False
    if kind == "gzip":
        text, m, f = draw(cloud_config())
        return draw(st.sampled_from(["application/gzip", "application/x-gzip"])), \
            _gz(text.encode()), headers, m, f
    if kind == "include":
        return "text/x-include-url", b"#include\nhttp://127.0.0.1:9/none\n", headers, False, False
    return "text/x-unknown-thing", b"hello ec2_agent\n", headers, False, False


def _mime(draw: st.DrawFn, parts: list[tuple[str, bytes, dict[str, str], bool, bool]]) -> bytes:
    boundary = "==BOUNDARY=="
    out: list[bytes] = []
    prefix = draw(st.sampled_from(["", "From nobody Tue Dec  1 00:00:00 2026\n",
                                   "X-Note: first\n"]))
    version = draw(st.sampled_from(["MIME-Version: 1.0\n", "mime-version: 1.0\n",
                                    "Mime-Version: 1.0\n"]))
    out.append(f"{prefix}Content-Type: multipart/mixed; boundary=\"{boundary}\"\n"
               f"{version}\n".encode())
    for ctype, body, headers, _m, _f in parts:
        cte = draw(st.sampled_from(["base64", "7bit", "quoted-printable", "8bit"]))
        if cte in ("7bit", "8bit") and (b"\r" in body or body.count(b"\n") == 0
                                        or b"--==BOUNDARY" in body or b"\x00" in body):
            cte = "base64"
        if cte == "7bit" and not body.isascii():
            cte = "base64"
        if cte == "base64":
            enc = base64.encodebytes(body)
        elif cte == "quoted-printable":
            enc = quopri.encodestring(body)
        else:
            enc = body  # 8bit: raw bytes, maybe not UTF-8 (cloud-init then reads nothing)
        hdrs = "".join(f"{k}: {v}\n" for k, v in headers.items())
        out.append(f"--{boundary}\nContent-Type: {ctype}\nContent-Transfer-Encoding: {cte}\n"
                   f"{hdrs}\n".encode() + enc + b"\n")
    out.append(f"--{boundary}--\n".encode())
    return b"".join(out)


@st.composite
def user_data(draw: st.DrawFn) -> Case:
    form = draw(st.sampled_from(["single", "single", "mime", "mime", "mime", "tar", "script"]))
    fault = False
    if form == "tar":
        raw = _tar_gz()
    elif form == "script":
        raw, _, _ = draw(script())
    elif form == "single":
        ctype, body, _h, _m, fault = draw(part())
        if ctype.startswith(("application/", "text/x-include")):
            body = body if not ctype.startswith("application/gzip") else body
        raw = body
        if draw(st.integers(0, 6)) == 0 and b"ec2_agent" not in raw[:1]:
            # plain YAML with ec2_agent (no header): the agent's own form
            raw = _dump({"ec2_agent": draw(_agent)}).encode()
            fault = False
    else:
        parts = draw(st.lists(part(), min_size=1, max_size=4))
        fault = any(p[4] for p in parts)
        raw = _mime(draw, parts)
    if draw(st.integers(0, 4)) == 0:
        raw = _gz(raw)
    index = draw(st.none() | st.integers(0, 2))
    return Case(raw=raw[:16384], launch_index=index, instance_data=INSTANCE_DATA,
                agent_fault=fault, label=form)


def generate(n: int, seed: int = 0) -> list[Case]:
    """``n`` cases from a fixed seed (the same list every run for a given seed)."""
    out: list[Case] = []

    @settings(max_examples=n, database=None, deadline=None, derandomize=seed == 0,
              suppress_health_check=list(HealthCheck))
    @given(user_data())
    def collect(case: Case) -> None:
        out.append(case)

    if seed:
        from hypothesis import seed as hseed

        collect = hseed(seed)(collect)
    collect()
    return out
