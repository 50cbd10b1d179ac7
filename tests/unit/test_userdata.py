"""User-data decoding: every accepted form, every refusal, and the gzip bomb."""

from __future__ import annotations

import base64
import gzip
import time
import tracemalloc
import zlib
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config.userdata import (
    MAX_DECOMPRESSED_BYTES,
    MAX_INPUT_BYTES,
    MAX_RAW_BYTES,
    StaticMetadata,
    deep_merge,
    looks_like_user_data,
    parse_user_data,
    read_user_data,
)
from agent.errors import UserDataError


def _gz(data: bytes, level: int = 9) -> bytes:
    """gzip with a fixed mtime: parametrized ids must be the same in every xdist worker."""
    return gzip.compress(data, level, mtime=0)


DATA = Path(__file__).parent.parent / "data" / "userdata"
AGENT = {"group": "web", "store": {"bucket": "my-fleet", "prefix": "prod"}}
CLOUD_CONFIG = b"#cloud-config\npackages: [nginx]\nec2_agent:\n  group: web\n" + (
    b"  store: {bucket: my-fleet, prefix: prod}\n"
)


def mime(*parts: tuple[str, bytes | str], encoding: str = "base64") -> bytes:
    """A multipart like cloud-init's make-mime: text/<subtype> parts, base64 by default."""
    outer = MIMEMultipart()
    for subtype, body in parts:
        text = body.decode() if isinstance(body, bytes) else body
        part = MIMEText(text, subtype, "utf-8")
        if encoding != "base64":
            del part["Content-Transfer-Encoding"]
            part.set_payload(text)
            part["Content-Transfer-Encoding"] = encoding
        outer.attach(part)
    return outer.as_bytes()


def raw_part_mime(ctype: str, payload: bytes) -> bytes:
    """A multipart with one part whose (binary) payload is base64-encoded as is."""
    b64 = base64.encodebytes(payload).decode()
    return (
        'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
        f"--XX\nContent-Type: {ctype}\nContent-Transfer-Encoding: base64\n\n{b64}\n--XX--\n"
    ).encode()


# --- accepted forms ----------------------------------------------------------

