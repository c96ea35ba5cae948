"""The trio client of the discovery service, as a node uses it.

``DiscoveryClient`` seals what it sends (``seal``), proves membership on every cluster
request (``proof``), and fails over between the service addresses it was given: a
request that meets a dead or unavailable service is retried on the next address with
exponential backoff (requests are idempotent). ``watch()`` keeps a subscription alive
across reconnects: after each (re)connection the first event is a fresh ``Snapshot``,
which replaces whatever the consumer knew. ``status`` tells which service is in use,
since when, and the last error, for ``uspan get discoverystatus``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from uspan.discovery import protocol as p
from uspan.discovery.proof import MemberKey, proof_message
from uspan.discovery.seal import Sealer, SealError

log = logging.getLogger("uspan.discovery.client")

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 10.0
WATCH_BUFFER = 256
# A watch is idle while nothing changes: when a NAT on the way forgets the connection
# silently, only TCP keepalives notice (the kernel's default: 2 hours idle, then 9 probes).
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_PROBES = 15, 5, 3  # dead within 30 s
E_UNAVAILABLE = "unavailable"  # client-side code: no service could be reached


class DiscoveryError(Exception):
    """A request failed: ``code`` is a protocol error code or ``unavailable``."""

    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, from a rate_limited reply

    @property
    def retryable(self) -> bool:
        return self.code in p.RETRYABLE or self.code == E_UNAVAILABLE


class DiscoveryUnavailable(DiscoveryError):
    """No service address answered (connection refused, reset, timed out)."""

    def __init__(self, message: str) -> None:
        super().__init__(E_UNAVAILABLE, message)


@dataclass(frozen=True, slots=True)
class Affiliate:
    """An affiliate as opened with the cluster secret. ``data`` is None when the affiliate
    has none (yet); endpoints that do not open are left out (and counted in status)."""

    id: str
    data: bytes | None
    endpoints: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The whole cluster; sent first and after every reconnect: replace, do not merge."""

    affiliates: tuple[Affiliate, ...]


@dataclass(frozen=True, slots=True)
class Updated:
    affiliate: Affiliate


@dataclass(frozen=True, slots=True)
class Deleted:
    affiliate_id: str


WatchEvent = Snapshot | Updated | Deleted
Affiliates = list[Affiliate]
Records = list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class HelloInfo:
    """What hello returns: the address the service saw us at, and its version."""

    address: str
    port: int
    server: str
    version: int


@dataclass(frozen=True, slots=True)
class LinkStatus:
    """One connection's state: the service in use (``host:port``), since when (wall
    clock), and the last error with its time."""

    endpoint: str | None = None
    connected: bool = False
    connected_since: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    connects: int = 0  # connections established (1 = never reconnected)


@dataclass(frozen=True, slots=True)
class ClientStatus:
    requests: LinkStatus = field(default_factory=LinkStatus)
    watch: LinkStatus = field(default_factory=LinkStatus)
    watching: bool = False
    observed_address: str | None = None
    server: str | None = None
    undecryptable: int = 0  # blobs that did not open under our secret


class View:
    """The cluster as a watcher sees it: apply each event, read ``affiliates``."""

    def __init__(self) -> None:
        self.affiliates: dict[str, Affiliate] = {}
        self.snapshots = 0

    def apply(self, event: WatchEvent) -> None:
        if isinstance(event, Snapshot):
            self.affiliates = {a.id: a for a in event.affiliates}
            self.snapshots += 1
        elif isinstance(event, Updated):
            self.affiliates[event.affiliate.id] = event.affiliate
        else:
            self.affiliates.pop(event.affiliate_id, None)


