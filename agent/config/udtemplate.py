"""``## template: jinja`` user-data, rendered with the instance's metadata as cloud-init does.

Pure. cloud-init renders such a part with the variables of its
``instance-data.json`` (``v1.instance_id``, ``v1.region``, ``ds.meta_data...``),
after turning every key with ``-`` or ``.`` into an extra ``_`` alias, copying the
``v1`` keys to the top level and decoding the ``base64_encoded_keys``; an
undefined variable renders as ``CI_MISSING_JINJA_VAR/<name>``, and the first
line (the ``## template:`` header, matched case-insensitively) is dropped. The
result is sniffed again (``#cloud-config`` ...).

Here jinja runs sandboxed (``jinja2.sandbox``): user-data is input from whoever
can launch an instance. ``instance_data_from_identity`` builds the same shape
from what the agent reads from IMDS.
"""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Mapping
from typing import Any

MISSING_PREFIX = "CI_MISSING_JINJA_VAR/"
_HEADER = re.compile(r"##\s*template:(.*)", re.I)
_ALIAS = re.compile(r"[-.]")  # jinja's own operator characters that occur in keys


class TemplateError(ValueError):
    """The template cannot be rendered (syntax error, sandbox refusal...)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


def template_kind(text: str) -> str | None:
    """``jinja`` / ``basic`` for a ``## template: X`` first line, else None."""
    first = text.split("\n", 1)[0]
    m = _HEADER.match(first)
    return m.group(1).lower().strip() if m else None


def jinja_vars(instance_data: Mapping[str, Any]) -> dict[str, Any]:
    """The variables cloud-init gives a template, from an ``instance-data.json`` mapping."""
    decode = [p.replace("-", "_") for p in instance_data.get("base64-encoded-keys", [])]
    return _convert(instance_data, "", decode)


def _convert(data: Mapping[str, Any], prefix: str, decode: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in sorted(data.items()):
        path = f"{prefix}/{key}" if prefix else key
        if path in decode and isinstance(value, str):
            value = base64.b64decode(value).decode("utf-8", "replace")
        if isinstance(value, Mapping):
            out[key] = _convert(value, path, decode)
            if re.match(r"v\d+$", key):
                for sub, subvalue in out[key].items():
                    out[sub] = copy.deepcopy(subvalue)
        else:
            out[key] = value
        alias = _ALIAS.sub("_", key)
        if alias != key:
            out[alias] = copy.deepcopy(out[key])
    return out


def render(text: str, instance_data: Mapping[str, Any] | None) -> str:
    """Render a ``## template: jinja`` document; the header line is dropped.

    Raises TemplateError when jinja refuses it (cloud-init then skips the part).
    """
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    class _Missing(jinja2.DebugUndefined):
        def __str__(self) -> str:
            return f"{MISSING_PREFIX}{self._undefined_name}"

        def __sub__(self, other: object) -> Any:
            raise TypeError(f"undefined jinja variable {self._undefined_name!r} in a subtraction")

    body = text.split("\n", 1)[1] if "\n" in text else ""
    env = SandboxedEnvironment(undefined=_Missing, trim_blocks=True,
                               extensions=["jinja2.ext.do"])
    params = jinja_vars(instance_data or {})
    try:
        out = env.from_string(body).render(**params)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"jinja syntax error: {exc.message}", (exc.lineno or 0) + 1) from exc
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError,
            AttributeError) as exc:
        raise TemplateError(f"jinja rendering failed: {type(exc).__name__}: {exc}") from exc
    return out + ("\n" if body.endswith("\n") else "")


def instance_data_from_identity(identity: Any, local_hostname: str | None = None) -> dict:
    """cloud-init's ``instance-data.json`` keys the agent can fill from IMDS's identity.

    The ``v1`` keys cloud-init documents as standard (instance id, region,
    availability zone, cloud, platform, local hostname) and ``ds.meta_data``
    as much as the agent knows of it; anything else a template asks for renders as
    ``CI_MISSING_JINJA_VAR/<name>``, as with cloud-init when a key is absent.
    """
    iid = getattr(identity, "instance_id", None)
    region = getattr(identity, "region", None)
    az = getattr(identity, "availability_zone", None)
    ip = getattr(identity, "local_ipv4", None)
    hostname = local_hostname or (f"ip-{ip.replace('.', '-')}" if ip else None)
    v1 = {
        "availability-zone": az, "availability_zone": az,
        "cloud-name": "aws", "cloud_name": "aws", "cloud_id": "aws",
        "instance-id": iid, "instance_id": iid,
        "local-hostname": hostname, "local_hostname": hostname,
        "platform": "ec2", "region": region,
        "subplatform": "metadata (http://169.254.169.254)",
    }
    meta = {
        "instance-id": iid, "instance-type": getattr(identity, "instance_type", None),
        "ami-id": getattr(identity, "ami_id", None), "local-ipv4": ip,
        "local-hostname": hostname,
        "placement": {"availability-zone": az, "region": region},
    }
    return {"v1": v1, "ds": {"meta_data": meta}, "base64_encoded_keys": []}


class _ExampleIdentity:
    instance_id = "i-0123456789abcdef0"
    ami_id = "ami-0123456789abcdef0"
    instance_type = "t3.micro"
    region = "us-east-1"
    availability_zone = "us-east-1a"
    local_ipv4 = "10.0.0.10"


EXAMPLE_INSTANCE_DATA = instance_data_from_identity(_ExampleIdentity())
"""Stand-in metadata for ``config validate`` (no instance to ask)."""