ACCEPTED = [
    ("cloud-config", CLOUD_CONFIG, AGENT),
    ("cloud-config with BOM", b"\xef\xbb\xbf" + CLOUD_CONFIG, AGENT),
    ("cloud-config CRLF", CLOUD_CONFIG.replace(b"\n", b"\r\n"), AGENT),
    ("plain yaml", b"ec2_agent:\n  group: web\n  store: {bucket: my-fleet, prefix: prod}\n", AGENT),
    ("json is yaml", b'{"ec2_agent": {"group": "web"}}', {"group": "web"}),
    ("empty ec2_agent", b"#cloud-config\nec2_agent:\n", {}),
    ("gzip cloud-config", _gz(CLOUD_CONFIG), AGENT),
    ("mime cloud-config", mime(("cloud-config", CLOUD_CONFIG)), AGENT),
    ("mime x-ec2-agent bare", mime(("x-ec2-agent", yaml.safe_dump(AGENT))), AGENT),
    (
        "mime x-ec2-agent wrapped",
        mime(("x-ec2-agent", yaml.safe_dump({"ec2_agent": AGENT}))),
        AGENT,
    ),
    (
        "mime with shellscript",
        mime(("x-shellscript", "#!/bin/sh\necho ec2_agent\n"), ("cloud-config", CLOUD_CONFIG)),
        AGENT,
    ),
    ("mime 7bit", mime(("cloud-config", CLOUD_CONFIG), encoding="7bit"), AGENT),
    (
        "mime quoted-printable",
        mime(("cloud-config", CLOUD_CONFIG), encoding="quoted-printable"),
        AGENT,
    ),
    ("mime text/plain sniffed", mime(("plain", CLOUD_CONFIG)), AGENT),
    ("gzip mime", _gz(mime(("cloud-config", CLOUD_CONFIG))), AGENT),
    (
        "mime gzipped part",
        raw_part_mime("text/x-ec2-agent", _gz(yaml.safe_dump(AGENT).encode())),
        AGENT,
    ),
    (
        "mime application/gzip part",
        raw_part_mime("application/gzip", _gz(CLOUD_CONFIG)),
        AGENT,
    ),
    (
        "mime application/x-gzip part",
        raw_part_mime("application/x-gzip", _gz(CLOUD_CONFIG)),
        AGENT,
    ),
    ("capitalised header", CLOUD_CONFIG.replace(b"#cloud-config", b"#Cloud-Config"), AGENT),
    ("mime text/plain #Cloud-Config", mime(("plain", CLOUD_CONFIG.replace(b"#c", b"#C"))), AGENT),
    ("mime x-shellscript holding cloud-config", mime(("x-shellscript", CLOUD_CONFIG)), AGENT),
    (
        "mime after a From line",
        b"From nobody Tue Dec  1 00:00:00 2026\n" + mime(("cloud-config", CLOUD_CONFIG)),
        AGENT,
    ),
    (
        "jsonp adds ec2_agent",
        mime(("cloud-config", b"#cloud-config\npackages: [a]\n"),
             ("cloud-config-jsonp", '#cloud-config-jsonp\n[{"op": "add", "path": "/ec2_agent", '
              '"value": {"group": "web", "store": {"bucket": "my-fleet", "prefix": "prod"}}}]')),
        AGENT,
    ),
    (
        "archive",
        b"#cloud-config-archive\n- type: text/cloud-config\n  content: |\n"
        + b"".join(b"    " + line + b"\n" for line in CLOUD_CONFIG.splitlines()),
        AGENT,
    ),
    (
        "two cloud-configs: default merge replaces ec2_agent",
        mime(("cloud-config", b"#cloud-config\nec2_agent: {group: old, vars: {a: 1}}\n"),
             ("cloud-config", CLOUD_CONFIG)),
        AGENT,
    ),
    (
        "merge_how recurses into ec2_agent",
        mime(("cloud-config", b"#cloud-config\nec2_agent: {group: web}\n"),
             ("cloud-config", b"#cloud-config\nmerge_how: dict(recurse_array)+list(append)\n"
              b"ec2_agent: {store: {bucket: my-fleet, prefix: prod}}\n")),
        AGENT,
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected"), [(r, e) for _, r, e in ACCEPTED], ids=[n for n, _, _ in ACCEPTED]
)
def test_accepted_forms(raw: bytes, expected: dict) -> None:
    assert parse_user_data(raw) == expected


NOT_OURS = [
    ("none", None),
    ("empty", b""),
    ("whitespace", b"  \n\t\n"),
    ("shell script", b"#!/bin/bash\necho ec2_agent: group=web\n"),
    ("cloud-config without key", b"#cloud-config\npackages: [nginx]\n"),
    ("cloud-config empty", b"#cloud-config\n"),
    ("plain text", b"hello world: this is not for us\n"),
    ("text garbage", b"}{][::!!@@ not yaml at all"),
    ("include url", b"#include\nhttps://example.invalid/ud\n"),
    ("boothook", b"#cloud-boothook\n#!/bin/sh\necho hi\n"),
    ("powershell", b"<powershell>\nWrite-Host hi\n</powershell>\n"),
    ("gzip shell script", _gz(b"#!/bin/sh\necho hi\n")),
    ("mime only shellscript", mime(("x-shellscript", "#!/bin/sh\necho hi\n"))),
    ("mime include-url", mime(("x-include-url", "https://example.invalid/x\n"))),
    ("yaml list", b"- ec2_agent\n- b\n"),
    ("gzip twice (cloud-init peels one layer)", _gz(_gz(CLOUD_CONFIG))),
    ("gzip bytes in a text/cloud-config part", raw_part_mime("text/cloud-config",
                                                            _gz(CLOUD_CONFIG))),
    ("latin-1 script", b"#!/bin/sh\necho caf\xe9\n"),
    ("cp1252 powershell", "<powershell>\nWrite-Host '\u20ac'\n</powershell>\n".encode("cp1252")),
    ("octet-stream part", raw_part_mime("application/octet-stream", bytes(range(256)))),
    ("iso-8859-1 part", (
        'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n--XX\n'
        "Content-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: 8bit\n\n"
        "#!/bin/sh\necho caf\xe9\n--XX--\n").encode("latin-1")),
    ("broken cloud-config without ec2_agent", b"#cloud-config\npackages: [nginx\n"),
    ("duplicate keys outside ec2_agent", b"#cloud-config\napt: {a: 1}\napt: {b: 2}\n"),
    ("cloud-config list", b"#cloud-config\n- a\n- b\n"),
    ("text mentioning ec2_agent", b"text garbage that says ec2_agent: : : ["),
    ("binary", bytes(range(256)) * 4),
    ("png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    ("utf-16", b"\xff\xfe#\x00c\x00"),
    ("Launch-Index of another instance", b"#cloud-config\nlaunch-index: 5\nec2_agent: {}\n"),
]


@pytest.mark.parametrize("raw", [r for _, r in NOT_OURS], ids=[n for n, _ in NOT_OURS])
def test_no_agent_part(raw: bytes | None) -> None:
    assert parse_user_data(raw, StaticMetadata(index=0)) is None


def test_tar_gz_user_data_is_not_ours() -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("user-data")
        info.size = len(CLOUD_CONFIG)
        tar.addfile(info, io.BytesIO(CLOUD_CONFIG))
    assert read_user_data(buf.getvalue()).config is None


def test_skipped_parts_leave_a_note() -> None:
    got = read_user_data(mime(("cloud-config", b"#cloud-config\npackages: [x\n"),
                              ("cloud-config", CLOUD_CONFIG)))
    assert got.config == AGENT
    assert any("not valid YAML" in n and "part 1" in n for n in got.notes), got.notes


def test_include_is_noted_not_followed() -> None:
    got = read_user_data(b"#include\nhttps://example.invalid/ud\n")
    assert got.config is None
    assert any("#include" in n for n in got.notes)


def test_launch_index_selects_parts() -> None:
    raw = mime(("cloud-config", b"#cloud-config\nlaunch-index: 0\nec2_agent: {group: zero}\n"),
               ("cloud-config", b"#cloud-config\nlaunch-index: 1\nec2_agent: {group: one}\n"))
    assert parse_user_data(raw, StaticMetadata(index=0)) == {"group": "zero"}
    assert parse_user_data(raw, StaticMetadata(index=1)) == {"group": "one"}
    assert parse_user_data(raw, StaticMetadata(index=2)) is None
    assert parse_user_data(raw) == {"group": "one"}  # unknown index: every part, in order


def test_jinja_renders_with_instance_data_any_header_case() -> None:
    data = {"v1": {"region": "eu-west-1"}}
    for header in (b"## template: jinja", b"## Template: Jinja"):
        raw = header + b"\n#cloud-config\nec2_agent: {group: 'web-{{ v1.region }}'}\n"
        assert parse_user_data(raw, StaticMetadata(data=data)) == {"group": "web-eu-west-1"}
    # an undefined parent: cloud-init drops the part, so the agent's block is lost: error
    broken = b"## template: jinja\n#cloud-config\nec2_agent: {group: '{{ x.y }}'}\n"
    with pytest.raises(UserDataError, match="jinja rendering failed: UndefinedError"):
        parse_user_data(broken, StaticMetadata(data=data))
    # no metadata to render with (cloud-init without instance-data.json): the same
    with pytest.raises(UserDataError, match="no instance metadata"):
        parse_user_data(raw)
    # a template that is not the agent's is skipped with a note, never an error
    got = read_user_data(b"## template: jinja\n#!/bin/sh\necho {{ x.y }}\n",
                         StaticMetadata(data=data))
    assert got.config is None and any("jinja" in n for n in got.notes)


# --- merging parts ------------------------------------------------------------


def test_x_ec2_agent_merges_over_cloud_config_regardless_of_order() -> None:
    cc = "#cloud-config\nec2_agent:\n  group: web\n  heal: {mode: armed, grace_s: 60}\n"
    agent = "heal: {mode: dry-run}\nhealth: [{type: process, name: nginx}]\n"
    expected = {
        "group": "web",
        "heal": {"mode": "dry-run", "grace_s": 60},
        "health": [{"type": "process", "name": "nginx"}],
    }
    assert parse_user_data(mime(("cloud-config", cc), ("x-ec2-agent", agent))) == expected
    assert parse_user_data(mime(("x-ec2-agent", agent), ("cloud-config", cc))) == expected


def test_several_parts_of_one_kind_merge_in_order() -> None:
    a = "group: web\nvars: {a: 1, b: 1}\n"
    b = "vars: {b: 2}\n"
    assert parse_user_data(mime(("x-ec2-agent", a), ("x-ec2-agent", b))) == {
        "group": "web",
        "vars": {"a": 1, "b": 2},
    }


def test_nested_multipart() -> None:
    inner = MIMEMultipart()
    inner.attach(MIMEText(yaml.safe_dump(AGENT), "x-ec2-agent", "utf-8"))
    outer = MIMEMultipart()
    outer.attach(MIMEText("#!/bin/sh\n", "x-shellscript", "utf-8"))
    outer.attach(inner)
    assert parse_user_data(outer.as_bytes()) == AGENT


def test_deep_merge_lists_replace_and_inputs_untouched() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    top = {"a": {"c": [3]}, "e": {"f": 1}}
    assert deep_merge(base, top) == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = deep_merge(base, top)
    merged["e"]["f"] = 2
    assert top["e"]["f"] == 1


# --- refusals -----------------------------------------------------------------


def test_oversize_raw() -> None:
    """More than EC2's 16 KiB: a note (cloud-init reads it); more than 1 MiB: refused."""
    raw = CLOUD_CONFIG + b"#" + b"x" * MAX_RAW_BYTES + b"\n"
    got = read_user_data(raw)
    assert got.config == AGENT
    assert any("EC2's limit of 16384" in n for n in got.notes)
    huge = b"#cloud-config\n#" + b"x" * MAX_INPUT_BYTES + b"\n"
    with pytest.raises(UserDataError, match=rf"{len(huge)} bytes, more than the {MAX_INPUT_BYTES}"):
        parse_user_data(huge)


def test_exactly_the_limit_is_fine() -> None:
    pad = b"#" + b"x" * (MAX_RAW_BYTES - len(CLOUD_CONFIG) - 2) + b"\n"
    raw = CLOUD_CONFIG + pad
    assert len(raw) == MAX_RAW_BYTES
    assert parse_user_data(raw) == AGENT


def _bomb() -> bytes:
    """15 MiB of zeros gzipped at level 9: ~15 KB, just under EC2's 16 KiB."""
    return _gz(b"\0" * (15 << 20), 9)


def test_gzip_bomb_fails_fast_and_small() -> None:
    bomb = _bomb()
    assert len(bomb) <= MAX_RAW_BYTES
    assert len(zlib.decompress(bomb, 31)) > 10 * MAX_DECOMPRESSED_BYTES
    tracemalloc.start()
    # CPU time of this thread, not wall time: "fast" must not depend on what else the machine
    # is doing (issue #16). Decompressing it all would also blow the memory bound below.
    started = time.thread_time()
    try:
        with pytest.raises(UserDataError, match=rf"more than {MAX_DECOMPRESSED_BYTES} bytes"):
            parse_user_data(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.thread_time() - started < 2.0
    assert peak < 4 * MAX_DECOMPRESSED_BYTES


def test_bomb_inside_mime_part() -> None:
    gz = _gz(b"\0" * (4 * MAX_DECOMPRESSED_BYTES), 9)
    assert len(gz) < MAX_RAW_BYTES
    with pytest.raises(UserDataError, match=r"part 1 .*decompressed size cap"):
        parse_user_data(raw_part_mime("text/x-ec2-agent", gz))


def test_budget_is_shared_between_parts() -> None:
    # Each part alone fits under the cap; together they do not.
    body = b"#" + b"a" * (MAX_DECOMPRESSED_BYTES // 2 + 10) + b"\nec2_agent: {}\n"
    gz = base64.encodebytes(_gz(body, 9)).decode()
    part = f"--XX\nContent-Type: text/x-ec2-agent\nContent-Transfer-Encoding: base64\n\n{gz}\n"
    raw = (
        'Content-Type: multipart/mixed; boundary="XX"\nMIME-Version: 1.0\n\n'
        + part * 3
        + "--XX--\n"
    ).encode()
    assert len(raw) < MAX_RAW_BYTES
    with pytest.raises(UserDataError, match="decompressed size cap"):
        parse_user_data(raw)


@pytest.mark.parametrize(
    "raw",
    [_gz(CLOUD_CONFIG)[:-12], b"\x1f\x8b" + b"\x00" * 30, _gz(CLOUD_CONFIG) + b"trailing junk"],
    ids=["truncated", "corrupt", "trailing"],
)
def test_bad_gzip_is_read_as_is_like_cloud_init(raw: bytes) -> None:
    got = read_user_data(raw)
    assert got.config is None
    assert any("gzip" in n for n in got.notes)


def test_bad_gzip_part_drops_all_user_data_like_cloud_init() -> None:
    """cloud-init 22.4 (ERROR_ON_USER_DATA_FAILURE) takes no user-data at all then."""
    outer = MIMEMultipart()
    bad = MIMEText("", "plain")
    bad.replace_header("Content-Type", "application/gzip")
    bad.set_payload(base64.encodebytes(b"\x1f\x8bnot gzip").decode())
    bad.replace_header("Content-Transfer-Encoding", "base64")
    outer.attach(bad)
    outer.attach(MIMEText("#cloud-config\npackages: [nginx]\n", "cloud-config"))
    got = read_user_data(outer.as_bytes())
    assert got.config is None
    assert any("cloud-init cannot read it" in n for n in got.notes), got.notes
    # The same with the agent's block in it: the block is lost, which is the agent's error.
    outer.attach(MIMEText(CLOUD_CONFIG.decode(), "cloud-config"))
    with pytest.raises(UserDataError, match="mentions ec2_agent but cloud-init cannot read it"):
        read_user_data(outer.as_bytes())


@pytest.mark.parametrize(
    ("raw", "line", "column", "where"),
    [
        (b"#cloud-config\nec2_agent:\n  group: web\n   store: x\n", 4, 9, "user-data"),
        (b"#cloud-config\nec2_agent: {group: web\n", 3, 1, "user-data"),
        (b"ec2_agent:\n\tgroup: web\n", 2, 1, "user-data"),
        (b"#cloud-config\nec2_agent:\n  group: a\n  group: b\n", 4, 3, "user-data"),
        (b"#cloud-config\nec2_agent: {}\nruncmd: []\nec2_agent: {}\n", 4, 1, "user-data"),
    ],
    ids=["bad-indent", "unclosed-flow", "tab", "duplicate-key", "two-blocks"],
)
def test_yaml_error_names_line_and_column(raw: bytes, line: int, column: int, where: str) -> None:
    with pytest.raises(UserDataError) as info:
        parse_user_data(raw)
    assert f"line {line}, column {column}" in str(info.value)
    assert str(info.value).startswith(where)


def test_yaml_error_in_mime_part_names_the_part() -> None:
    raw = mime(("x-shellscript", "#!/bin/sh\n"), ("x-ec2-agent", "group: [web\n"))
    with pytest.raises(UserDataError) as info:
        parse_user_data(raw)
    msg = str(info.value)
    assert "part 2 (text/x-ec2-agent" in msg
    assert "line 2, column 1" in msg


def test_merge_keys_are_not_duplicates() -> None:
    raw = (
        b"#cloud-config\nbase: &b {grace_s: 1, mode: off}\n"
        b"ec2_agent:\n  heal:\n    <<: *b\n    grace_s: 5\n"
    )
    assert parse_user_data(raw) == {"heal": {"grace_s": 5, "mode": False}}


def test_alias_bomb_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    lines.append("ec2_agent: {vars: {boom: *a7}}")
    raw = ("#cloud-config\n" + "\n".join(lines) + "\n").encode()
    assert len(raw) < MAX_RAW_BYTES
    with pytest.raises(UserDataError, match="aliases"):
        parse_user_data(raw)


@pytest.mark.parametrize(
    ("raw", "pattern"),
    [
        (b"#cloud-config\nec2_agent: web\n", "ec2_agent must be a mapping.*got str"),
        (b"#cloud-config\nec2_agent: [a, b]\n", "ec2_agent must be a mapping.*got list"),
        (b"ec2_agent: 3\n", "ec2_agent must be a mapping.*got int"),
        (b"#cloud-config\n- ec2_agent\n- b\n", "mentions ec2_agent but is a YAML list"),
        (mime(("x-ec2-agent", "- a\n")), "x-ec2-agent part must be a YAML mapping"),
        (mime(("x-ec2-agent", "ec2_agent: {}\ngroup: x\n")), "next to other keys \\(group\\)"),
        (mime(("cloud-config", "#cloud-config\nec2_agent: 5\n")), "part 1.*ec2_agent must"),
        (b"## template: jinja\n#cloud-config\nec2_agent: {group: '{{ v1.region.x.y }}'}\n",
         "jinja"),
        (b"ec2_agent: : : [", "YAML error at line 1"),
        (b"#cloud-config\nec2_agent: {group: caf\xe9}\n", "line 2, column 23: byte 0xe9"),
        (b'#cloud-config-jsonp\n[{"op": "replace", "path": "/ec2_agent", "value": {}}]',
         "mentions ec2_agent but patch does not apply"),
        (b"#cloud-config\nmerge_how: bogus(x)\nec2_agent: {}\n", "cannot be merged"),
    ],
    ids=["str", "list", "int", "cc-list", "part-list", "part-mixed", "part-cc", "jinja", "garbage",
         "latin1", "jsonp", "merge-how"],
)
def test_agent_value_shape_errors(raw: bytes, pattern: str) -> None:
    with pytest.raises(UserDataError, match=pattern):
        parse_user_data(raw)


def test_alias_bomb_outside_the_agent_block_is_skipped() -> None:
    """Merging walks every path of a part: a part that expands too far is not merged."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 8):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]")
    bomb = ("#cloud-config\n" + "\n".join(lines) + "\n").encode()
    got = read_user_data(mime(("cloud-config", bomb), ("cloud-config", CLOUD_CONFIG)))
    assert got.config == AGENT
    assert any("aliases" in n for n in got.notes)


def test_not_bytes_refused() -> None:
    with pytest.raises(UserDataError, match="must be bytes"):
        parse_user_data("#cloud-config\n")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"#cloud-config\n", True),
        (b"From x\nMIME-Version: 1.0\n", True),
        (b"MIME-Version: 1.0\n", True),
        (_gz(b"x"), True),
        (b"group: web\n", False),
        (b"ec2_agent: {group: web}\n", True),
        (b"## Template: Jinja\n", True),
        (b"#!/bin/sh\n", True),
    ],
)
def test_looks_like_user_data(raw: bytes, expected: bool) -> None:
    assert looks_like_user_data(raw) is expected


def test_example_files() -> None:
    """The examples under tests/data/userdata parse to what their .expected.yaml says."""
    cases = sorted(DATA.glob("*.userdata"))
    assert cases, DATA
    for case in cases:
        expected = yaml.safe_load(case.with_suffix(".expected.yaml").read_text())
        assert parse_user_data(case.read_bytes()) == expected, case.name


# --- properties -------------------------------------------------------------

_keys = st.text(
    st.characters(categories=["Ll", "Nd"], max_codepoint=127) | st.just("_"), min_size=1, max_size=8
)
# PyYAML itself does not round-trip control characters like U+0085 (NEL): leave them out.
_text = st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=20)
_scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | _text
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
    max_leaves=12,
)
_agent = st.dictionaries(_keys, _values, max_size=5)


@settings(max_examples=150, deadline=None)
@given(_agent, st.sampled_from(["cc", "plain", "mime-cc", "mime-agent"]), st.integers(0, 1))
def test_roundtrip_any_mapping_any_envelope(agent: dict, form: str, gz: int) -> None:
    """parse(gzip?(envelope(x))) == x for any mapping x and every envelope (cloud-init
    peels one gzip layer; two are tested in NOT_OURS)."""
    body = yaml.safe_dump({"ec2_agent": agent}, allow_unicode=True)
    if form == "cc":
        raw = ("#cloud-config\n" + body).encode()
    elif form == "plain":
        raw = body.encode()
    elif form == "mime-cc":
        raw = mime(("cloud-config", "#cloud-config\n" + body))
    else:
        raw = mime(("x-ec2-agent", yaml.safe_dump(agent, allow_unicode=True)))
    for _ in range(gz):
        raw = _gz(raw)
    if len(raw) > MAX_RAW_BYTES:
        return
    result = parse_user_data(raw)
    assert result == agent


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_crash(raw: bytes) -> None:
    """Any bytes: a mapping, None, or UserDataError, never another exception."""
    try:
        result = parse_user_data(raw)
    except UserDataError:
        return
    assert result is None or isinstance(result, dict)


@settings(max_examples=100, deadline=None)
@given(_agent, _agent)
def test_deep_merge_top_wins(base: dict, top: dict) -> None:
    merged = deep_merge(base, top)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            assert set(value) <= set(merged[key])
        else:
            assert merged[key] == value
    for key in set(base) - set(top):
        assert merged[key] == base[key]
