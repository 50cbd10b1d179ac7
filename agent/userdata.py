"""Raw EC2 user-data bytes -> the agent's config mapping (or ``None``).

Pure: no network, no files, no clock. The boot phase fetches the bytes from IMDS
and hands them here; this module only decodes and extracts.

Accepted forms (DESIGN.md, "User-data"), any of them optionally gzipped
(magic ``1f 8b``, at most ``MAX_GZIP_DEPTH`` nested layers):

- ``#cloud-config`` YAML whose top-level ``ec2_agent:`` mapping is the config
  (cloud-init ignores the unknown key);
- a MIME multipart as ``cloud-init devel make-mime`` builds it, with
  ``text/cloud-config`` parts (their ``ec2_agent:`` key) and/or ``text/x-ec2-agent``
  parts. An ``x-ec2-agent`` part is YAML that is either the agent mapping itself or
  a mapping whose only key is ``ec2_agent:``; both are accepted. Parts may be base64
  or quoted-printable and their content may be gzipped. ``text/plain`` and
  ``application/octet-stream`` parts are sniffed like cloud-init does (a part that
  starts with ``#cloud-config`` is a cloud-config). Every other part type
  (``x-shellscript``, ``x-include-url``, ...) belongs to cloud-init and is ignored;
- plain YAML with a top-level ``ec2_agent:`` mapping.

Several parts carrying agent config are deep-merged in this order: all
cloud-config parts (in message order), then all ``x-ec2-agent`` parts (in message
order). So ``x-ec2-agent`` wins key by key over cloud-config, mappings merge
recursively and lists are replaced, the same rule as the config layers.

Anything else (a shell script, a PowerShell block, empty user-data) has no agent
part: ``None``. Input that is ours but broken is rejected with ``UserDataError``
naming the part and, for YAML, the 1-based line and column, never silently
replaced by "no config" (the cloud-init failure mode STYLE.md warns about).

Limits, because user-data is input from whoever can launch an instance:
``MAX_RAW_BYTES`` (EC2's own 16 KiB), ``MAX_DECOMPRESSED_BYTES`` in total over all
gzip layers and parts, enforced while streaming so a gzip bomb fails after
allocating about the cap, and ``MAX_YAML_NODES`` against alias ("billion laughs")
expansion when the result is walked later.
"""

from __future__ import annotations

import copy
import email
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from agent.errors import UserDataError

MAX_RAW_BYTES = 16384
"""EC2 refuses user-data larger than 16 KiB (before base64); more is not from EC2."""

MAX_DECOMPRESSED_BYTES = 1024 * 1024
"""Total bytes all gzip layers and parts may expand to (1 MiB)."""

MAX_GZIP_DEPTH = 3
"""Nested gzip layers allowed (whole user-data, a part, and one spare)."""

MAX_YAML_NODES = 100_000
"""Values a loaded YAML document may expand to, counting alias re-uses each time."""

AGENT_KEY = "ec2_agent"
AGENT_PART_TYPE = "text/x-ec2-agent"
CLOUD_CONFIG_TYPE = "text/cloud-config"
GZIP_MAGIC = b"\x1f\x8b"

# Content types cloud-init sniffs by their first line rather than trusting.
_SNIFFED_TYPES = frozenset(
    {"text/plain", "text/x-not-multipart", "application/octet-stream", "text/x-unknown"}
)
# First-line headers of other user-data formats (cloud-init's starts_with table).
_FOREIGN_HEADERS = (
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "#upstart-job",
    "#cloud-config-archive",
    "#cloud-config-jsonp",
    "## template: jinja",
    "<powershell>",
    "<script>",
    "<persist>",
)


