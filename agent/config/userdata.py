"""Raw EC2 user-data bytes -> the agent's config mapping (or ``None``), as cloud-init reads it.

Pure: no network, no files, no clock. The boot phase fetches the bytes (and,
only when the user-data asks for them, the launch index and instance metadata)
from IMDS and hands them here.

The rule: the agent's mapping is the ``ec2_agent`` key of the cloud-config
cloud-init 22.4 would assemble from the same bytes (its ``UserDataProcessor``,
cloud-config handler and merging), checked differentially against cloud-init
itself (tests/integration/test_userdata_referee.py). The steps, in cloud-init's
order:

1. one gzip layer off the whole user-data (if it does not decompress, the bytes
   are used as they are);
2. MIME if ``mime-version:`` occurs (any case) in the first 4 KiB, else one part;
3. each part: transfer-decoded; ``application/gzip`` & co. decompressed; types
   ``text/plain``, ``text/x-not-multipart`` and ``text/x-shellscript`` re-sniffed
   by their first line (case-insensitive: ``#cloud-config``,
   ``#cloud-config-jsonp``, ``#cloud-config-archive``, ``## template: jinja``,
   ``#!``, ``#include``...); ``#cloud-config-archive`` parts exploded into parts;
   ``Launch-Index`` (header or ``launch-index:`` key) recorded;
4. parts whose launch index is not this instance's are dropped;
5. in order: ``text/cloud-config`` parts merged (``merge_how``/``Merge-Type``, default
   ``dict(replace)+list()+str()``: top-level keys replace, see ``agent.config.ccmerge``),
   ``text/cloud-config-jsonp`` JSON patches applied, ``text/jinja2`` rendered with
   the instance's metadata (``agent.config.udtemplate``) and handled as what it renders to.

Two forms of the agent's own, which cloud-init leaves alone, come on top:
``text/x-ec2-agent`` MIME parts (the mapping itself, or ``{ec2_agent: mapping}``),
deep-merged over the cloud-config's ``ec2_agent`` in message order; and user-data
that is nothing cloud-init handles but is YAML with a top-level ``ec2_agent:``.

What is not the agent's is skipped, at most with a note (``UserData.notes``, shown
in ``status``): scripts in any encoding, binary parts, a broken cloud-config that
does not mention ``ec2_agent``, duplicate keys outside ``ec2_agent``. The agent
fails (``UserDataError``) only on its own block: a part that mentions
``ec2_agent`` and that cloud-init would drop (broken YAML, a patch that does not
apply, a template that does not render), duplicate keys inside ``ec2_agent``, or
an ``ec2_agent`` that is not a mapping; YAML errors say line and column.

Not followed: ``#include`` URLs (cloud-init fetches them; the agent does not, and
says so in a note) and ``#part-handler`` code (never run by the agent).

Limits, because user-data is input from whoever can launch an instance:
``MAX_INPUT_BYTES`` (1 MiB; EC2's own limit, ``MAX_RAW_BYTES``, is 16 KiB and
gets a note), ``MAX_DECOMPRESSED_BYTES`` in total over all
gzip data, enforced while streaming so a gzip bomb fails after allocating about
the cap, and ``MAX_YAML_NODES`` against alias ("billion laughs") expansion.
"""

from __future__ import annotations

import copy
import email
import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.nonmultipart import MIMENonMultipart
from email.mime.text import MIMEText
from typing import Any, Protocol

import yaml

from agent.errors import UserDataError

MAX_RAW_BYTES = 16384
"""EC2 refuses user-data larger than 16 KiB (before base64): more gets a note (EC2 will
refuse it at launch), not an error; cloud-init itself reads it (other clouds, files)."""

MAX_INPUT_BYTES = 1024 * 1024
"""Raw user-data bigger than this (1 MiB) is refused: no cloud delivers that much."""

MAX_DECOMPRESSED_BYTES = 1024 * 1024
"""Total bytes all gzip data may expand to (1 MiB)."""

MAX_YAML_NODES = 100_000
"""Values a loaded YAML document may expand to, counting alias re-uses each time."""

MAX_NOTES = 10

