"""cloud-init's merge rules for cloud-config parts (``Merge-Type`` / ``merge_how``).

Pure. Written from cloud-init's documented behaviour ("Merging user-data
sections") and checked differentially against cloud-init 22.4 itself
(tests/integration/test_userdata_referee.py):

- a part's rules come from its ``merge_how`` (or, if absent, ``merge_type``) key,
  which is removed from the part, followed by its ``Merge-Type`` (or
  ``X-Merge-Type``) header; with neither, ``dict(replace)+list()+str()``:
  a later part's top-level keys replace earlier ones;
- a rule string is ``name(opt,opt)+name(...)``: ``dict`` (``replace`` or the
  default ``no_replace``; ``recurse_list``/``recurse_array``, ``recurse_str``,
  ``allow_delete``; dicts always recurse), ``list`` (``replace`` by default,
  ``append``, ``prepend``, ``no_replace``; ``recurse_*``), ``str`` (``append``);
- which rule applies is chosen by the type of the value already there; a type no
  rule handles keeps the value already there.

A malformed rule is ``MergeRuleError``: cloud-init then skips the whole part.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_RULES = "dict(replace)+list()+str()"
_RULE = re.compile(r"(^[a-zA-Z_][A-Za-z0-9_]*)\((.*?)\)$")
_KNOWN = ("dict", "list", "str")


class MergeRuleError(ValueError):
    """A merge rule cloud-init cannot use: the part it came with is skipped."""


@dataclass(frozen=True)
class Rule:
    name: str  # dict | list | str
    opts: Sequence[Any]  # option names; membership is all that is asked of it


def parse_rules(text: str) -> list[Rule]:
    """``"dict(recurse_array,no_replace)+list(append)"`` -> rules, in order."""
    rules: list[Rule] = []
    for item in text.split("+"):
        item = item.lower().strip().replace("-", "_")
        if not item:
            continue
        m = _RULE.match(item)
        if not m:
            raise MergeRuleError(f"merge rule {item!r} is not name(options)")
        opts = tuple(o.strip().lower() for o in m.group(2).strip().split(",") if o.strip())
        rules.append(_checked(m.group(1), opts))
    return rules


def _checked(name: str, opts: Sequence[Any]) -> Rule:
    if name.startswith("m_"):
        name = name[2:]
    if name not in _KNOWN:
        raise MergeRuleError(f"unknown merger {name!r} (known: dict, list, str)")
    return Rule(name, opts)


def rules_from_doc(doc: dict[str, Any]) -> list[Rule]:
    """Pop ``merge_how`` (else ``merge_type``) from a part and parse it."""
    raw = doc.pop("merge_how", None)
    if raw is None:
        raw = doc.pop("merge_type", None)
    if raw is None:
        return []
    if isinstance(raw, str):
        return parse_rules(raw)
    rules: list[Rule] = []
    try:
        for item in raw:
            if isinstance(item, dict):
                name = item["name"].replace("-", "_").strip()
                opts = item["settings"]
            else:
                name = item[0]
                opts = item[1:] if len(item) >= 2 else []
            if name:
                rules.append(_checked(str(name), opts))
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise MergeRuleError(f"malformed merge_how: {exc!r}") from exc
    return rules


def rules_for(doc: dict[str, Any], header: str | None) -> list[Rule]:
    """The rules one part merges with: its own key, then its header, else the default."""
    rules = rules_from_doc(doc) + parse_rules(header or "")
    return rules or parse_rules(DEFAULT_RULES)


def _type_name(value: Any) -> str:
    return type(value).__name__.lower()


class _Merger:
    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def merge(self, old: Any, new: Any) -> Any:
        kind = _type_name(old)
        for rule in self.rules:
            if rule.name == "dict" and kind == "dict":
                return self._dict(rule.opts, old, new)
            if rule.name == "list" and kind in ("list", "tuple"):
                merged = self._list(rule.opts, list(old), new)
                return tuple(merged) if kind == "tuple" else merged
            if rule.name == "str" and kind == "str":
                return old + new if "append" in rule.opts else new  # TypeError: part skipped
        return old

    def _dict(self, opts: Sequence[Any], old: dict, new: Any) -> dict:
        if not isinstance(new, dict):
            return old
        replace = "replace" in opts
        recurse_list = "recurse_array" in opts or "recurse_list" in opts
        recurse_str = "recurse_str" in opts
        allow_delete = "allow_delete" in opts
        out = dict(old)
        for key, value in new.items():
            if key not in out:
                out[key] = value
            elif value is None and allow_delete:
                out.pop(key)
            elif replace:
                out[key] = value
            elif (isinstance(value, (list, tuple)) and recurse_list) or (
                isinstance(value, str) and recurse_str
            ) or isinstance(value, dict):
                out[key] = self.merge(out[key], value)
        return out

    def _list(self, opts: Sequence[Any], old: list, new: Any) -> Any:
        method = next((m for m in ("append", "prepend", "replace", "no_replace") if m in opts),
                      "replace")
        if method == "replace" and not isinstance(new, (list, tuple)):
            return new
        if method == "prepend":
            return [*new, *old]
        if method == "append":
            return [*old, *new]
        out = list(old)
        for i in range(min(len(out), len(new))):
            item = new[i]
            if method == "no_replace":
                continue
            if (isinstance(item, (list, tuple)) and ("recurse_array" in opts
                                                     or "recurse_list" in opts)) or (
                isinstance(item, str) and "recurse_str" in opts
            ) or (isinstance(item, dict) and "recurse_dict" in opts):
                out[i] = self.merge(out[i], item)
            else:
                out[i] = item
        return out


def merge(old: Mapping[str, Any], new: dict[str, Any], rules: list[Rule]) -> Any:
    """Merge one part (``new``, its merge keys already popped) into what came before."""
    return _Merger(rules).merge(dict(old), new)
