"""The registry's state, sans-IO: clusters, their pinned key, affiliates, limits and expiry.

Every call that depends on time takes ``now`` (seconds on the wall clock, since state
survives restarts through ``persist``). Mutations return the events watchers must see.

Semantics (the same for every backend):
- an update sets the affiliate's expiry to now + ttl; its data is replaced when the update
  carries data and kept otherwise; its endpoints merge: each endpoint in the update gets
  expiry now + ttl, the others keep theirs. An endpoint whose expiry passed is dropped; an
  affiliate whose expiry passed is dropped with all its endpoints;
- a cluster exists while it is pinned: the pin (the members' public key, see ``proof``) is
  taken on first use and lapses when the cluster has had no affiliate for MAX_TTL.
Every refusal raises ``LimitError`` with a code naming the limit, and is counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from uspan.discovery import protocol as p

MAX_ID = 256
MAX_DATA = 2048
MAX_ENDPOINT = 32
MAX_ENDPOINTS = 64
MAX_AFFILIATES = 1024
MAX_TTL = 1800
MAX_CLUSTERS = 100_000


class LimitError(Exception):
    """A refused request: ``code`` (a protocol error code) names the limit or rule."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(slots=True)
class Affiliate:
    id: str
    data: bytes | None
    endpoints: dict[bytes, float]  # blob -> expiry, in order of first arrival
    expires: float

    def record(self) -> dict[str, Any]:
        return p.affiliate_record(self.id, self.data, list(self.endpoints))


@dataclass(slots=True)
class Cluster:
    id: str
    pin: bytes
    pin_until: float
    affiliates: dict[str, Affiliate] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Changed:
    """An affiliate was created or changed; ``record`` is its whole wire record."""

    cluster: str
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Removed:
    cluster: str
    affiliate: str


@dataclass(frozen=True, slots=True)
class Unpinned:
    """The cluster's pin lapsed: its watchers must re-subscribe (and may re-pin)."""

    cluster: str


Event = Changed | Removed | Unpinned


def check_id(kind: str, value: str) -> None:
    code = p.E_LIMIT_CLUSTER_ID if kind == "cluster" else p.E_LIMIT_AFFILIATE_ID
    size = len(value.encode())
    if not 1 <= size <= MAX_ID:
        raise LimitError(code, f"{kind} ID of {size} bytes outside 1..{MAX_ID}")


def check_update_fields(
    affiliate: str, data: bytes | None, endpoints: tuple[bytes, ...], ttl: int
) -> None:
    """The limits a single update can break by itself (no state needed)."""
    check_id("affiliate", affiliate)
    if data is not None and len(data) > MAX_DATA:
        raise LimitError(p.E_LIMIT_DATA, f"data of {len(data)} bytes > {MAX_DATA}")
    for blob in endpoints:
        if not 1 <= len(blob) <= MAX_ENDPOINT:
            raise LimitError(
                p.E_LIMIT_ENDPOINT, f"endpoint blob of {len(blob)} bytes outside 1..{MAX_ENDPOINT}"
            )
    if len(set(endpoints)) > MAX_ENDPOINTS:
        raise LimitError(p.E_LIMIT_ENDPOINTS, f"more than {MAX_ENDPOINTS} endpoints")
    if not 1 <= ttl <= MAX_TTL:
        raise LimitError(p.E_LIMIT_TTL, f"ttl {ttl} s outside 1..{MAX_TTL}")


