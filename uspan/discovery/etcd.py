"""The etcd backend (``--etcd URL[,URL...]``): any number of replicas share one etcd.

etcd is reached through its JSON gateway (``/v3/kv/*``, ``/v3/lease/grant``,
``/v3/watch``) with httpx under trio. Keys, under a prefix P, with IDs in unpadded
base64url (which has no "/"):

    P a/<cluster>/<affiliate>          msgpack [data or nil]   lease: the update's TTL
    P e/<cluster>/<affiliate>/<hex>    the endpoint blob       lease: the TTL of its update
    P p/<cluster>                      the pinned public key   lease: TTL + MAX_TTL

So etcd expires what the in-memory store would (the same semantics, see ``store``): an
endpoint counts for an affiliate only if it was written at or after the affiliate key
was created, so endpoints that outlive their affiliate are never resurrected. Every
write is one transaction that also compares the pin, so two replicas cannot pin a
cluster to different keys. Leases are shared by writes with the same TTL within
LEASE_REUSE seconds (an entry may expire up to that much early) to keep etcd's lease
count and the cost of an update down.

Limits that depend on state (1024 affiliates per cluster, 64 endpoints per affiliate) are
checked against the replica's mirror, so creates racing each other (on one replica or
several) can overshoot by the number in flight at once; the pin cannot race (every txn
checks it).

Each replica mirrors the whole prefix: a range read, then a watch from the next
revision. Watchers and lists are served from the mirror after it caught up with etcd's
current revision (read-your-writes, across replicas too). When etcd cannot be reached,
requests get ``backend_unavailable``, watches end with it (clients re-subscribe), and the
replica keeps retrying; once etcd answers it re-reads everything and serves again,
without a restart.
"""

from __future__ import annotations

import base64
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import trio

from uspan.discovery import protocol as p
from uspan.discovery.backend import BackendError, Hub, Records, Watcher
from uspan.discovery.store import (
    MAX_AFFILIATES,
    MAX_ENDPOINTS,
    MAX_TTL,
    Changed,
    Event,
    LimitError,
    Removed,
    Unpinned,
    check_id,
    check_update_fields,
)

log = logging.getLogger("uspan.discovery.etcd")

REQUEST_TIMEOUT = 5.0
HEALTH_INTERVAL = 2.0
CATCH_UP_TIMEOUT = 5.0
LEASE_REUSE = 1.0
RETRY_MIN = 0.2
RETRY_MAX = 5.0
TXN_ATTEMPTS = 4


