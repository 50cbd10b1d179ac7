"""The store adapter's failures keep no frame alive (no reference cycle through a traceback).

A client that answers HEAD with S3's own 503 SlowDown (botocore's ``ClientError``, as the
in-memory twin and S3 raise it): the store's error must not hold its own traceback, which
runs through every caller's frame; else the callers' locals (a heal step's listings) live
on until the cyclic collector gets round to them.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
from botocore.exceptions import ClientError

from agent.aws.store import Store
from agent.errors import StoreError


class _SlowDown:
    def head_object(self, **_: Any) -> dict[str, Any]:
        raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your rate"},
                           "ResponseMetadata": {"HTTPStatusCode": 503}}, "HeadObject")


class _Listing:
    pass


def _caller(store: Store) -> weakref.ref[_Listing]:
    listing = _Listing()  # a local of the caller's frame
    ref = weakref.ref(listing)
    try:
        store.head("groups/web/members/i-1")
    except StoreError:
        pass
    else:
        pytest.fail("a 503 must be a StoreError")
    return ref


def test_a_failed_head_keeps_no_caller_alive() -> None:
    store = Store("fleet-bucket", "prod", client=_SlowDown())
    gc.collect()
    gc.disable()
    try:
        ref = _caller(store)
        assert ref() is None, "the caller's frame outlived the call: a cycle holds it"
    finally:
        gc.enable()