def parse_user_data(raw: bytes | None) -> dict[str, Any] | None:
    """Return the agent's config mapping from raw user-data, or None if there is none.

    Raises UserDataError for input that is too big, not text, a gzip bomb, broken
    YAML in a part that is ours, or an ``ec2_agent`` value that is not a mapping.
    """
    if raw is None:
        return None
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise UserDataError(f"user-data must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > MAX_RAW_BYTES:
        raise UserDataError(
            f"user-data is {len(raw)} bytes, more than EC2's limit of {MAX_RAW_BYTES} bytes"
        )
    budget = _Budget(MAX_DECOMPRESSED_BYTES)
    data = _gunzip_all(raw, "user-data", budget)
    if not data.strip():
        return None
    if _is_mime(data):
        return _combine(_parse_mime(data, "user-data", budget))
    text = _decode_text(data, "user-data")
    return _combine(_parse_document(text, "user-data"))


def looks_like_user_data(raw: bytes) -> bool:
    """True for bytes in a user-data envelope (gzip, MIME, #cloud-config), not a bare file.

    ``ec2-agent config validate FILE`` uses this to decide whether FILE is an agent
    config file (validated as is) or user-data (parsed here first).
    """
    if raw.startswith(GZIP_MAGIC):
        return True
    head = raw.lstrip(b"\xef\xbb\xbf").lstrip()[:32].lower()
    return head.startswith(b"#cloud-config") or _is_mime(raw)


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` overlaid with ``top``: mappings merge recursively, all else replaces.

    Lists replace rather than append so a higher layer can shrink a list (drop a
    template or a health check); appending would make removal impossible. Inputs
    are not modified; the result shares no mutable values with them.
    """
    out: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# --- YAML -------------------------------------------------------------------


class _StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also rejects duplicate mapping keys.

    It constructs exactly what ``yaml.safe_load`` constructs (same resolver, no
    Python object tags); the only change is that ``{a: 1, a: 2}`` is an error
    instead of a silent "last one wins", which hides typos in a config.
    """


def _construct_strict_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # "<<: *anchor" keys may be overridden by explicit ones
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable key: SafeConstructor reports it below
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
    return loader.construct_mapping(node, deep=True)


_StrictSafeLoader.add_constructor("tag:yaml.org,2002:map", _construct_strict_mapping)


def load_yaml(text: str, where: str, error: Callable[[str], Exception] = UserDataError) -> Any:
    """Load one YAML document safely; errors name ``where``, line and column (1-based).

    ``error`` builds the exception from a message, so config files get ConfigError
    (with their layer) and user-data parts get UserDataError from the same loader.
    An empty ``where`` leaves the location out of the message.
    """
    at = f"{where}: " if where else ""
    try:
        doc = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is not None:
            raise error(
                f"{at}YAML error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
            ) from exc
        raise error(f"{at}YAML error: {problem}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{at}YAML error: {exc}") from exc
    except RecursionError as exc:
        raise error(f"{at}YAML nested too deeply") from exc
    _check_node_count(doc, at, error)
    return doc


def _check_node_count(doc: Any, at: str, error: Callable[[str], Exception]) -> None:
    """Refuse documents whose aliases expand to more than MAX_YAML_NODES values."""
    count = 0
    stack = [doc]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise error(
                f"{at}YAML document expands to more than {MAX_YAML_NODES} values "
                "(too many aliases?)"
            )
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


# --- decoding ---------------------------------------------------------------


class _Budget:
    """Decompressed bytes still allowed, shared by every gzip layer and part."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def take(self, n: int, where: str) -> None:
        self.left -= n
        if self.left < 0:
            raise UserDataError(
                f"{where}: gzip data expands to more than {self.limit} bytes "
                f"(the decompressed size cap, MAX_DECOMPRESSED_BYTES); refusing it"
            )


def _gunzip_all(data: bytes, where: str, budget: _Budget) -> bytes:
    """Peel gzip layers (up to MAX_GZIP_DEPTH) off ``data``."""
    depth = 0
    while data.startswith(GZIP_MAGIC):
        depth += 1
        if depth > MAX_GZIP_DEPTH:
            raise UserDataError(
                f"{where}: more than {MAX_GZIP_DEPTH} nested gzip layers; refusing it"
            )
        data = _gunzip(data, where, budget)
    return data


def _gunzip(data: bytes, where: str, budget: _Budget) -> bytes:
    """Decompress one gzip stream, never holding more than the budget allows."""
    dec = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = bytearray()
    pending = data
    try:
        while not dec.eof:
            # Ask for at most one byte past the budget: enough to know it is exceeded.
            chunk = dec.decompress(pending, max(budget.left, 0) + 1)
            budget.take(len(chunk), where)
            out += chunk
            pending = dec.unconsumed_tail
            if not chunk and not pending:
                break
    except zlib.error as exc:
        raise UserDataError(f"{where}: corrupt gzip data: {exc}") from exc
    if not dec.eof:
        raise UserDataError(f"{where}: truncated gzip data")
    if dec.unused_data.strip(b"\x00"):
        raise UserDataError(f"{where}: unexpected bytes after the gzip stream")
    return bytes(out)


def _decode_text(data: bytes, where: str) -> str:
    """UTF-8 (an optional BOM allowed) or a clear error; NUL bytes mean binary."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserDataError(
            f"{where}: binary data (a NUL byte at offset {nul}), not text user-data"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserDataError(
            f"{where}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from exc


def _first_line(text: str) -> str:
    return text.lstrip().split("\n", 1)[0].strip()


def _is_cloud_config(text: str) -> bool:
    """``#cloud-config`` but not ``#cloud-config-archive`` / ``-jsonp``."""
    first = _first_line(text)
    return first.startswith("#cloud-config") and not first.startswith(_FOREIGN_HEADERS)


def _is_mime(data: bytes) -> bool:
    """MIME user-data starts with a header line, as make-mime writes it."""
    head = data.lstrip(b"\xef\xbb\xbf").lstrip()[:32].lower()
    return head.startswith((b"content-type:", b"mime-version:"))


def _parse_document(text: str, where: str) -> list[tuple[str, dict]]:
    """Find agent config in one decoded non-MIME document: [(kind, mapping), ...]."""
    first = _first_line(text)
    if _is_cloud_config(text):
        return _from_cloud_config(text, where)
    if first.startswith(_FOREIGN_HEADERS):
        _refuse_unsupported_with_agent(text, first, where)
        return []
    return _from_plain_yaml(text, where)


def _refuse_unsupported_with_agent(text: str, first: str, where: str) -> None:
    """Templated / archive cloud-config carrying ec2_agent would be silently lost: refuse."""
    if first.startswith(("## template: jinja", "#cloud-config-archive")) and AGENT_KEY in text:
        raise UserDataError(
            f"{where}: '{first}' user-data mentions {AGENT_KEY} but that format is not "
            "supported for agent config; use plain #cloud-config, MIME or text/x-ec2-agent"
        )


def _agent_value(doc: Any, where: str) -> dict | None:
    """The ``ec2_agent`` value of a cloud-config mapping, checked to be a mapping."""
    if not isinstance(doc, dict) or AGENT_KEY not in doc:
        return None
    value = doc[AGENT_KEY]
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserDataError(
            f"{where}: {AGENT_KEY} must be a mapping of agent settings, got {type(value).__name__}"
        )
    return value


def _from_cloud_config(text: str, where: str) -> list[tuple[str, dict]]:
    doc = load_yaml(text, where)
    if doc is not None and not isinstance(doc, dict):
        raise UserDataError(
            f"{where}: #cloud-config must be a YAML mapping, got {type(doc).__name__}"
        )
    value = _agent_value(doc, where)
    return [] if value is None else [("cloud-config", value)]


def _from_plain_yaml(text: str, where: str) -> list[tuple[str, dict]]:
    """Unlabelled text: ours only if it is YAML with top-level ``ec2_agent``.

    Text that is not YAML is someone else's user-data unless it mentions
    ``ec2_agent``, in which case the YAML error is the useful answer.
    """
    try:
        doc = load_yaml(text, where)
    except UserDataError:
        if AGENT_KEY in text:
            raise
        return []
    value = _agent_value(doc, where)
    return [] if value is None else [("plain", value)]


def _from_agent_part(text: str, where: str) -> list[tuple[str, dict]]:
    """A text/x-ec2-agent part: the agent mapping, or ``{ec2_agent: mapping}``."""
    doc = load_yaml(text, where)
    if doc is None:
        return [("x-ec2-agent", {})]
    if not isinstance(doc, dict):
        raise UserDataError(
            f"{where}: {AGENT_PART_TYPE} part must be a YAML mapping, got {type(doc).__name__}"
        )
    if AGENT_KEY in doc:
        if len(doc) > 1:
            others = ", ".join(sorted(str(k) for k in doc if k != AGENT_KEY))
            raise UserDataError(
                f"{where}: {AGENT_PART_TYPE} part has {AGENT_KEY} next to other keys "
                f"({others}); use either the agent mapping itself or only {AGENT_KEY}:"
            )
        value = _agent_value(doc, where)
        return [("x-ec2-agent", value or {})]
    return [("x-ec2-agent", doc)]


def _parse_mime(data: bytes, where: str, budget: _Budget) -> list[tuple[str, dict]]:
    """Walk every leaf part (nested multiparts included); only ours are parsed."""
    msg = email.message_from_bytes(data)
    found: list[tuple[str, dict]] = []
    index = 0
    for part in msg.walk():
        if part.is_multipart():
            continue
        index += 1
        ctype = part.get_content_type()
        name = part.get_filename()
        label = f"{where} MIME part {index} ({ctype}{', ' + name if name else ''})"
        if ctype not in (CLOUD_CONFIG_TYPE, AGENT_PART_TYPE) and ctype not in _SNIFFED_TYPES:
            continue  # cloud-init's business: scripts, include-url, boothooks, ...
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        payload = _gunzip_all(payload, label, budget)
        body = _decode_text(payload, label)
        if ctype == AGENT_PART_TYPE:
            found.extend(_from_agent_part(body, label))
        elif ctype == CLOUD_CONFIG_TYPE or _is_cloud_config(body):
            found.extend(_from_cloud_config(body, label))
    return found


def _combine(found: list[tuple[str, dict]]) -> dict[str, Any] | None:
    """Merge cloud-config/plain parts first, then x-ec2-agent parts on top."""
    if not found:
        return None
    result: dict[str, Any] = {}
    for kind_first in (False, True):
        for kind, mapping in found:
            if (kind == "x-ec2-agent") is kind_first:
                result = deep_merge(result, mapping)
    return result