class EtcdUnavailable(Exception):
    """etcd did not answer, or answered with an error we cannot act on."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _name(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode()


def _unname(text: str) -> str:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()


def _prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    end[-1] += 1
    return bytes(end)


@dataclass
class _Affiliate:
    data: bytes | None
    created: int  # create_revision of the affiliate key
    endpoints: dict[bytes, int] = field(default_factory=dict)  # blob -> mod_revision

    def record(self, affiliate: str) -> dict[str, Any]:
        return p.affiliate_record(affiliate, self.data, list(self.endpoints))


class Mirror:
    """This replica's copy of the prefix, fed by range results and watch events."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.pins: dict[str, bytes] = {}
        self.clusters: dict[str, dict[str, _Affiliate]] = {}
        self.revision = 0

    def clear(self) -> None:
        self.pins.clear()
        self.clusters.clear()

    def records(self, cluster: str) -> Records:
        return [a.record(aid) for aid, a in self.clusters.get(cluster, {}).items()]

    def apply(self, events: list[tuple[str, dict[str, Any]]]) -> list[Event]:
        """Apply (type, kv) pairs of one revision batch; returns the store-level events."""
        touched: dict[tuple[str, str], None] = {}
        out: list[Event] = []
        for kind, kv in events:
            key = _unb64(kv.get("key"))
            if not key.startswith(self.prefix):
                continue
            try:
                parts = key[len(self.prefix) :].decode().split("/")
                self._apply_one(kind, parts, kv, touched, out)
            except (ValueError, IndexError, KeyError) as e:
                log.warning("ignoring unexpected etcd key under the prefix (%s)", e)
        for cluster, aid in touched:
            found = self.clusters.get(cluster, {}).get(aid)
            if found is not None:
                out.append(Changed(cluster, found.record(aid)))
        return out

    def _apply_one(
        self,
        kind: str,
        parts: list[str],
        kv: dict[str, Any],
        touched: dict[tuple[str, str], None],
        out: list[Event],
    ) -> None:
        put = kind == "PUT"
        if parts[0] == "p" and len(parts) == 2:
            cluster = _unname(parts[1])
            if put:
                self.pins[cluster] = _unb64(kv.get("value"))
            elif self.pins.pop(cluster, None) is not None:
                self.clusters.pop(cluster, None)
                out.append(Unpinned(cluster))
        elif parts[0] == "a" and len(parts) == 3:
            cluster, aid = _unname(parts[1]), _unname(parts[2])
            members = self.clusters.setdefault(cluster, {})
            if put:
                (data,) = msgpack.unpackb(_unb64(kv.get("value")), raw=False)
                created = int(kv.get("create_revision", 0))
                found = members.get(aid)
                if found is None or found.created != created:
                    members[aid] = _Affiliate(data if isinstance(data, bytes) else None, created)
                elif isinstance(data, bytes):
                    found.data = data
                touched[(cluster, aid)] = None
            else:
                if members.pop(aid, None) is not None:
                    touched.pop((cluster, aid), None)
                    out.append(Removed(cluster, aid))
                if not members:
                    del self.clusters[cluster]
        elif parts[0] == "e" and len(parts) == 4:
            cluster, aid = _unname(parts[1]), _unname(parts[2])
            blob = bytes.fromhex(parts[3])
            found = self.clusters.get(cluster, {}).get(aid)
            if found is None:
                return
            if put:
                if int(kv.get("mod_revision", 0)) >= found.created:
                    found.endpoints[blob] = int(kv["mod_revision"])
                    touched[(cluster, aid)] = None
            elif found.endpoints.pop(blob, None) is not None:
                touched[(cluster, aid)] = None