AGENT_KEY = "ec2_agent"
AGENT_PART_TYPE = "text/x-ec2-agent"
CLOUD_CONFIG_TYPE = "text/cloud-config"
JSONP_TYPE = "text/cloud-config-jsonp"
ARCHIVE_TYPE = "text/cloud-config-archive"
JINJA_TYPE = "text/jinja2"
NOT_MULTIPART_TYPE = "text/x-not-multipart"
GZIP_MAGIC = b"\x1f\x8b"

# cloud-init's first-line table (handlers.INCLUSION_TYPES_MAP), longest prefix first.
_STARTS_WITH = sorted(
    {
        "#include": "text/x-include-url",
        "#include-once": "text/x-include-once-url",
        "#!": "text/x-shellscript",
        "#cloud-config": CLOUD_CONFIG_TYPE,
        "#part-handler": "text/part-handler",
        "#cloud-boothook": "text/cloud-boothook",
        "#cloud-config-archive": ARCHIVE_TYPE,
        "#cloud-config-jsonp": JSONP_TYPE,
        "## template: jinja": JINJA_TYPE,
        "text/x-shellscript-per-boot": "text/x-shellscript-per-boot",
        "text/x-shellscript-per-instance": "text/x-shellscript-per-instance",
        "text/x-shellscript-per-once": "text/x-shellscript-per-once",
    }.items(),
    key=lambda kv: -len(kv[0]),
)
_RESNIFFED = ("text/plain", NOT_MULTIPART_TYPE, "text/x-shellscript")
_INCLUDE_TYPES = ("text/x-include-url", "text/x-include-once-url")
_GZIP_TYPES = frozenset({
    "application/gzip", "application/gzip-compressed", "application/gzipped",
    "application/x-compress", "application/x-compressed", "application/x-gunzip",
    "application/x-gzip", "application/x-gzip-compressed",
})
_CC_HANDLED = (CLOUD_CONFIG_TYPE, JSONP_TYPE)


class Metadata(Protocol):
    """What some user-data needs from IMDS; asked only when a part needs it."""

    def launch_index(self) -> int | None: ...

    def instance_data(self) -> Mapping[str, Any] | None: ...


@dataclass(frozen=True)
class StaticMetadata:
    """Metadata known up front (``config validate``, tests): None means unknown."""

    index: int | None = None
    data: Mapping[str, Any] | None = None

    def launch_index(self) -> int | None:
        return self.index

    def instance_data(self) -> Mapping[str, Any] | None:
        return self.data


NO_METADATA = StaticMetadata()


@dataclass(frozen=True)
class UserData:
    """The agent's mapping (None: no agent config) and notes on what was skipped."""

    config: dict[str, Any] | None
    notes: tuple[str, ...] = ()


def parse_user_data(raw: bytes | None, metadata: Metadata = NO_METADATA) -> dict[str, Any] | None:
    """Return the agent's config mapping from raw user-data, or None if there is none.

    Raises UserDataError only for the agent's own block (or input EC2 cannot send).
    """
    return read_user_data(raw, metadata).config