def parse_endpoint(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); ValueError naming the text."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def keepalive(sock: trio.socket.SocketType) -> None:
    """Find a dead service in 30 s: idle, by keepalive probes; with data unacknowledged
    (a request, or a reply the service cannot deliver), by the user timeout."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                    1000 * (KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES))


class _Link:
    """One TCP connection to one service, after hello."""

    def __init__(self, stream: trio.SocketStream, endpoint: str) -> None:
        self.stream = stream
        self.endpoint = endpoint
        self.decoder = p.FrameDecoder()
        self.inbox: list[dict[str, Any]] = []
        self.nonce = b""
        self.ids = itertools.count(1)
        self.seq = itertools.count(1)

    async def send(self, message: dict[str, Any]) -> None:
        await self.stream.send_all(p.encode(message))

    async def receive(self) -> dict[str, Any]:
        while not self.inbox:
            data = await self.stream.receive_some(65536)
            if not data:
                raise DiscoveryUnavailable(f"{self.endpoint} closed the connection")
            try:
                self.inbox.extend(self.decoder.feed(data))
            except p.ProtocolError as e:
                raise DiscoveryError(e.code, f"{self.endpoint} sent {e.message}") from None
        return self.inbox.pop(0)

    async def reply(self, rid: int) -> dict[str, Any]:
        """The next frame for request ``rid``; an error frame raises DiscoveryError."""
        while True:
            message = await self.receive()
            if message.get("id") in (rid, 0):
                if message.get("ok") is not True:
                    code = str(message.get("code", "bad_message"))
                    raise DiscoveryError(
                        code, str(message.get("message", "")), _retry_after(message)
                    )
                return message

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class DiscoveryClient:
    """See the module docstring. Use as ``async with`` or call ``aclose()``."""

    def __init__(
        self,
        endpoints: Sequence[str],
        cluster_id: str,
        cluster_secret: bytes,
        *,
        request_timeout: float = REQUEST_TIMEOUT,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        attempts: int | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no discovery service address given")
        self.endpoints = list(endpoints)
        for endpoint in self.endpoints:
            parse_endpoint(endpoint)
        self.cluster_id = cluster_id
        self.sealer = Sealer(cluster_secret)
        self.key = MemberKey(cluster_secret, cluster_id)
        self.request_timeout = request_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.attempts = attempts if attempts is not None else max(3, 2 * len(self.endpoints))
        self._status = ClientStatus()
        self._link: _Link | None = None
        self._lock = trio.Lock()
        self._next = 0  # index of the endpoint to try first

    @property
    def status(self) -> ClientStatus:
        return self._status

    async def __aenter__(self) -> DiscoveryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            await link.aclose()
            self._set(requests=replace(self._status.requests, connected=False))

    # connections --------------------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        self._status = replace(self._status, **changes)

    def _link_error(self, which: str, endpoint: str | None, error: str) -> None:
        current: LinkStatus = getattr(self._status, which)
        self._set(
            **{
                which: replace(
                    current,
                    endpoint=endpoint,
                    connected=False,
                    last_error=error,
                    last_error_at=time.time(),
                )
            }
        )

    async def _open(self, which: str) -> tuple[_Link, dict[str, Any]]:
        """Connect and hello, trying each address once from the last good one."""
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._next + i) % len(self.endpoints)
            endpoint = self.endpoints[index]
            host, port = parse_endpoint(endpoint)
            link = None
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    stream = await trio.open_tcp_stream(host, port)
                    keepalive(stream.socket)
                    link = _Link(stream, endpoint)
                    await link.send({"op": "hello", "id": 1, "version": p.VERSION})
                    hello = await link.reply(1)
                nonce = hello.get("nonce")
                if not isinstance(nonce, bytes) or len(nonce) != p.NONCE_SIZE:
                    raise DiscoveryError(p.E_BAD_MESSAGE, f"{endpoint}: hello without a nonce")
                link.nonce = nonce
                next(link.ids)
                self._next = index
                previous: LinkStatus = getattr(self._status, which)
                self._set(
                    **{
                        which: replace(
                            previous,
                            endpoint=endpoint,
                            connected=True,
                            connected_since=time.time(),
                            connects=previous.connects + 1,
                        )
                    },
                    observed_address=str(hello.get("address")),
                    server=str(hello.get("server")),
                )
                return link, hello
            except (OSError, trio.TooSlowError, trio.BrokenResourceError, DiscoveryError) as e:
                text = f"{endpoint}: {_describe(e)}"
                errors.append(text)
                self._link_error(which, endpoint, text)
                if link is not None:
                    await link.aclose()
        self._next = (self._next + 1) % len(self.endpoints)
        raise DiscoveryUnavailable("; ".join(errors))

    def _sign(self, link: _Link, message: dict[str, Any]) -> dict[str, Any]:
        seq = next(link.seq)
        signed = proof_message(
            link.nonce,
            seq,
            message["op"],
            self.cluster_id,
            message.get("affiliate", ""),
            message.get("data"),
            tuple(message.get("endpoints", ())),
            message.get("ttl", 0),
        )
        message.update(
            cluster=self.cluster_id, key=self.key.public, seq=seq, sig=self.key.sign(signed)
        )
        return message

    async def _call(self, message: dict[str, Any]) -> Records:
        """One request with failover; returns its reply frames (several for list)."""
        delay = self.backoff_min
        last: DiscoveryError | None = None
        async with self._lock:
            pause: float | None = None  # the service's retry_after, when it gave one
            for attempt in range(self.attempts):
                if attempt:
                    await trio.sleep(pause if pause else delay * (0.5 + random.random()))
                    delay = min(delay * 2, self.backoff_max)
                    pause = None
                try:
                    if self._link is None:
                        self._link, _ = await self._open("requests")
                    link = self._link
                    rid = next(link.ids)
                    frame = self._sign(link, dict(message, id=rid))
                    with trio.fail_after(self.request_timeout):
                        await link.send(frame)
                        replies = [await link.reply(rid)]
                        while replies[-1].get("more") is True:
                            replies.append(await link.reply(rid))
                    return replies
                except DiscoveryError as e:
                    last = e
                    if not isinstance(e, DiscoveryUnavailable):
                        if not e.retryable:
                            raise
                        if e.code == p.E_RATE_LIMITED:
                            pause = e.retry_after  # the same service, once it has a token
                            continue
                    await self._drop_link(str(e))
                except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
                    last = DiscoveryUnavailable(_describe(e))
                    await self._drop_link(_describe(e))
        assert last is not None
        raise last

    async def _drop_link(self, error: str) -> None:
        link, self._link = self._link, None
        if link is not None:
            self._link_error("requests", link.endpoint, f"{link.endpoint}: {error}")
            await link.aclose()
            self._next = (self.endpoints.index(link.endpoint) + 1) % len(self.endpoints)

    # requests -----------------------------------------------------------------------------

    async def hello(self) -> HelloInfo:
        """Connect (if needed) and return what the service's hello said."""
        async with self._lock:
            if self._link is not None:
                await self._link.aclose()
                self._link = None
            self._link, hello = await self._open("requests")
        return HelloInfo(
            str(hello.get("address")),
            int(hello.get("port", 0)),
            str(hello.get("server")),
            int(hello.get("version", 0)),
        )

    async def update(
        self,
        affiliate_id: str,
        data: bytes | None,
        endpoints: Sequence[tuple[str, int]],
        ttl: float,
    ) -> None:
        """Seal and publish: data replaces ours when given; endpoints merge; ``ttl``
        seconds (1..1800, rounded up) until the service forgets what was not refreshed."""
        sealed = None if data is None else self.sealer.seal_data(affiliate_id, data)
        blobs = [self.sealer.seal_endpoint(affiliate_id, ip, port) for ip, port in endpoints]
        await self.update_blobs(affiliate_id, sealed, blobs, ttl)

    async def update_blobs(
        self, affiliate_id: str, data: bytes | None, endpoints: Sequence[bytes], ttl: float
    ) -> None:
        """``update`` with blobs already sealed (or deliberately not: tests, benchmarks)."""
        await self._call(
            {
                "op": "update",
                "affiliate": affiliate_id,
                "data": data,
                "endpoints": list(endpoints),
                "ttl": max(1, math.ceil(ttl)),
            }
        )

    async def delete(self, affiliate_id: str) -> None:
        await self._call({"op": "delete", "affiliate": affiliate_id})

    async def list(self) -> Affiliates:
        replies = await self._call({"op": "list"})
        return [self._open_record(r) for reply in replies for r in _records(reply)]

    async def list_raw(self) -> Records:
        """The wire records (sealed blobs), for tools and tests."""
        replies = await self._call({"op": "list"})
        return [r for reply in replies for r in _records(reply)]

    def _open_record(self, record: dict[str, Any]) -> Affiliate:
        aid = str(record.get("id"))
        data = None
        bad = 0
        if isinstance(record.get("data"), bytes):
            try:
                data = self.sealer.open_data(aid, record["data"])
            except SealError:
                bad += 1
        endpoints = []
        blobs = record.get("endpoints")
        for blob in blobs if isinstance(blobs, list) else ():
            try:
                if not isinstance(blob, bytes):  # a broken service (fuzz/discovery_client.py)
                    raise SealError("an endpoint that is not bin")
                endpoints.append(self.sealer.open_endpoint(aid, blob))
            except SealError:
                bad += 1
        if bad:
            self._set(undecryptable=self._status.undecryptable + bad)
        return Affiliate(aid, data, tuple(endpoints))

    # watch --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[trio.MemoryReceiveChannel[WatchEvent]]:
        """A channel of events that survives reconnects (each starts with a Snapshot)."""
        send, receive = trio.open_memory_channel[WatchEvent](WATCH_BUFFER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_loop, send)
            try:
                yield receive
            finally:
                nursery.cancel_scope.cancel()
                self._set(watching=False, watch=replace(self._status.watch, connected=False))

    async def _watch_loop(self, send: trio.MemorySendChannel[WatchEvent]) -> None:
        delay = self.backoff_min
        async with send:
            while True:
                link = None
                try:
                    link, _ = await self._open("watch")
                    rid = next(link.ids)
                    await link.send(self._sign(link, {"op": "watch", "id": rid}))
                    records = []
                    while True:
                        reply = await link.reply(rid)
                        records.extend(_records(reply))
                        if reply.get("more") is not True:
                            break
                    self._set(watching=True)
                    await send.send(Snapshot(tuple(self._open_record(r) for r in records)))
                    delay = self.backoff_min
                    while True:
                        event = await link.reply(rid)
                        if event.get("event") == "update":
                            record = event.get("affiliate")
                            if isinstance(record, dict):
                                await send.send(Updated(self._open_record(record)))
                        elif event.get("event") == "delete":
                            await send.send(Deleted(str(event.get("affiliate_id"))))
                except (DiscoveryError, OSError, trio.BrokenResourceError) as e:
                    where = link.endpoint if link else None
                    self._link_error(
                        "watch", where, f"{where}: {_describe(e)}" if where else _describe(e)
                    )
                    self._set(watching=False)
                    if link is not None:
                        self._next = (self.endpoints.index(link.endpoint) + 1) % len(self.endpoints)
                finally:
                    if link is not None:
                        await link.aclose()
                await trio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.backoff_max)


def _retry_after(message: dict[str, Any]) -> float | None:
    """The service's ``retry_after``, within 0..BACKOFF_MAX: a service (hostile, or broken)
    must not make the client wait for ever (found by fuzz/discovery_client.py)."""
    after = message.get("retry_after")
    if not isinstance(after, int | float) or isinstance(after, bool) or math.isnan(after):
        return None
    return min(max(float(after), 0.0), BACKOFF_MAX)


def _records(reply: dict[str, Any]) -> Records:
    records = reply.get("affiliates")
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    return str(error) or type(error).__name__