class Store:
    """All clusters in memory. Not thread-safe; one trio task at a time owns it."""

    def __init__(self, max_clusters: int = MAX_CLUSTERS) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.max_clusters = max_clusters
        self.refusals: Counter[str] = Counter()

    # queries ------------------------------------------------------------------------------

    def affiliate_count(self) -> int:
        return sum(len(c.affiliates) for c in self.clusters.values())

    def records(self, cluster: str) -> list[dict[str, Any]]:
        found = self.clusters.get(cluster)
        return [a.record() for a in found.affiliates.values()] if found else []

    def refuse(self, error: LimitError) -> LimitError:
        self.refusals[error.code] += 1
        return error

    # access -------------------------------------------------------------------------------

    def authorize(self, cluster: str, key: bytes, now: float, ttl: int = 0) -> Cluster:
        """The cluster if ``key`` is its pin (pinning it for MAX_TTL on first use), else
        LimitError. A write's ttl keeps the pin at least MAX_TTL past that write's expiry."""
        try:
            check_id("cluster", cluster)
            found = self.clusters.get(cluster)
            if found is None:
                if len(self.clusters) >= self.max_clusters:
                    raise LimitError(p.E_LIMIT_CLUSTERS, f"{self.max_clusters} clusters exist")
                found = self.clusters[cluster] = Cluster(cluster, key, now + MAX_TTL)
            elif found.pin != key:
                raise LimitError(
                    p.E_PROOF_MISMATCH,
                    "this cluster is pinned to another key (wrong cluster secret)",
                )
        except LimitError as e:
            raise self.refuse(e) from None
        if ttl:  # only writes extend a pin: reads alone cannot hold a cluster forever
            found.pin_until = max(found.pin_until, now + ttl + MAX_TTL)
        return found

    # mutations ----------------------------------------------------------------------------

    def update(
        self,
        cluster: str,
        key: bytes,
        affiliate: str,
        data: bytes | None,
        endpoints: tuple[bytes, ...],
        ttl: int,
        now: float,
    ) -> list[Event]:
        """Apply a client's update after every check; nothing changes when one fails."""
        try:
            check_update_fields(affiliate, data, endpoints, ttl)
        except LimitError as e:
            raise self.refuse(e) from None
        found = self.authorize(cluster, key, now)
        current = found.affiliates.get(affiliate)
        try:
            if current is None and len(found.affiliates) >= MAX_AFFILIATES:
                raise LimitError(p.E_LIMIT_AFFILIATES, f"cluster has {MAX_AFFILIATES} affiliates")
            if current is not None:
                live = {e for e, t in current.endpoints.items() if t > now}
                if len(live | set(endpoints)) > MAX_ENDPOINTS:
                    raise LimitError(
                        p.E_LIMIT_ENDPOINTS,
                        f"affiliate would have more than {MAX_ENDPOINTS} endpoints",
                    )
        except LimitError as e:
            raise self.refuse(e) from None
        return self.apply_update(cluster, affiliate, data, endpoints, now + ttl, now)

    def apply_update(
        self,
        cluster: str,
        affiliate: str,
        data: bytes | None,
        endpoints: tuple[bytes, ...],
        expires: float,
        now: float,
    ) -> list[Event]:
        """The update itself, unchecked (log replay uses it). The cluster must exist."""
        found = self.clusters[cluster]
        current = found.affiliates.get(affiliate)
        if current is None:
            current = found.affiliates[affiliate] = Affiliate(affiliate, None, {}, expires)
        if data is not None:
            current.data = data
        current.expires = expires
        for blob in endpoints:
            current.endpoints[blob] = expires
        current.endpoints = {e: t for e, t in current.endpoints.items() if t > now}
        found.pin_until = max(found.pin_until, expires + MAX_TTL)
        return [Changed(cluster, current.record())]

    def pin(self, cluster: str, key: bytes, pin_until: float) -> None:
        """Set a pin unchecked (log replay)."""
        found = self.clusters.get(cluster)
        if found is None:
            self.clusters[cluster] = Cluster(cluster, key, pin_until)
        else:
            found.pin, found.pin_until = key, max(found.pin_until, pin_until)

    def delete(self, cluster: str, affiliate: str) -> list[Event]:
        found = self.clusters.get(cluster)
        if found is None or found.affiliates.pop(affiliate, None) is None:
            return []
        return [Removed(cluster, affiliate)]

    def gc(self, now: float) -> list[Event]:
        """Drop what expired by ``now``: endpoints, affiliates, then lapsed pins."""
        events: list[Event] = []
        for cluster in list(self.clusters.values()):
            for affiliate in list(cluster.affiliates.values()):
                if affiliate.expires <= now:
                    del cluster.affiliates[affiliate.id]
                    events.append(Removed(cluster.id, affiliate.id))
                elif any(t <= now for t in affiliate.endpoints.values()):
                    affiliate.endpoints = {e: t for e, t in affiliate.endpoints.items() if t > now}
                    events.append(Changed(cluster.id, affiliate.record()))
            if not cluster.affiliates and cluster.pin_until <= now:
                del self.clusters[cluster.id]
                events.append(Unpinned(cluster.id))
        return events

    # persistence --------------------------------------------------------------------------

    def dump(self) -> list[Any]:
        """Plain data for a snapshot (msgpack-able), loaded back by ``load``."""
        return [
            [
                c.id,
                c.pin,
                c.pin_until,
                [
                    [a.id, a.data, a.expires, list(a.endpoints.items())]
                    for a in c.affiliates.values()
                ],
            ]
            for c in self.clusters.values()
        ]

    def load(self, dumped: list[Any]) -> None:
        for cid, pin, pin_until, affiliates in dumped:
            cluster = self.clusters[cid] = Cluster(cid, pin, pin_until)
            for aid, data, expires, endpoints in affiliates:
                cluster.affiliates[aid] = Affiliate(aid, data, dict(map(tuple, endpoints)), expires)
