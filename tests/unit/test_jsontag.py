"""agent.config.jsontag: whatever YAML loads survives the JSON files the boot hands to ``run``."""

from __future__ import annotations

import datetime
import json

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import jsontag

_scalar = (st.none() | st.booleans() | st.integers() | st.text(max_size=8)
           | st.floats(allow_nan=False) | st.binary(max_size=8) | st.dates()
           | st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc)))
_key = st.text(max_size=6) | st.integers() | st.booleans() | st.none() | st.dates()
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(_key, inner, max_size=3), max_leaves=10)


@settings(max_examples=200, deadline=None)
@given(_value)
def test_roundtrip(value: object) -> None:
    assert jsontag.loads(jsontag.dumps(value, sort_keys=True)) == value


def test_plain_json_stays_plain() -> None:
    doc = {"group": "web", "vars": {"a": [1, 2.5, None, True]}}
    assert json.loads(jsontag.dumps(doc)) == doc


def test_what_yaml_loads() -> None:
    doc = yaml.safe_load("ports: {80: http, admin: 8443}\nwhen: 2026-01-01\n"
                         "s: !!set {a, b}\nb: !!binary aGk=\n1.5: x\n")
    assert jsontag.loads(jsontag.dumps(doc, sort_keys=True)) == doc
