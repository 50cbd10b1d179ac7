"""``secret("ssm:/path")`` and ``secret("secretsmanager:name")`` for templates.

Values are fetched through boto3 (SSM ``GetParameter`` with decryption, Secrets
Manager ``GetSecretValue``), cached for one render pass, and never logged,
recorded in state or shown by ``status``: the resolver keeps the references it
resolved (what ``apply`` records) and can ``redact`` a text (a check command's
output may echo the staged file) before anything is stored. Errors name the
reference and the failure, never a value.
"""

from __future__ import annotations

from typing import Any

from agent.aws import errors as awserrors
from agent.errors import RenderError

SCHEMES = ("ssm", "secretsmanager")


def parse_ref(ref: str) -> tuple[str, str]:
    """``"ssm:/db/password"`` -> ``("ssm", "/db/password")``; RenderError for anything else."""
    scheme, sep, name = ref.partition(":")
    if not sep or scheme not in SCHEMES or not name:
        raise RenderError(f"secret({ref!r}): expected 'ssm:/path' or 'secretsmanager:name'")
    if scheme == "ssm" and not name.startswith("/") and "/" in name:
        raise RenderError(f"secret({ref!r}): SSM parameter paths start with '/'")
    return scheme, name


class SecretResolver:
    """Callable ``ref -> value`` for one render pass; clients are made on first use."""

    def __init__(
        self,
        region: str | None = None,
        *,
        ssm: Any = None,
        secretsmanager: Any = None,
        timeout: float | None = None,
    ) -> None:
        self.region = region
        self._clients: dict[str, Any] = {"ssm": ssm, "secretsmanager": secretsmanager}
        self._values: dict[str, str] = {}
        self.timeout = timeout

    def _client(self, service: str) -> Any:
        if self._clients.get(service) is None:
            from agent.aws import session as aws

            kw: dict[str, Any] = {}
            if self.timeout is not None:
                kw = {
                    "connect_timeout": min(2.0, self.timeout),
                    "read_timeout": min(10.0, self.timeout),
                }
            self._clients[service] = aws.client(service, self.region, **kw)
        return self._clients[service]

    @property
    def used(self) -> tuple[str, ...]:
        return tuple(self._values)

    def __call__(self, ref: str) -> str:
        if ref in self._values:
            return self._values[ref]
        scheme, name = parse_ref(ref)
        try:
            if scheme == "ssm":
                resp = self._client("ssm").get_parameter(Name=name, WithDecryption=True)
                value = resp["Parameter"]["Value"]
            else:
                resp = self._client("secretsmanager").get_secret_value(SecretId=name)
                if "SecretString" in resp:
                    value = resp["SecretString"]
                else:
                    value = bytes(resp["SecretBinary"]).decode()
        except RenderError:
            raise
        except awserrors.AWS_ERRORS as exc:  # name the ref and the code, never a value
            raise RenderError(f"secret({ref!r}): {awserrors.describe(exc)}") from None
        self._values[ref] = value
        return value

    def redact(self, text: str) -> str:
        """``text`` with every resolved value replaced by ``***`` (longest first)."""
        for value in sorted(self._values.values(), key=len, reverse=True):
            if len(value) >= 3:
                text = text.replace(value, "***")
        return text
