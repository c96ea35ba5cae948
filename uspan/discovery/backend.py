"""Where the service keeps its state: in this process (``MemoryBackend``, optionally durable
through ``persist``) or in etcd (``uspan.discovery.etcd``). The server only sees
``Backend``; watchers are fed by the ``Hub`` whichever backend produced the change.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from uspan.discovery import protocol as p
from uspan.discovery.persist import Journal, StateError, StateFile
from uspan.discovery.store import Changed, Event, LimitError, Removed, Store

log = logging.getLogger("uspan.discovery")
Clock = Callable[[], float]
Records = list[dict[str, Any]]


class BackendError(Exception):
    """The backend cannot serve now (``code``: backend_unavailable or storage_failed)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Watcher(Protocol):
    """A subscription the server holds for one connection."""

    cluster: str

    def push(self, event: p.Packed) -> None: ...
    def end(self, code: str, message: str) -> None: ...


class Hub:
    """Fan-out of store events to the watchers of each cluster."""

    def __init__(self) -> None:
        self._watchers: defaultdict[str, set[Watcher]] = defaultdict(set)

    def __len__(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    def add(self, watcher: Watcher) -> None:
        self._watchers[watcher.cluster].add(watcher)

    def remove(self, watcher: Watcher) -> None:
        found = self._watchers.get(watcher.cluster)
        if found is not None:
            found.discard(watcher)
            if not found:
                del self._watchers[watcher.cluster]

    def publish(self, events: list[Event]) -> None:
        for event in events:
            watchers = self._watchers.get(event.cluster)
            if not watchers:
                continue
            if isinstance(event, Changed):
                message = p.Packed.of({"event": "update", "affiliate": event.record})
            elif isinstance(event, Removed):
                message = p.Packed.of({"event": "delete", "affiliate_id": event.affiliate})
            else:
                for watcher in list(watchers):
                    watcher.end(p.E_CLUSTER_EXPIRED, "the cluster's pin lapsed: re-subscribe")
                continue
            for watcher in list(watchers):
                watcher.push(message)

    def end_all(self, code: str, message: str) -> None:
        for watchers in list(self._watchers.values()):
            for watcher in list(watchers):
                watcher.end(code, message)


class Backend(Protocol):
    hub: Hub
    refusals: Counter[str]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work (expiry, commits, replication) until cancelled; started first."""

    async def update(
        self,
        cluster: str,
        key: bytes,
        affiliate: str,
        data: bytes | None,
        endpoints: tuple[bytes, ...],
        ttl: int,
    ) -> None: ...
    async def delete(self, cluster: str, key: bytes, affiliate: str) -> None: ...
    async def list(self, cluster: str, key: bytes) -> Records: ...
    async def subscribe(self, watcher: Watcher, key: bytes) -> Records:
        """Register ``watcher`` and return the snapshot it starts from, atomically."""

    def unsubscribe(self, watcher: Watcher) -> None: ...
    def counts(self) -> tuple[int, int]:
        """(clusters, affiliates) known to this replica."""


class MemoryBackend:
    """The embedded default: a ``Store`` in this process, durable with ``state_file``."""

    def __init__(
        self,
        state_file: Path | None = None,
        *,
        clock: Clock = time.time,
        gc_interval: float = 1.0,
        compact_interval: float = 600.0,
        max_clusters: int | None = None,
    ) -> None:
        self.store = Store() if max_clusters is None else Store(max_clusters)
        self.refusals = self.store.refusals
        self.hub = Hub()
        self.clock = clock
        self.gc_interval = gc_interval
        self.compact_interval = compact_interval
        self.state = StateFile(state_file) if state_file else None
        self.journal = Journal(self.state, self.store.dump) if self.state else None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.state is not None:
            stats = await trio.to_thread.run_sync(self.state.load, self.store, self.clock())
            log.info(
                "state loaded from %s: %d clusters, %d affiliates (%d log records, %d expired,"
                " %d torn tails dropped)",
                self.state.path,
                *self.counts(),
                stats["records"],
                stats["expired"],
                stats["torn"],
            )
        try:
            async with trio.open_nursery() as nursery:
                if self.journal is not None:
                    nursery.start_soon(self.journal.run)
                    nursery.start_soon(self._compact_loop)
                task_status.started()
                while True:
                    await trio.sleep(self.gc_interval)
                    self.collect()
        finally:
            if self.journal is not None and self.state is not None:
                with trio.CancelScope(shield=True):
                    self.journal.request_compaction()
                    await self.journal.flush()
                    self.state.close()
                    log.info("state saved to %s", self.state.path)

    async def _compact_loop(self) -> None:
        assert self.journal is not None
        while True:
            await trio.sleep(self.compact_interval)
            self.journal.request_compaction()

    def collect(self) -> None:
        """Expire what is due, and tell watchers (expiry needs no log record: it is
        recomputed from the absolute expiries on load)."""
        self.hub.publish(self.store.gc(self.clock()))

    async def _durable(self, records: list[list[Any]], events: list[Event]) -> None:
        if self.journal is not None and records:
            batch = None
            for record in records:
                batch = self.journal.add(record)
            assert batch is not None
            try:
                await self.journal.commit(batch)
            except StateError as e:
                raise BackendError(p.E_STORAGE_FAILED, str(e)) from None
        self.hub.publish(events)

    def _authorize(self, cluster: str, key: bytes, now: float) -> list[list[Any]]:
        """Pin on first use; returns the log record of a new pin."""
        fresh = cluster not in self.store.clusters
        found = self.store.authorize(cluster, key, now)
        return [["p", cluster, key, found.pin_until]] if fresh else []

    async def update(
        self,
        cluster: str,
        key: bytes,
        affiliate: str,
        data: bytes | None,
        endpoints: tuple[bytes, ...],
        ttl: int,
    ) -> None:
        now = self.clock()
        fresh = cluster not in self.store.clusters
        try:
            events = self.store.update(cluster, key, affiliate, data, endpoints, ttl, now)
        except LimitError:
            if fresh and cluster in self.store.clusters and self.journal is not None:
                # the refused update still pinned the cluster (first use): keep that
                found = self.store.clusters[cluster]
                self.journal.add(["p", cluster, key, found.pin_until])
            raise
        pin_until = self.store.clusters[cluster].pin_until
        record = ["u", cluster, key, pin_until, affiliate, data, list(endpoints), now + ttl, now]
        await self._durable([record], events)

    async def delete(self, cluster: str, key: bytes, affiliate: str) -> None:
        records = self._authorize(cluster, key, self.clock())
        events = self.store.delete(cluster, affiliate)
        if events:
            records.append(["d", cluster, affiliate])
        await self._durable(records, events)

    async def list(self, cluster: str, key: bytes) -> Records:
        records = self._authorize(cluster, key, self.clock())
        await self._durable(records, [])
        return self.store.records(cluster)

    async def subscribe(self, watcher: Watcher, key: bytes) -> Records:
        records = self._authorize(watcher.cluster, key, self.clock())
        await self._durable(records, [])
        # no await between these two: the snapshot and the registration are atomic
        self.hub.add(watcher)
        return self.store.records(watcher.cluster)

    def unsubscribe(self, watcher: Watcher) -> None:
        self.hub.remove(watcher)

    def counts(self) -> tuple[int, int]:
        return len(self.store.clusters), self.store.affiliate_count()


__all__ = ["Backend", "BackendError", "Hub", "LimitError", "MemoryBackend", "Watcher"]
