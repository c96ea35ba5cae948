"""The store with a fake clock: every limit, merge rules, expiry, GC, pins."""

from __future__ import annotations

import pytest

from uspan.discovery import protocol as p
from uspan.discovery.store import (
    MAX_AFFILIATES,
    MAX_DATA,
    MAX_ENDPOINTS,
    MAX_ID,
    MAX_TTL,
    Changed,
    LimitError,
    Removed,
    Store,
    Unpinned,
)

KEY = b"k" * 32
T0 = 1_000_000.0


def update(store: Store, aid: str = "a", data: bytes | None = b"d",
           endpoints: tuple[bytes, ...] = (), ttl: int = 60, now: float = T0,
           cluster: str = "c") -> list[object]:  # fmt: skip
    return list(store.update(cluster, KEY, aid, data, endpoints, ttl, now))


def refused(code: str, call: object) -> None:
    with pytest.raises(LimitError) as caught:
        call()  # type: ignore[operator]
    assert caught.value.code == code


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"cluster": ""}, p.E_LIMIT_CLUSTER_ID),
        ({"cluster": "c" * (MAX_ID + 1)}, p.E_LIMIT_CLUSTER_ID),
        ({"cluster": "é" * (MAX_ID // 2 + 1)}, p.E_LIMIT_CLUSTER_ID),  # bytes, not characters
        ({"aid": ""}, p.E_LIMIT_AFFILIATE_ID),
        ({"aid": "a" * (MAX_ID + 1)}, p.E_LIMIT_AFFILIATE_ID),
        ({"data": bytes(MAX_DATA + 1)}, p.E_LIMIT_DATA),
        ({"endpoints": (bytes(33),)}, p.E_LIMIT_ENDPOINT),
        ({"endpoints": (b"",)}, p.E_LIMIT_ENDPOINT),
        ({"endpoints": tuple(bytes([i]) for i in range(MAX_ENDPOINTS + 1))}, p.E_LIMIT_ENDPOINTS),
        ({"ttl": 0}, p.E_LIMIT_TTL),
        ({"ttl": MAX_TTL + 1}, p.E_LIMIT_TTL),
    ],
)
def test_each_limit_refused_counted_and_nothing_changes(
    kwargs: dict[str, object], code: str
) -> None:
    store = Store()
    update(store, aid="keep")
    before = store.dump()
    refused(code, lambda: update(store, **kwargs))  # type: ignore[arg-type]
    assert store.refusals[code] == 1
    if code != p.E_LIMIT_CLUSTER_ID:
        assert store.dump() == before


def test_limits_at_the_edge_are_accepted() -> None:
    store = Store()
    update(store, cluster="c" * MAX_ID, aid="a" * MAX_ID, data=bytes(MAX_DATA),
           endpoints=tuple(bytes([i]) * 32 for i in range(MAX_ENDPOINTS)), ttl=MAX_TTL)  # fmt: skip
    assert len(store.records("c" * MAX_ID)[0]["endpoints"]) == MAX_ENDPOINTS


def test_affiliates_per_cluster() -> None:
    store = Store()
    for i in range(MAX_AFFILIATES):
        update(store, aid=f"n{i}")
    refused(p.E_LIMIT_AFFILIATES, lambda: update(store, aid="one-more"))
    update(store, aid="n0", data=b"new")  # existing ones still update
    update(store, aid="x", cluster="other")  # other clusters are not affected


def test_endpoints_merge_up_to_the_limit() -> None:
    store = Store()
    update(store, endpoints=tuple(bytes([i]) for i in range(MAX_ENDPOINTS)))
    update(store, endpoints=(bytes([0]),))  # already there: fine
    refused(p.E_LIMIT_ENDPOINTS, lambda: update(store, endpoints=(b"new",)))
    # once some expire there is room again
    update(store, endpoints=(bytes([1]),), ttl=600, now=T0 + 30)
    store.gc(T0 + 61)
    update(store, endpoints=(b"new",), now=T0 + 61)
    assert sorted(store.records("c")[0]["endpoints"]) == [bytes([1]), b"new"]


def test_data_replaced_only_when_present_endpoints_merge() -> None:
    store = Store()
    update(store, data=b"one", endpoints=(b"e1",))
    update(store, data=None, endpoints=(b"e2",))
    assert store.records("c") == [{"id": "a", "data": b"one", "endpoints": [b"e1", b"e2"]}]
    update(store, data=b"two", endpoints=())
    assert store.records("c")[0]["data"] == b"two"


def test_endpoint_only_update_creates_an_affiliate_without_data() -> None:
    store = Store()
    events = update(store, data=None, endpoints=(b"e",))
    assert events == [Changed("c", {"id": "a", "data": None, "endpoints": [b"e"]})]


def test_ttl_expiry_with_fake_clock() -> None:
    store = Store()
    update(store, endpoints=(b"old",), ttl=60)
    update(store, data=None, endpoints=(b"new",), ttl=120, now=T0 + 30)
    assert store.gc(T0 + 59) == []
    # "old" expired at T0+60; the affiliate (refreshed at T0+30) lives to T0+150
    assert store.gc(T0 + 60) == [Changed("c", {"id": "a", "data": b"d", "endpoints": [b"new"]})]
    assert store.gc(T0 + 149.9) == []
    assert store.gc(T0 + 150) == [Removed("c", "a")]
    assert store.records("c") == []


def test_last_update_sets_the_expiry() -> None:
    store = Store()
    update(store, ttl=MAX_TTL)
    update(store, ttl=10, now=T0 + 1)
    assert store.gc(T0 + 11) == [Removed("c", "a")]


def test_pin_lapses_after_max_ttl_without_affiliates() -> None:
    store = Store()
    update(store, ttl=60)
    store.gc(T0 + 60)
    assert "c" in store.clusters  # still pinned: members keep the cluster for MAX_TTL
    refused(p.E_PROOF_MISMATCH, lambda: store.authorize("c", b"x" * 32, T0 + 100))
    assert store.gc(T0 + 60 + MAX_TTL - 1) == []
    assert store.gc(T0 + 60 + MAX_TTL) == [Unpinned("c")]
    store.authorize("c", b"x" * 32, T0 + 60 + MAX_TTL)  # a new first use may pin it


def test_a_read_pins_for_max_ttl() -> None:
    store = Store()
    store.authorize("c", KEY, T0)
    assert store.gc(T0 + MAX_TTL) == [Unpinned("c")]


def test_delete() -> None:
    store = Store()
    update(store)
    assert store.delete("c", "a") == [Removed("c", "a")]
    assert store.delete("c", "a") == []
    assert store.delete("nope", "a") == []


def test_cluster_count_limit() -> None:
    store = Store(max_clusters=2)
    update(store, cluster="a")
    update(store, cluster="b")
    refused(p.E_LIMIT_CLUSTERS, lambda: update(store, cluster="c"))


def test_dump_and_load_round_trip() -> None:
    store = Store()
    update(store, endpoints=(b"e1", b"e2"))
    update(store, aid="b", data=None, cluster="z")
    copy = Store()
    copy.load(store.dump())
    assert copy.dump() == store.dump()


def test_reads_alone_cannot_hold_a_pin() -> None:
    store = Store()
    store.authorize("c", KEY, T0)
    store.authorize("c", KEY, T0 + MAX_TTL - 1)  # a squatter's list just before it lapses
    assert store.gc(T0 + MAX_TTL) == [Unpinned("c")]
