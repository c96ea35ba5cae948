"""The etcd backend's mirror, fed by hand-made watch events (no etcd needed)."""

from __future__ import annotations

import base64

import msgpack

from uspan.discovery.etcd import Mirror, _name
from uspan.discovery.store import Changed, Removed, Unpinned

PREFIX = b"/t/"


def kv(key: str, value: bytes, created: int, modified: int) -> dict[str, str]:
    return {
        "key": base64.b64encode(PREFIX + key.encode()).decode(),
        "value": base64.b64encode(value).decode(),
        "create_revision": str(created),
        "mod_revision": str(modified),
    }


C, A = _name("cluster/with/slashes"), _name("node-1")


def affiliate(data: bytes | None, created: int, modified: int) -> tuple[str, dict[str, str]]:
    return "PUT", kv(f"a/{C}/{A}", msgpack.packb([data]), created, modified)


def endpoint(blob: bytes, modified: int, kind: str = "PUT") -> tuple[str, dict[str, str]]:
    return kind, kv(f"e/{C}/{A}/{blob.hex()}", blob, modified, modified)


def test_one_txn_gives_one_change_with_everything() -> None:
    mirror = Mirror(PREFIX)
    events = mirror.apply([("PUT", kv(f"p/{C}", b"k" * 32, 5, 5)), affiliate(b"d", 5, 5),
                           endpoint(b"e1", 5), endpoint(b"e2", 5)])  # fmt: skip
    record = {"id": "node-1", "data": b"d", "endpoints": [b"e1", b"e2"]}
    assert events == [Changed("cluster/with/slashes", record)]
    assert mirror.pins == {"cluster/with/slashes": b"k" * 32}


def test_data_kept_when_an_update_has_none_and_endpoints_expire() -> None:
    mirror = Mirror(PREFIX)
    mirror.apply([affiliate(b"d", 5, 5), endpoint(b"e1", 5)])
    mirror.apply([affiliate(None, 5, 7), endpoint(b"e2", 7)])
    (change,) = mirror.apply([endpoint(b"e1", 9, "DELETE")])
    assert isinstance(change, Changed)
    assert change.record == {"id": "node-1", "data": b"d", "endpoints": [b"e2"]}


def test_endpoints_older_than_the_affiliate_are_not_resurrected() -> None:
    mirror = Mirror(PREFIX)
    mirror.apply([affiliate(b"d", 5, 5), endpoint(b"old", 5)])
    assert mirror.apply([("DELETE", kv(f"a/{C}/{A}", b"", 0, 8))]) == [
        Removed("cluster/with/slashes", "node-1")
    ]
    # re-created at revision 10; a resync still lists the lingering endpoint key of rev 5
    mirror.apply([affiliate(None, 10, 10), endpoint(b"old", 5)])
    assert mirror.records("cluster/with/slashes") == [
        {"id": "node-1", "data": None, "endpoints": []}
    ]


def test_pin_expiry_unpins() -> None:
    mirror = Mirror(PREFIX)
    mirror.apply([("PUT", kv(f"p/{C}", b"k" * 32, 5, 5))])
    assert mirror.apply([("DELETE", kv(f"p/{C}", b"", 0, 9))]) == [Unpinned("cluster/with/slashes")]


def test_foreign_keys_are_ignored() -> None:
    mirror = Mirror(PREFIX)
    assert (
        mirror.apply([("PUT", kv("zzz/what", b"x", 1, 1)), ("PUT", kv("a/!!", b"x", 1, 1))]) == []
    )
