"""The S3 store adapter against a real moto_server: conditional writes coordinate."""

from __future__ import annotations

import threading

import pytest

from agent.aws.store import NotModified, Obj, Store
from agent.errors import NotFound, PreconditionFailed, StoreError


@pytest.fixture
def store(moto) -> Store:
    s = Store("fleet-bucket", "prod")
    s.ensure_bucket()
    return s


def test_create_only_is_exclusive(store: Store) -> None:
    store.create("groups/web/leases/i-1", b"a")
    with pytest.raises(PreconditionFailed):
        store.create("groups/web/leases/i-1", b"b")
    obj = store.get("groups/web/leases/i-1")
    assert isinstance(obj, Obj) and obj.body == b"a"


def test_compare_and_swap(store: Store) -> None:
    e1 = store.put("budget", b"1")
    e2 = store.put("budget", b"2", if_match=e1)
    with pytest.raises(PreconditionFailed):
        store.put("budget", b"3", if_match=e1)
    obj = store.get("budget")
    assert isinstance(obj, Obj) and obj.body == b"2" and obj.etag == e2


def test_conditional_get_not_modified(store: Store) -> None:
    etag = store.put("m.json", b"{}")
    nm = store.get("m.json", if_none_match=etag)
    assert isinstance(nm, NotModified) and nm.store_now > 0  # a 304 keeps the store clock
    store.put("m.json", b'{"v": 2}')
    obj = store.get("m.json", if_none_match=etag)
    assert isinstance(obj, Obj) and obj.body == b'{"v": 2}'


def test_missing_and_delete(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get("nope")
    assert store.get_or_none("nope") is None
    assert store.head("nope") is None
    etag = store.put("x", b"1")
    with pytest.raises(PreconditionFailed):
        store.delete("x", if_match='"0000"')
    store.delete("x", if_match=etag)
    assert not store.exists("x")


def test_list_carries_store_clock_and_paginates(store: Store) -> None:
    for i in range(1005):
        store.client.put_object(Bucket="fleet-bucket", Key=f"prod/members/{i:05d}", Body=b"")
    listing = store.list("members/")
    assert len(listing.entries) == 1005
    assert listing.pages == 2
    assert listing.entries[0].key == "members/00000"
    assert all(abs(e.last_modified - listing.store_now) < 120 for e in listing.entries)


def test_racing_creates_have_one_winner(store: Store) -> None:
    wins: list[int] = []
    losses: list[int] = []

    def attempt(i: int) -> None:
        try:
            store.create("lease", str(i).encode())
            wins.append(i)
        except PreconditionFailed:
            losses.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 9
    obj = store.get("lease")
    assert isinstance(obj, Obj) and obj.body == str(wins[0]).encode()


def test_unreachable_store_is_a_store_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s = Store("fleet-bucket", "prod")
    with pytest.raises(StoreError) as info:
        s.get("anything")
    assert not isinstance(info.value, (NotFound, PreconditionFailed))
    assert "s3://fleet-bucket/prod/anything" in str(info.value)


def test_usage_counts_requests(store: Store) -> None:
    store.put("a", b"12345")
    store.get("a")
    assert store.usage.requests["put"] == 1 and store.usage.requests["get"] == 1
    assert store.usage.bytes_out == 5 and store.usage.bytes_in == 5