def read_user_data(raw: bytes | None, metadata: Metadata = NO_METADATA) -> UserData:
    """``parse_user_data`` plus the notes on parts skipped (for ``status``)."""
    if raw is None:
        return UserData(None)
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise UserDataError(f"user-data must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > MAX_INPUT_BYTES:
        raise UserDataError(
            f"user-data is {len(raw)} bytes, more than the {MAX_INPUT_BYTES} bytes the agent "
            f"reads (EC2's own limit is {MAX_RAW_BYTES})")
    reader = _Reader(metadata)
    if len(raw) > MAX_RAW_BYTES:
        reader.note(f"user-data is {len(raw)} bytes, more than EC2's limit of {MAX_RAW_BYTES}: "
                    "EC2 refuses it at launch (gzip it)")
    return reader.read(raw)


def looks_like_user_data(raw: bytes) -> bool:
    """True for bytes that are user-data rather than a bare agent config file.

    ``ec2-agent config validate FILE`` uses this: gzip, MIME (``mime-version:`` in
    the first 4 KiB, as cloud-init looks), any first line cloud-init sniffs
    (``#cloud-config``, ``## template: jinja``, ``#!``...), or YAML whose top level
    has ``ec2_agent``. Such a FILE is read exactly as the boot reads user-data.
    """
    if raw.startswith(GZIP_MAGIC) or b"mime-version:" in raw[:4096].lower():
        return True
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return False
    if _sniff(text) is not None:
        return True
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return isinstance(doc, dict) and AGENT_KEY in doc


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` overlaid with ``top``: mappings merge recursively, all else replaces.

    The rule of the config layers (and of ``text/x-ec2-agent`` parts over the
    cloud-config). Lists replace rather than append so a higher layer can shrink a
    list. Inputs are not modified; the result shares no mutable values with them.
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


class _Unreadable(ValueError):
    """cloud-init's own processing fails on this user-data: it takes no cloud-config."""


class _BadGzip(ValueError):
    """Not a whole gzip stream: cloud-init then uses the bytes as they are (or skips)."""


def _gunzip(data: bytes, where: str, budget: _Budget) -> bytes:
    """Decompress one gzip stream, never holding more than the budget allows."""
    out = bytearray()
    rest = data
    while True:  # members, as Python's gzip module (cloud-init's) reads them
        dec = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        pending = rest
        try:
            while not dec.eof:
                # At most one byte past the budget: enough to know it is exceeded.
                chunk = dec.decompress(pending, max(budget.left, 0) + 1)
                budget.take(len(chunk), where)
                out += chunk
                pending = dec.unconsumed_tail
                if not chunk and not pending:
                    break
        except zlib.error as exc:
            raise _BadGzip(f"corrupt gzip data: {exc}") from exc
        if not dec.eof:
            raise _BadGzip("truncated gzip data")
        rest = dec.unused_data.lstrip(b"\x00")
        if not rest:
            return bytes(out)
        if not rest.startswith(GZIP_MAGIC):
            raise _BadGzip("unexpected bytes after the gzip stream")


def _sniff(payload: str | bytes) -> str | None:
    """cloud-init's type_from_starts_with: the content type of a first line, or None."""
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None
    low = payload.lower().lstrip()
    for prefix, ctype in _STARTS_WITH:
        if low.startswith(prefix):
            return ctype
    return None


def _payload(part: Message) -> str | bytes | None:
    """A part's body as cloud-init sees it: text parts as str (charset, surrogateescape)."""
    body = part.get_payload(decode=True)
    if part.get_content_maintype() == "text" and isinstance(body, bytes):
        charset = part.get_charset()
        encoding = charset.input_codec if charset and charset.input_codec else "utf-8"
        return body.decode(encoding, "surrogateescape")
    return body


def _as_text(payload: str | bytes | None) -> str | None:
    if isinstance(payload, bytes):
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return payload


def _mentions_agent(payload: str | bytes | None) -> bool:
    if isinstance(payload, bytes):
        return AGENT_KEY.encode() in payload
    return bool(payload) and AGENT_KEY in payload


def _set_header(msg: Message, key: str, value: str) -> None:
    del msg[key]
    msg[key] = value


def _set_filename(msg: Message, name: str) -> None:
    del msg["Content-Disposition"]
    msg.add_header("Content-Disposition", "attachment", filename=str(name))


def _permissive_yaml(text: str) -> Any:
    """YAML as cloud-init loads a part: safe, last duplicate key wins. Raises YAMLError."""
    return yaml.load(text, Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader


def _yaml_error(exc: yaml.YAMLError, where: str, text: str = "") -> UserDataError:
    if isinstance(exc, yaml.reader.ReaderError) and text:
        pos = exc.position
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        what = (f"byte 0x{code - 0xDC00:02x} is not UTF-8 as cloud-init reads it (write "
                "UTF-8; in MIME, non-ASCII text needs base64, cloud-init mangles 8bit parts)"
                if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X} is not allowed")
        return UserDataError(f"{where}: YAML error at line {line}, column {col}: {what}")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    if mark is not None:
        return UserDataError(
            f"{where}: YAML error at line {mark.line + 1}, column {mark.column + 1}: {problem}")
    return UserDataError(f"{where}: YAML error: {problem}")


# --- the reader -------------------------------------------------------------


@dataclass
class _Reader:
    metadata: Metadata
    budget: _Budget = field(default_factory=lambda: _Budget(MAX_DECOMPRESSED_BYTES))
    notes: list[str] = field(default_factory=list)
    parts: list[Message] = field(default_factory=list)
    unhandled: bool = False  # one non-MIME part that no cloud-init handler takes

    def note(self, text: str) -> None:
        if len(self.notes) < MAX_NOTES:
            self.notes.append(text)
        elif len(self.notes) == MAX_NOTES:
            self.notes.append("(more notes left out)")

    def read(self, raw: bytes) -> UserData:
        data = raw
        if raw.startswith(GZIP_MAGIC):
            try:
                data = _gunzip(raw, "user-data", self.budget)
            except _BadGzip as exc:
                self.note(f"user-data: {exc}; read as it is, as cloud-init does")
        if b"mime-version:" in data[:4096].lower():
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                return self._unreadable(data, f"MIME that is not UTF-8 ({exc})")
            root: Message = email.message_from_string(text)
        else:
            root = MIMEBase("text", "x-not-multipart")
            root.set_payload(data)
            self.unhandled = _sniff(_payload(root)) is None
        try:
            self._process(root)
        except _Unreadable as exc:
            return self._unreadable(data, str(exc))
        config = self._assemble(self._wanted_parts())
        if config is None and self.unhandled:
            config = self._plain_yaml(data)
        return UserData(config, tuple(self.notes))

    def _unreadable(self, data: bytes, why: str) -> UserData:
        """cloud-init's processing fails as a whole: no cloud-config at all."""
        if AGENT_KEY.encode() in data:
            raise UserDataError(f"user-data mentions {AGENT_KEY} but cloud-init cannot read it: "
                                f"{why}")
        self.note(f"user-data: cloud-init cannot read it ({why}); no agent config")
        return UserData(None, tuple(self.notes))

    # -- cloud-init's UserDataProcessor ------------------------------------------

    def _process(self, base: Message) -> None:
        for part in base.walk():
            if (part.get_content_maintype() or "").lower() == "multipart":
                continue
            ctype_orig: str | None = part.get_content_type()
            payload = _payload(part)
            compressed = False
            where = self._label(part, len(self.parts) + 1)
            if ctype_orig in _GZIP_TYPES:
                try:
                    if not isinstance(payload, bytes):
                        raise _BadGzip("not gzip data")
                    payload = _gunzip(payload, where, self.budget).decode("utf-8")
                except (_BadGzip, UnicodeDecodeError) as exc:
                    # cloud-init (ERROR_ON_USER_DATA_FAILURE) then drops all user-data
                    raise _Unreadable(f"{where} does not decompress to UTF-8 text "
                                      f"({exc})") from exc
                ctype_orig, compressed = None, True
            ctype_orig = ctype_orig or "text/plain"
            ctype = _sniff(payload) if ctype_orig in _RESNIFFED else None
            ctype = ctype or ctype_orig
            if compressed:
                main, sub = ctype.split("/", 1)
                fresh = MIMENonMultipart(main, sub)
                fresh.set_payload(payload)
                if part.get_filename():
                    _set_filename(fresh, part.get_filename())
                if "Launch-Index" in part:
                    _set_header(fresh, "Launch-Index", str(part["Launch-Index"]))
                part = fresh
            if ctype != ctype_orig:
                _set_header(part, "Content-Type", ctype)
            if ctype in _INCLUDE_TYPES:
                self.note(f"{where}: #include URLs are not followed by the agent "
                          "(cloud-init fetches them): put ec2_agent in the user-data itself")
                continue
            if ctype == ARCHIVE_TYPE:
                self._explode(payload, where)
                continue
            self._attach(part)

    def _explode(self, payload: str | bytes | None, where: str) -> None:
        text = _as_text(payload)
        try:
            entries = _permissive_yaml(text) if text is not None else None
        except yaml.YAMLError as exc:
            if _mentions_agent(payload):
                raise _yaml_error(exc, where) from exc
            self.note(f"{where}: #cloud-config-archive is not valid YAML; skipped")
            return
        if entries is None:
            return
        if not isinstance(entries, (list, set)):
            if _mentions_agent(payload):
                raise UserDataError(f"{where}: #cloud-config-archive must be a YAML list, "
                                    f"got {type(entries).__name__}")
            self.note(f"{where}: #cloud-config-archive is not a list; skipped")
            return
        for entry in entries:
            if isinstance(entry, str):
                entry = {"content": entry}
            if not isinstance(entry, dict):
                continue
            try:
                msg = self._archive_part(entry)
            except (ValueError, TypeError, AttributeError, LookupError) as exc:
                raise _Unreadable(f"{where}: archive entry {str(entry)[:40]!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
            self._attach(msg)

    @staticmethod
    def _archive_part(entry: dict[Any, Any]) -> Message:
        content = entry.get("content", "")
        mtype = entry.get("type")
        if not mtype:
            default = "application/octet-stream" if isinstance(content, bytes) \
                else CLOUD_CONFIG_TYPE
            mtype = _sniff(content) or default
        main, sub = mtype.split("/", 1)
        msg: Message
        if main == "text":
            if isinstance(content, bytes):
                content = content.decode()
            msg = MIMEText(content, _subtype=sub)
        else:
            msg = MIMEBase(main, sub)
            msg.set_payload(content)
        if "filename" in entry:
            _set_filename(msg, entry["filename"])
        if "launch-index" in entry:
            msg.add_header("Launch-Index", str(entry["launch-index"]))
        skip = ("content", "filename", "type", "launch-index", "content-disposition",
                "number-attachments", "content-type")
        for key in list(entry):
            if str(key).lower() not in skip:
                msg.add_header(key, entry[key])
        return msg

    def _attach(self, part: Message) -> None:
        index = part.get("Launch-Index", None)
        from_payload = None
        if part.get_content_type() == CLOUD_CONFIG_TYPE:
            body = part.get_payload(decode=True)
            try:
                doc = _permissive_yaml(body.decode("utf-8")) if isinstance(body, bytes) \
                    else None
            except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
                doc = None
            if isinstance(doc, dict):
                from_payload = doc.get("launch-index")
        chosen = index if index is not None else from_payload
        if chosen is not None:
            try:
                part.add_header("Launch-Index", str(int(chosen)))
            except (ValueError, TypeError):
                pass
        self.parts.append(part)

    def _wanted_parts(self) -> list[Message]:
        """Drop parts for other launch indexes (asks IMDS only when a part has one)."""
        if not any(p.get("Launch-Index") is not None for p in self.parts):
            return self.parts
        wanted = self.metadata.launch_index()
        if wanted is None:
            return self.parts
        kept = []
        for part in self.parts:
            index = part.get("Launch-Index")
            if index is None:
                kept.append(part)
                continue
            try:
                number: int | None = int(index)
            except (ValueError, TypeError):
                number = None
            if number == wanted:
                kept.append(part)
        return kept

    # -- cloud-init's handlers ---------------------------------------------------

    def _assemble(self, parts: list[Message]) -> dict[str, Any] | None:
        buf: dict[str, Any] = {}
        merged_any = False
        agent_parts: list[dict[str, Any]] = []
        for n, part in enumerate(parts, 1):
            ctype = part.get_content_type()
            where = self._label(part, n)
            payload = _payload(part)
            if ctype == AGENT_PART_TYPE:
                agent_parts.append(self._agent_part(part.get_payload(decode=True), where))
                continue
            if ctype == JINJA_TYPE:
                rendered = self._render(payload, where)
                if rendered is None:
                    continue
                if _sniff(rendered) not in _CC_HANDLED:
                    continue  # a script or boothook after rendering: cloud-init's
                payload, ctype = rendered, JINJA_TYPE
            elif ctype not in _CC_HANDLED:
                if ctype == "text/part-handler":
                    self.note(f"{where}: part-handler code is not run by the agent")
                continue
            headers = dict(part.items())
            result = self._merge_one(buf if merged_any else {}, ctype, payload, headers, where)
            if result is not None:
                buf, merged_any = result, True
        config = self._agent_value(buf, "user-data cloud-config") if merged_any else None
        for mapping in agent_parts:
            config = deep_merge(config or {}, mapping)
        return config

    def _merge_one(self, buf: dict[str, Any], ctype: str, payload: str | bytes | None,
                   headers: dict[str, str], where: str) -> dict[str, Any] | None:
        """One cloud-config or jsonp part merged into ``buf``; None when cloud-init skips it."""
        from agent.config import ccmerge

        mine = _mentions_agent(payload)
        if ctype == JSONP_TYPE:
            return self._patch(buf, payload, where, mine)
        text = _as_text(payload)
        if text is None:
            return self._skipped(where, mine, "is not UTF-8 text")
        try:
            doc = _permissive_yaml(text)
        except yaml.YAMLError as exc:
            if mine:
                raise _yaml_error(exc, where, text) from exc
            return self._skipped(where, mine, "is not valid YAML")
        except RecursionError:
            return self._skipped(where, mine, "is nested too deeply")
        if not isinstance(doc, dict):
            if doc is None:
                return None
            return self._skipped(where, mine, f"is a YAML {type(doc).__name__}, not a mapping")
        try:
            _check_node_count(doc, "", UserDataError)  # before merging walks it
        except UserDataError:
            return self._skipped(where, mine, f"expands to more than {MAX_YAML_NODES} values "
                                              "(YAML aliases); refused")
        if mine:
            _check_agent_block(text, where)
            self._agent_value(doc, where)  # a block that is not a mapping: error here
        try:
            rules = ccmerge.rules_for(doc, headers.get("Merge-Type") or
                                      headers.get("X-Merge-Type"))
            merged = ccmerge.merge(buf, doc, rules)
        except (ccmerge.MergeRuleError, TypeError, ValueError, AttributeError, LookupError,
                RecursionError) as exc:  # cloud-init skips the part on any of these
            return self._skipped(where, mine, f"cannot be merged ({type(exc).__name__}: {exc})")
        if not isinstance(merged, dict):
            return self._skipped(where, mine, "did not merge into a mapping")
        return merged

    def _patch(self, buf: dict[str, Any], payload: str | bytes | None, where: str,
               mine: bool) -> dict[str, Any] | None:
        import jsonpatch

        text = _as_text(payload)
        if text is None:
            return self._skipped(where, mine, "is not UTF-8 text")
        text = text.lstrip()
        if text.startswith("#cloud-config-jsonp"):
            text = text[len("#cloud-config-jsonp"):]
        try:
            patch = jsonpatch.JsonPatch.from_string(text)
            out = patch.apply(buf, in_place=False)
        except json.JSONDecodeError as exc:
            if mine:
                raise UserDataError(f"{where}: JSON error at line {exc.lineno}, column "
                                    f"{exc.colno} (after the header): {exc.msg}") from exc
            return self._skipped(where, mine, "is not valid JSON")
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, TypeError,
                ValueError, KeyError, IndexError, AttributeError, RecursionError) as exc:
            return self._skipped(where, mine, f"patch does not apply ({exc})")
        if not isinstance(out, dict):
            return self._skipped(where, mine, "patch does not leave a mapping")
        return out

    def _render(self, payload: str | bytes | None, where: str) -> str | None:
        from agent.config import udtemplate

        text = _as_text(payload)
        mine = _mentions_agent(payload)
        if text is None:
            self._skipped(where, mine, "is not UTF-8 text")
            return None
        if udtemplate.template_kind(text) != "jinja":
            self._skipped(where, mine, "is not a jinja template")
            return None
        data = self.metadata.instance_data()
        if data is None:  # cloud-init without instance-data.json cannot render it either
            self._skipped(where, mine, "is a jinja template and no instance metadata was given")
            return None
        try:
            rendered = udtemplate.render(text, data)
        except udtemplate.TemplateError as exc:
            at = f" (template line {exc.line})" if exc.line else ""
            self._skipped(where, mine, f"{exc}{at}")
            return None
        return rendered or None

    def _skipped(self, where: str, mine: bool, why: str) -> None:
        """cloud-init drops this part: an error if it carries the agent's block, else a note."""
        if mine:
            raise UserDataError(f"{where} mentions {AGENT_KEY} but {why}, so cloud-init "
                                f"would drop it")
        self.note(f"{where}: {why}; skipped, as cloud-init does")
        return None

    def _agent_part(self, payload: Any, where: str) -> dict[str, Any]:
        """A text/x-ec2-agent part (maybe gzipped): the mapping, or ``{ec2_agent: mapping}``."""
        if isinstance(payload, bytes) and payload.startswith(GZIP_MAGIC):
            try:
                payload = _gunzip(payload, where, self.budget)
            except _BadGzip as exc:
                raise UserDataError(f"{where}: {exc}") from exc
        try:
            text = payload.decode("utf-8-sig") if isinstance(payload, bytes) else str(payload)
        except UnicodeDecodeError as exc:
            raise UserDataError(f"{where}: {AGENT_PART_TYPE} part is not valid UTF-8 "
                                f"(byte 0x{payload[exc.start]:02x} at offset {exc.start}; "
                                "non-ASCII text in MIME needs base64, 8bit parts are "
                                "mangled by the MIME reader)") from exc
        doc = load_yaml(text, where)
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            raise UserDataError(
                f"{where}: {AGENT_PART_TYPE} part must be a YAML mapping, "
                f"got {type(doc).__name__}")
        if AGENT_KEY in doc:
            if len(doc) > 1:
                others = ", ".join(sorted(str(k) for k in doc if k != AGENT_KEY))
                raise UserDataError(
                    f"{where}: {AGENT_PART_TYPE} part has {AGENT_KEY} next to other keys "
                    f"({others}); use either the agent mapping itself or only {AGENT_KEY}:")
            return self._agent_value(doc, where) or {}
        return doc

    @staticmethod
    def _agent_value(doc: Any, where: str) -> dict[str, Any] | None:
        if not isinstance(doc, dict) or AGENT_KEY not in doc:
            return None
        value = doc[AGENT_KEY]
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserDataError(f"{where}: {AGENT_KEY} must be a mapping of agent settings, "
                                f"got {type(value).__name__}")
        _check_node_count(value, f"{where}: ", UserDataError)
        return copy.deepcopy(value)

    def _plain_yaml(self, data: bytes) -> dict[str, Any] | None:
        """Not MIME, nothing cloud-init handles: YAML with top-level ec2_agent is ours."""
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return None
        if AGENT_KEY not in text:
            return None
        try:
            doc = _permissive_yaml(text)
        except yaml.YAMLError as exc:
            if not text.lstrip().startswith(AGENT_KEY):
                return None
            raise _yaml_error(exc, "user-data") from exc
        except RecursionError:
            return None
        if not isinstance(doc, dict) or AGENT_KEY not in doc:
            return None
        _check_agent_block(text, "user-data")
        return self._agent_value(doc, "user-data")

    @staticmethod
    def _label(part: Message, n: int) -> str:
        name = part.get_filename()
        return f"user-data part {n} ({part.get_content_type()}{', ' + name if name else ''})"


def _check_agent_block(text: str, where: str) -> None:
    """Duplicate keys inside ``ec2_agent`` (or two ``ec2_agent`` keys): error with line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # noqa: S506 - SafeLoader
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, where) from exc
    if not isinstance(root, yaml.MappingNode):
        return
    seen = None
    for key_node, value_node in root.value:
        if not (isinstance(key_node, yaml.ScalarNode) and key_node.value == AGENT_KEY
                and key_node.tag == "tag:yaml.org,2002:str"):
            continue
        if seen is not None:
            mark = key_node.start_mark
            raise UserDataError(f"{where}: YAML error at line {mark.line + 1}, column "
                                f"{mark.column + 1}: found a second {AGENT_KEY} key "
                                f"(the first is at line {seen.line + 1})")
        seen = key_node.start_mark
        loader = _StrictSafeLoader("")
        try:
            loader.construct_document(value_node)
        except yaml.MarkedYAMLError as exc:
            raise _yaml_error(exc, where) from exc
        finally:
            loader.dispose()