class EtcdClient:
    """The few gateway calls we need, with failover over the member URLs."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._current = 0
        self.http = httpx.AsyncClient(timeout=REQUEST_TIMEOUT)

    @property
    def url(self) -> str:
        return self.urls[self._current]

    def rotate(self) -> None:
        self._current = (self._current + 1) % len(self.urls)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        errors = []
        for _ in range(len(self.urls)):
            url = self.url + path
            try:
                response = await self.http.post(url, json=body)
            except httpx.HTTPError as e:
                errors.append(f"{self.url}: {type(e).__name__}")
                self.rotate()
                continue
            try:
                result: dict[str, Any] = response.json()
            except ValueError:
                result = {}
            if response.status_code != 200:
                message = result.get("message") or response.reason_phrase
                raise EtcdUnavailable(f"{self.url}: HTTP {response.status_code}: {message}")
            return result
        raise EtcdUnavailable("etcd unreachable (" + "; ".join(errors) + ")")

    async def aclose(self) -> None:
        await self.http.aclose()


def _put(key: bytes, value: bytes, lease: int) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}


class EtcdBackend:
    """The ``Backend`` on a shared etcd (see the module docstring)."""

    def __init__(self, urls: Sequence[str], prefix: str = "/uspan/discovery/") -> None:
        if not urls:
            raise ValueError("--etcd needs at least one URL")
        self.etcd = EtcdClient(urls)
        self.prefix = prefix.encode()
        self.mirror = Mirror(self.prefix)
        self.hub = Hub()
        self.refusals: Counter[str] = Counter()
        self.available = False
        self.last_error = "not connected to etcd yet"
        self._revision_changed = trio.Event()
        self._leases: dict[int, tuple[int, float]] = {}  # ttl -> (lease id, granted at)

    # keys ----------------------------------------------------------------------------------

    def _pin_key(self, cluster: str) -> bytes:
        return self.prefix + f"p/{_name(cluster)}".encode()

    def _affiliate_key(self, cluster: str, affiliate: str) -> bytes:
        return self.prefix + f"a/{_name(cluster)}/{_name(affiliate)}".encode()

    def _endpoint_prefix(self, cluster: str, affiliate: str) -> bytes:
        return self.prefix + f"e/{_name(cluster)}/{_name(affiliate)}/".encode()

    # background ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mirror etcd forever: sync, watch, probe health; on failure retry with backoff."""
        task_status.started()
        delay = RETRY_MIN
        try:
            while True:
                try:
                    await self._sync()
                    delay = RETRY_MIN
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._watch)
                        nursery.start_soon(self._probe)
                except* (EtcdUnavailable, httpx.HTTPError, ValueError, KeyError) as group:
                    self._down(str(group.exceptions[0]))
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, RETRY_MAX)
        finally:
            with trio.CancelScope(shield=True):
                await self.etcd.aclose()

    def _down(self, error: str) -> None:
        if self.available:
            log.warning("etcd unavailable: %s", error)
        self.available = False
        self.last_error = error
        self.hub.end_all(p.E_BACKEND_UNAVAILABLE, f"etcd unavailable: {error}; re-subscribe")
        self._leases.clear()

    async def _sync(self) -> None:
        result = await self.etcd.call(
            "/v3/kv/range",
            {"key": _b64(self.prefix), "range_end": _b64(_prefix_end(self.prefix))},
        )
        self.mirror.clear()
        self.mirror.apply([("PUT", kv) for kv in result.get("kvs", [])])
        # set, not raised: an etcd rebuilt from scratch starts its revisions again
        self.mirror.revision = 0
        self._set_revision(int(result["header"]["revision"]))
        self.available = True
        log.info("etcd mirror in sync at revision %d (%s)", self.mirror.revision, self.etcd.url)

    def _set_revision(self, revision: int) -> None:
        if revision > self.mirror.revision:
            self.mirror.revision = revision
            self._revision_changed.set()
            self._revision_changed = trio.Event()

    async def _watch(self) -> None:
        body = {
            "create_request": {
                "key": _b64(self.prefix),
                "range_end": _b64(_prefix_end(self.prefix)),
                "start_revision": str(self.mirror.revision + 1),
                "progress_notify": True,
            }
        }
        timeout = httpx.Timeout(REQUEST_TIMEOUT, read=None)
        async with self.etcd.http.stream(
            "POST", self.etcd.url + "/v3/watch", json=body, timeout=timeout
        ) as response:
            if response.status_code != 200:
                raise EtcdUnavailable(f"watch: HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                result = json.loads(line).get("result")
                if result is None:
                    raise EtcdUnavailable(f"watch: {line[:200]}")
                if result.get("canceled") or result.get("compact_revision"):
                    raise EtcdUnavailable("watch canceled by etcd (compacted): resyncing")
                events = [(e.get("type", "PUT"), e["kv"]) for e in result.get("events", [])]
                if events:
                    self.hub.publish(self.mirror.apply(events))
                self._set_revision(int(result.get("header", {}).get("revision", 0)))
        raise EtcdUnavailable("watch stream ended")

    async def _probe(self) -> None:
        """A dead etcd may leave the watch stream silent: ask it something regularly."""
        while True:
            await trio.sleep(HEALTH_INTERVAL)
            await self._current_revision()

    async def _current_revision(self) -> int:
        result = await self.etcd.call(
            "/v3/kv/range", {"key": _b64(self.prefix), "count_only": True}
        )
        return int(result["header"]["revision"])

    # helpers for requests ------------------------------------------------------------------

    def _check_available(self) -> None:
        if not self.available:
            raise BackendError(p.E_BACKEND_UNAVAILABLE, f"etcd unavailable: {self.last_error}")

    async def _catch_up(self, revision: int) -> None:
        """Wait until the mirror has seen ``revision`` (read-your-writes)."""
        with trio.move_on_after(CATCH_UP_TIMEOUT):
            while self.mirror.revision < revision:
                self._check_available()
                await self._revision_changed.wait()
            return
        raise BackendError(p.E_BACKEND_UNAVAILABLE, "etcd mirror is lagging")

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check_available()
        try:
            return await self.etcd.call(path, body)
        except EtcdUnavailable as e:
            raise BackendError(p.E_BACKEND_UNAVAILABLE, str(e)) from None

    async def _lease(self, ttl: int) -> int:
        now = trio.current_time()
        cached = self._leases.get(ttl)
        if cached is not None and now - cached[1] < LEASE_REUSE:
            return cached[0]
        result = await self._call("/v3/lease/grant", {"TTL": str(ttl)})
        lease = int(result["ID"])
        self._leases[ttl] = (lease, now)
        return lease

    def _refuse(self, error: LimitError) -> LimitError:
        self.refusals[error.code] += 1
        return error

    def _check_pin(self, cluster: str, key: bytes) -> bool:
        """True if pinned to ``key``, False if unpinned; LimitError if pinned otherwise."""
        try:
            check_id("cluster", cluster)
        except LimitError as e:
            raise self._refuse(e) from None
        pin = self.mirror.pins.get(cluster)
        if pin is None:
            return False
        if pin != key:
            raise self._refuse(
                LimitError(
                    p.E_PROOF_MISMATCH,
                    "this cluster is pinned to another key (wrong cluster secret)",
                )
            )
        return True

    def _pin_compare(self, cluster: str, key: bytes, pinned: bool) -> dict[str, Any]:
        if pinned:
            return {
                "key": _b64(self._pin_key(cluster)),
                "target": "VALUE",
                "result": "EQUAL",
                "value": _b64(key),
            }
        return {
            "key": _b64(self._pin_key(cluster)),
            "target": "CREATE",
            "result": "EQUAL",
            "create_revision": "0",
        }

    async def _txn(
        self,
        cluster: str,
        key: bytes,
        compares: list[dict[str, Any]],
        success: list[dict[str, Any]],
        pin_lease: int,
        pinned: bool,
    ) -> int | None:
        """One conditional write that also (re)puts the pin; the revision, or None if a
        compare failed (the caller re-reads the mirror and retries)."""
        body = {
            "compare": [self._pin_compare(cluster, key, pinned), *compares],
            "success": [_put(self._pin_key(cluster), key, pin_lease), *success],
            "failure": [],
        }
        result = await self._call("/v3/kv/txn", body)
        revision = int(result["header"]["revision"])
        if not result.get("succeeded"):
            # the mirror was behind: let it see what etcd has, then decide again
            await self._catch_up(revision)
            return None
        await self._catch_up(revision)
        return revision

    async def _authorize(self, cluster: str, key: bytes) -> None:
        """Pin on first use (for reads and deletes), atomically across replicas."""
        for _ in range(TXN_ATTEMPTS):
            self._check_available()
            if self._check_pin(cluster, key):
                return
            lease = await self._lease(MAX_TTL)
            if await self._txn(cluster, key, [], [], lease, pinned=False) is not None:
                return
        raise BackendError(p.E_BACKEND_UNAVAILABLE, "etcd contention: try again")

    # Backend -------------------------------------------------------------------------------

    async def update(
        self,
        cluster: str,
        key: bytes,
        affiliate: str,
        data: bytes | None,
        endpoints: tuple[bytes, ...],
        ttl: int,
    ) -> None:
        try:
            check_update_fields(affiliate, data, endpoints, ttl)
        except LimitError as e:
            raise self._refuse(e) from None
        for _ in range(TXN_ATTEMPTS):
            self._check_available()
            pinned = self._check_pin(cluster, key)
            members = self.mirror.clusters.get(cluster, {})
            current = members.get(affiliate)
            if current is None and len(members) >= MAX_AFFILIATES:
                raise self._refuse(
                    LimitError(p.E_LIMIT_AFFILIATES, f"cluster has {MAX_AFFILIATES} affiliates")
                )
            if current is not None and len(set(current.endpoints) | set(endpoints)) > (
                MAX_ENDPOINTS
            ):
                raise self._refuse(
                    LimitError(
                        p.E_LIMIT_ENDPOINTS,
                        f"affiliate would have more than {MAX_ENDPOINTS} endpoints",
                    )
                )
            lease = await self._lease(ttl)
            pin_lease = await self._lease(ttl + MAX_TTL)
            akey = self._affiliate_key(cluster, affiliate)
            compares = []
            if data is None and current is not None:
                # keep the stored data: rewrite the key with its own value, new lease
                record = {
                    "request_put": {"key": _b64(akey), "ignore_value": True, "lease": str(lease)}
                }
                compares.append(
                    {
                        "key": _b64(akey),
                        "target": "CREATE",
                        "result": "EQUAL",
                        "create_revision": str(current.created),
                    }
                )
            else:
                record = _put(akey, msgpack.packb([data], use_bin_type=True), lease)
                if data is None:
                    compares.append(
                        {
                            "key": _b64(akey),
                            "target": "CREATE",
                            "result": "EQUAL",
                            "create_revision": "0",
                        }
                    )
            eprefix = self._endpoint_prefix(cluster, affiliate)
            puts = [record, *(_put(eprefix + e.hex().encode(), e, lease) for e in endpoints)]
            if await self._txn(cluster, key, compares, puts, pin_lease, pinned) is not None:
                return
        raise BackendError(p.E_BACKEND_UNAVAILABLE, "etcd contention: try again")

    async def delete(self, cluster: str, key: bytes, affiliate: str) -> None:
        await self._authorize(cluster, key)
        eprefix = self._endpoint_prefix(cluster, affiliate)
        body = {
            "compare": [self._pin_compare(cluster, key, True)],
            "success": [
                {"request_delete_range": {"key": _b64(self._affiliate_key(cluster, affiliate))}},
                {
                    "request_delete_range": {
                        "key": _b64(eprefix),
                        "range_end": _b64(_prefix_end(eprefix)),
                    }
                },
            ],
            "failure": [],
        }
        result = await self._call("/v3/kv/txn", body)
        await self._catch_up(int(result["header"]["revision"]))
        if not result.get("succeeded"):
            self._check_pin(cluster, key)  # the pin changed under us: say so

    async def _consistent(self) -> None:
        """Catch the mirror up with etcd's current revision (a linearizable read)."""
        self._check_available()
        try:
            revision = await self.etcd.call(
                "/v3/kv/range", {"key": _b64(self.prefix), "count_only": True}
            )
        except EtcdUnavailable as e:
            raise BackendError(p.E_BACKEND_UNAVAILABLE, str(e)) from None
        await self._catch_up(int(revision["header"]["revision"]))

    async def list(self, cluster: str, key: bytes) -> Records:
        await self._authorize(cluster, key)
        await self._consistent()
        return self.mirror.records(cluster)

    async def subscribe(self, watcher: Watcher, key: bytes) -> Records:
        await self._authorize(watcher.cluster, key)
        await self._consistent()
        self._check_available()
        self.hub.add(watcher)  # no await since the mirror was read: atomic
        return self.mirror.records(watcher.cluster)

    def unsubscribe(self, watcher: Watcher) -> None:
        self.hub.remove(watcher)

    def counts(self) -> tuple[int, int]:
        return len(self.mirror.pins), sum(len(m) for m in self.mirror.clusters.values())
