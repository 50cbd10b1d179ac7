"""Template + context -> bytes, with no side effects (consul-template's ``Execute``).

jinja2's ``SandboxedEnvironment`` because templates come from the store, and
``StrictUndefined`` because a typo must fail that template loudly (with the
variable's and the template's names) rather than render an empty string into a
config file. Rendering returns the bytes plus the secret *references* it used;
writing, checking and reloading are ``agent.bundle.apply``'s business, so a dry run is
free and the renderer is tested with plain tables.

Secret values pass through here only into the output: errors name the template,
the line and the reference, never a value.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from agent.errors import AgentError, RenderError

MAX_OUTPUT = 16 * 1024 * 1024  # a rendered config file larger than this is a template bug

SecretFn = Callable[[str], str]
Loader = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Rendered:
    name: str
    data: bytes
    secrets: tuple[str, ...]  # references used, in first-use order; never values


class _Env(SandboxedEnvironment):
    """The sandbox, plus a cap on string/list repetition (``'x' * 10**10``)."""

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                    and len(seq) * n > MAX_OUTPUT:
                raise jinja2.sandbox.SecurityError("repetition result too large")
        return super().call_binop(context, operator, left, right)

    intercepted_binops = frozenset(["*"])


def _env(loader: Loader | None) -> _Env:
    return _Env(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        loader=jinja2.FunctionLoader(loader) if loader else None,
    )


def build_context(
    instance: Mapping[str, Any],
    group: str,
    vars: Mapping[str, Any] | None,
    peers: Iterable[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """The names DESIGN.md promises templates: instance, group, vars, peers (and secret())."""
    return {
        "instance": dict(instance),
        "group": group,
        "vars": dict(vars or {}),
        "peers": [dict(p) for p in peers],
    }


def peers_from_state(raw: Any) -> list[dict[str, Any]]:
    """Ready members from state.json's ``peers`` (a list or an id->record map), DESIGN fields."""
    if isinstance(raw, Mapping):
        items = [dict(v, id=v.get("id", k)) for k, v in raw.items() if isinstance(v, Mapping)]
    elif isinstance(raw, list):
        items = [dict(v) for v in raw if isinstance(v, Mapping)]
    else:
        return []
    out = []
    for p in items:
        state = p.get("state", "ready")
        if state != "ready":
            continue
        out.append(
            {
                "id": p.get("id") or p.get("instance_id"),
                "ip": p.get("ip"),
                "az": p.get("az"),
                "state": state,
            }
        )
    return sorted(out, key=lambda p: str(p["id"]))


def _line_of(name: str, tb: Any) -> int | None:
    """The template line from a jinja-rewritten traceback (its frames carry the template name)."""
    line = None
    for frame, lineno in traceback.walk_tb(tb):
        if frame.f_code.co_filename == name:
            line = lineno
    return line


def render(
    name: str,
    source: str,
    context: Mapping[str, Any],
    *,
    secret: SecretFn | None = None,
    loader: Loader | None = None,
) -> Rendered:
    """Render one template. RenderError names the template and the line on any failure."""
    used: list[str] = []

    def secret_fn(ref: str) -> str:
        if secret is None:
            raise RenderError(f"secret({ref!r}): no secret resolver configured")
        if not isinstance(ref, str):
            raise RenderError(f"secret(): reference must be a string, got {type(ref).__name__}")
        value = secret(ref)
        if ref not in used:
            used.append(ref)
        return value

    env = _env(loader)
    try:
        # Compiled with the name as filename: tracebacks (and our line numbers) carry it.
        code = env.compile(source, name=name, filename=name)
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(
            f"template {name}: line {exc.lineno}: syntax error: {exc.message}"
        ) from None
    tmpl = env.template_class.from_code(env, code, env.make_globals(None))
    ctx = dict(context)
    ctx["secret"] = secret_fn
    try:
        text = tmpl.render(ctx)
    except jinja2.UndefinedError as exc:
        line = _line_of(name, sys.exc_info()[2])
        at = f"line {line}: " if line else ""
        raise RenderError(f"template {name}: {at}undefined variable: {exc.message}") from None
    except jinja2.TemplateSyntaxError as exc:  # from an include
        raise RenderError(
            f"template {name}: {exc.filename or name} line {exc.lineno}: {exc.message}"
        ) from None
    except jinja2.TemplateNotFound as exc:
        line = _line_of(name, sys.exc_info()[2])
        at = f"line {line}: " if line else ""
        raise RenderError(f"template {name}: {at}included template not found: {exc.name}") from None
    except jinja2.sandbox.SecurityError as exc:
        line = _line_of(name, sys.exc_info()[2])
        at = f"line {line}: " if line else ""
        raise RenderError(f"template {name}: {at}refused by the sandbox: {exc}") from None
    except AgentError as exc:  # a secret that could not be resolved
        line = _line_of(name, sys.exc_info()[2])
        at = f"line {line}: " if line else ""
        raise RenderError(f"template {name}: {at}{exc}") from None
    except Exception as exc:  # a template is user code: whatever it raises is its error
        # Deliberately no chaining and no str(exc) of arbitrary objects beyond the type and
        # message: an exception raised while handling a secret value must not carry it out.
        line = _line_of(name, sys.exc_info()[2])
        at = f"line {line}: " if line else ""
        msg = str(exc) if not used else "(message withheld: template uses secrets)"
        raise RenderError(f"template {name}: {at}{type(exc).__name__}: {msg}") from None
    data = text.encode()
    if len(data) > MAX_OUTPUT:
        raise RenderError(f"template {name}: output of {len(data)} bytes exceeds {MAX_OUTPUT}")
    return Rendered(name, data, tuple(used))
