"""JSON that keeps what YAML gives and JSON loses: non-string keys, dates, sets, bytes.

``dumps``/``loads`` round-trip any value ``yaml.safe_load`` can produce: plain JSON
where the value is plain JSON (so files stay readable), else tagged objects
``{"\\u0000map": [[key, value], ...]}`` and the like. Pure; no PyYAML needed to read
back, so the daemon can use it without importing a YAML parser.
"""

from __future__ import annotations

import base64
import datetime
import json
from typing import Any

_TAG = "\u0000"


def encode(value: Any) -> Any:
    """A JSON-able form of ``value`` that ``decode`` turns back into an equal value."""
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith(_TAG) for k in value):
            return {k: encode(v) for k, v in value.items()}
        return {_TAG + "map": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN: JSON has no literal for it
        return {_TAG + "float": "nan"}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, datetime.datetime):
        return {_TAG + "datetime": value.isoformat()}
    if isinstance(value, datetime.date):
        return {_TAG + "date": value.isoformat()}
    if isinstance(value, (set, frozenset)):
        return {_TAG + "set": [encode(v) for v in value]}
    if isinstance(value, bytes):
        return {_TAG + "bytes": base64.b64encode(value).decode()}
    raise TypeError(f"cannot encode a {type(value).__name__}")


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def decode(doc: Any) -> Any:
    """Inverse of ``encode``."""
    if isinstance(doc, list):
        return [decode(v) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if len(doc) == 1:
        ((key, value),) = doc.items()
        if key == _TAG + "map":
            return {_hashable(decode(k)): decode(v) for k, v in value}
        if key == _TAG + "datetime":
            return datetime.datetime.fromisoformat(value)
        if key == _TAG + "date":
            return datetime.date.fromisoformat(value)
        if key == _TAG + "set":
            return {_hashable(decode(v)) for v in value}
        if key == _TAG + "bytes":
            return base64.b64decode(value)
        if key == _TAG + "float":
            return float(value)
    return {k: decode(v) for k, v in doc.items()}


def dumps(value: Any, **kw: Any) -> str:
    return json.dumps(encode(value), **kw)


def loads(text: str) -> Any:
    return decode(json.loads(text))
