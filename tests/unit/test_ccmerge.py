"""agent.config.ccmerge: cloud-init's merge rules (the referee comparison is in
tests/integration/test_userdata_referee.py; these pin cases found there)."""

from __future__ import annotations

import pytest

from agent.config import ccmerge
from agent.config.userdata import read_user_data
from agent.errors import UserDataError


def _merge(old: dict, new: dict, header: str | None = None) -> object:
    new = dict(new)
    return ccmerge.merge(old, new, ccmerge.rules_for(new, header))


def test_default_replaces_top_level_keys() -> None:
    assert _merge({"a": {"x": 1}, "b": 1}, {"a": {"y": 2}}) == {"a": {"y": 2}, "b": 1}


def test_merge_how_is_popped_and_used() -> None:
    new = {"merge_how": "dict(recurse_array,no_replace)+list(append)", "a": {"l": [2], "k": 9}}
    assert _merge({"a": {"l": [1], "k": 1}}, new) == {"a": {"l": [1, 2], "k": 1}}


def test_header_rules_come_after_the_parts_own() -> None:
    assert _merge({"l": [1]}, {"l": [2]}, "dict(no_replace,recurse_list)+list(prepend)") == {
        "l": [2, 1]}


@pytest.mark.parametrize("rule", ["bogus(x)", "dict", "list(append"])
def test_bad_rules_are_refused(rule: str) -> None:
    with pytest.raises(ccmerge.MergeRuleError):
        ccmerge.parse_rules(rule)


def test_no_dict_rule_keeps_what_was_there() -> None:
    assert _merge({"a": 1}, {"a": 2, "merge_how": "list(append)"}) == {"a": 1}


def test_list_no_replace_against_a_mapping_drops_the_part() -> None:
    """Found by `make soak`: KeyError escaped as a crash; cloud-init skips the part."""
    raw = (b'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="B"\n\n'
           b"--B\nContent-Type: text/cloud-config\n\n#cloud-config\nruncmd: [1, 2]\n"
           b"ec2_agent: {group: web}\n"
           b"--B\nContent-Type: text/cloud-config\n\n#cloud-config\n"
           b"merge_how: dict(no_replace,recurse_list)+list(no_replace)\nruncmd: {a: 1}\n--B--\n")
    got = read_user_data(raw)
    assert got.config == {"group": "web"}
    assert any("cannot be merged (KeyError" in n for n in got.notes), got.notes
    with pytest.raises(UserDataError, match="cannot be merged"):
        read_user_data(raw.replace(b"runcmd: {a: 1}", b"runcmd: {a: 1}\nec2_agent: {}"))
