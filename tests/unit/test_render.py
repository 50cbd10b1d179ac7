"""The renderer: strict, sandboxed, names template and line, records secret refs only."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.bundle.render import build_context, peers_from_state, render
from agent.errors import RenderError

INSTANCE = {"id": "i-0abc", "ami": "ami-1", "type": "t3.micro", "region": "eu-west-1",
            "az": "eu-west-1a", "ip": "10.0.0.5", "tags": {"Name": "web-1"}}


def ctx(**vars: object) -> dict:
    return build_context(INSTANCE, "web", vars, [{"id": "i-2", "ip": "10.0.0.6",
                                                  "az": "eu-west-1b", "state": "ready"}])


@pytest.mark.parametrize("source,expected", [
    ("listen {{ vars.port }};\n", "listen 8080;\n"),
    ("{{ instance.id }} {{ instance.tags.Name }}", "i-0abc web-1"),
    ("{{ group }}", "web"),
    ("{% for p in peers %}{{ p.ip }}{% endfor %}", "10.0.0.6"),
    ("{{ vars.get('missing', 'dflt') }}", "dflt"),
    ("no trailing", "no trailing"),
    ("{{ vars.port | string }}\n\n", "8080\n\n"),
    ("{{ '<b>' }}", "<b>"),  # config files, not HTML: no autoescape
])
def test_renders(source: str, expected: str) -> None:
    assert render("t.j2", source, ctx(port=8080)).data == expected.encode()


@pytest.mark.parametrize("source,line,needle", [
    ("ok\n{{ nope }}\n", 2, "'nope' is undefined"),
    ("a\nb\nc {{ vars.port.x }}", 3, "no attribute 'x'"),
    ("{{ instance.nope }}", 1, "no attribute 'nope'"),
    ("{% for x in undefined_list %}{% endfor %}", 1, "'undefined_list' is undefined"),
])
def test_undefined_names_variable_template_and_line(source: str, line: int, needle: str) -> None:
    with pytest.raises(RenderError) as exc:
        render("nginx.conf.j2", source, ctx(port=1))
    msg = str(exc.value)
    assert "nginx.conf.j2" in msg and f"line {line}" in msg and needle in msg
    assert "undefined" in msg


@pytest.mark.parametrize("source,needle", [
    ("x\n{% if %}", "line 2: syntax error"),
    ("{{ ''.__class__.__mro__ }}", "sandbox"),
    ("{{ range(10**9) | list }}", "sandbox"),
    ("{{ 'x' * 100000000 }}", "too large"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% include 'other.j2' %}", "other.j2"),
])
def test_errors_name_template(source: str, needle: str) -> None:
    with pytest.raises(RenderError) as exc:
        render("app.env.j2", source, ctx(), loader=lambda name: None)
    assert "app.env.j2" in str(exc.value) and needle in str(exc.value)


def test_include_through_loader() -> None:
    files = {"part.j2": "port={{ vars.port }}"}
    out = render("main.j2", "[{% include 'part.j2' %}]", ctx(port=9), loader=files.get)
    assert out.data == b"[port=9]"


def test_secrets_recorded_by_reference_never_value() -> None:
    values = {"ssm:/db/pass": "s3cr3t-value", "secretsmanager:api": "k3y"}
    out = render("app.env.j2",
                 "A={{ secret('ssm:/db/pass') }}\nB={{ secret('secretsmanager:api') }}\n"
                 "C={{ secret('ssm:/db/pass') }}\n",
                 ctx(), secret=values.__getitem__)
    assert out.data == b"A=s3cr3t-value\nB=k3y\nC=s3cr3t-value\n"
    assert out.secrets == ("ssm:/db/pass", "secretsmanager:api")
    assert "s3cr3t" not in repr(out.secrets)


def test_secret_failure_names_ref_and_withholds_values() -> None:
    def resolver(ref: str) -> str:
        if ref == "ssm:/ok":
            return "TOPSECRET"
        raise RenderError(f"secret({ref!r}): ParameterNotFound")

    with pytest.raises(RenderError) as exc:
        render("t.j2", "{{ secret('ssm:/ok') }}\n{{ secret('ssm:/missing') }}", ctx(),
               secret=resolver)
    assert "ssm:/missing" in str(exc.value) and "line 2" in str(exc.value)
    assert "TOPSECRET" not in str(exc.value)
    with pytest.raises(RenderError) as exc2:
        render("t.j2", "{{ secret('ssm:/ok') | int(base=1) }}{{ 1/0 }}", ctx(), secret=resolver)
    assert "TOPSECRET" not in str(exc2.value)


def test_no_resolver_is_an_error() -> None:
    with pytest.raises(RenderError, match="no secret resolver"):
        render("t.j2", "{{ secret('ssm:/x') }}", ctx())


@pytest.mark.parametrize("raw,ids", [
    (None, []),
    ("junk", []),
    ([{"id": "i-1", "ip": "1", "az": "a", "state": "ready"},
      {"id": "i-2", "ip": "2", "az": "b", "state": "dead"}], ["i-1"]),
    ({"i-3": {"ip": "3", "az": "c", "state": "ready"}, "i-1": {"ip": "1", "state": "ready"}},
     ["i-1", "i-3"]),
])
def test_peers_from_state(raw: object, ids: list[str]) -> None:
    peers = peers_from_state(raw)
    assert [p["id"] for p in peers] == ids
    assert all(set(p) == {"id", "ip", "az", "state"} for p in peers)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_plain_text_renders_to_itself_or_fails_cleanly(text: str) -> None:
    """Any text either renders or raises RenderError; never another exception type."""
    try:
        render("t.j2", text, ctx())
    except RenderError as exc:
        assert "t.j2" in str(exc)
