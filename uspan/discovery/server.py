"""The discovery service: a trio TCP server speaking ``protocol`` in front of a ``Backend``.

One task pair per connection: the reader decodes frames and serves requests in order;
the writer drains the connection's outbox. A connection that breaks the protocol gets
one error frame and is closed; nothing it sent is applied and nobody else notices. A
watcher whose outbox holds WATCH_BACKLOG unsent events is cut off with
``watch_overflow`` (re-subscribe), so one slow reader never holds memory or others back.
Timeouts: hello within HELLO_TIMEOUT, a started frame within FRAME_TIMEOUT (slow loris),
no request for IDLE_TIMEOUT without a watch, a stalled write for WRITE_TIMEOUT.
Logs name clusters by a short hash and never carry blob contents.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import trio

from uspan import __version__
from uspan.discovery import protocol as p
from uspan.discovery.backend import Backend, BackendError
from uspan.discovery.proof import ProofChecker, ProofError, ReplayError
from uspan.discovery.store import LimitError
from uspan.errors import listening
from uspan.wg.ratelimit import RateLimiter

log = logging.getLogger("uspan.discovery")

SERVER_NAME = f"uspan-discovery/{__version__}"
HELLO_TIMEOUT = 10.0
FRAME_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
WRITE_TIMEOUT = 30.0
WATCH_BACKLOG = 32
OUTBOX_LIMIT = 256  # frames queued for a client that does not read
MAX_CONNECTIONS_PER_IP = 256
READ_SIZE = 65536
SEND_BATCH = 65536


def tag(cluster: str) -> str:
    """A log-safe short name for a cluster ID."""
    return hashlib.sha256(cluster.encode()).hexdigest()[:12]


@dataclass
class Limits:
    rate: float = 15.0
    burst: int = 60
    hello_timeout: float = HELLO_TIMEOUT
    frame_timeout: float = FRAME_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT
    write_timeout: float = WRITE_TIMEOUT
    watch_backlog: int = WATCH_BACKLOG
    max_connections_per_ip: int = MAX_CONNECTIONS_PER_IP


class Stats:
    """What ``--metrics`` exports; also handy in tests."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.connections = 0


class _Close(Exception):
    """End this connection (after flushing what is queued)."""


class _Watch:
    """A connection's subscription; the Hub calls push/end synchronously."""

    def __init__(self, conn: _Connection, rid: int, cluster: str) -> None:
        self.conn = conn
        self.rid = rid
        self.cluster = cluster
        self.pending = 0
        self.active = True

    def push(self, event: p.Packed) -> None:
        if not self.active:
            return
        if self.pending >= self.conn.server.limits.watch_backlog:
            self.end(p.E_WATCH_OVERFLOW, f"{self.pending} events unread: watch ended, re-subscribe")
            return
        self.pending += 1
        self.conn.queue(event.frame(self.rid), self)

    def end(self, code: str, message: str) -> None:
        if not self.active:
            return
        self.active = False
        self.conn.server.backend.unsubscribe(self)
        if self.conn.watch is self:
            self.conn.watch = None
        self.conn.refuse(self.rid, code, message)


class _Connection:
    def __init__(self, server: Server, stream: trio.SocketStream, ip: str, port: int) -> None:
        self.server = server
        self.stream = stream
        self.ip = ip
        self.port = port
        self.decoder = p.FrameDecoder()
        self.proof = ProofChecker(os.urandom(p.NONCE_SIZE))
        self.hello = False
        self.watch: _Watch | None = None
        self.outbox: deque[tuple[bytes, _Watch | None]] = deque()
        self.wakeup = trio.Event()
        self.closing = False
        self.frame_started: float | None = None

    # outgoing -------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        if len(self.outbox) >= OUTBOX_LIMIT:
            self.fatal(p.E_OUTBOX_FULL, "too many replies unread")
            return
        self.queue(p.encode(message), None)

    def queue(self, frame: bytes, watch: _Watch | None) -> None:
        """Queue a frame (watch frames are bounded by the watch backlog instead)."""
        if self.closing:
            return
        self.outbox.append((frame, watch))
        self.wakeup.set()

    def refuse(self, rid: int, code: str, message: str, **fields: Any) -> None:
        self.server.stats.refusals[code] += 1
        self.send(p.error(rid, code, message, **fields))

    def fatal(self, code: str, message: str, rid: int = 0) -> None:
        """Queue one last error frame; the writer closes the connection after it."""
        if self.closing:
            return
        self.server.stats.refusals[code] += 1
        frame = p.encode(p.error(rid, code, message))
        self.outbox.append((frame, None))
        self.closing = True
        self.wakeup.set()

    async def writer(self, done: trio.CancelScope) -> None:
        try:
            while True:
                while self.outbox:
                    # what is queued in one send (up to SEND_BATCH bytes): fewer syscalls
                    # and wakeups, and no copy of a long snapshot at once
                    batch = [self.outbox.popleft()]
                    size = len(batch[0][0])
                    while self.outbox and size + len(self.outbox[0][0]) <= SEND_BATCH:
                        batch.append(self.outbox.popleft())
                        size += len(batch[-1][0])
                    with trio.fail_after(self.server.limits.write_timeout):
                        await self.stream.send_all(b"".join(frame for frame, _ in batch))
                    for _, watch in batch:
                        if watch is not None:
                            watch.pending -= 1
                if self.closing:
                    return
                await self.wakeup.wait()
                self.wakeup = trio.Event()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            done.cancel()

    # incoming -------------------------------------------------------------------------

    def _read_deadline(self, started: float) -> float:
        limits = self.server.limits
        now = trio.current_time()
        if not self.hello:
            return started + limits.hello_timeout
        if self.frame_started is not None:  # from the frame's first byte: dribbling
            return self.frame_started + limits.frame_timeout  # does not extend it
        if self.watch is not None:
            return math.inf
        return now + limits.idle_timeout

    async def reader(self) -> None:
        started = trio.current_time()
        while not self.closing:
            with trio.move_on_at(self._read_deadline(started)) as timer:
                try:
                    data = await self.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if timer.cancelled_caught:
                self.fatal(p.E_TIMEOUT, "no complete request in time")
                return
            if not data:
                return
            try:
                messages = self.decoder.feed(data)
            except p.ProtocolError as e:
                self.fatal(e.code, e.message)
                return
            if not self.decoder.partial:
                self.frame_started = None
            elif self.frame_started is None or messages:
                self.frame_started = trio.current_time()
            for message in messages:
                try:
                    await self.serve(message)
                except p.ProtocolError as e:
                    self.fatal(e.code, e.message, p.request_id(message))
                    return
                if self.closing:
                    return

    async def serve(self, message: dict[str, Any]) -> None:
        server = self.server
        request = p.parse_request(message)
        op = p.op_name(request)
        server.stats.requests[op] += 1
        if not server.buckets.allow(self.ip, time.monotonic()):
            self.refuse(
                request.id,
                p.E_RATE_LIMITED,
                f"over {server.limits.rate:g} requests/s (burst {server.limits.burst})",
                retry_after=round(server.buckets.wait(self.ip), 3),
            )
            return
        if isinstance(request, p.Hello):
            if request.version != p.VERSION:
                raise p.ProtocolError(
                    p.E_UNSUPPORTED_VERSION,
                    f"version {request.version}; this service speaks {p.VERSION}",
                )
            self.hello = True
            self.send(
                p.ok(
                    request.id,
                    version=p.VERSION,
                    server=SERVER_NAME,
                    address=self.ip,
                    port=self.port,
                    nonce=self.proof.nonce,
                )
            )
            return
        if not self.hello:
            raise p.ProtocolError(p.E_HELLO_REQUIRED, "the first request must be hello")
        try:
            self.proof.check(request)
        except ReplayError as e:
            self.refuse(request.id, p.E_REPLAYED, str(e))
            return
        except ProofError as e:
            self.refuse(request.id, p.E_BAD_PROOF, str(e))
            return
        key = request.proof.key
        try:
            if isinstance(request, p.Update):
                await server.backend.update(
                    request.cluster,
                    key,
                    request.affiliate,
                    request.data,
                    request.endpoints,
                    request.ttl,
                )
                self.send(p.ok(request.id))
            elif isinstance(request, p.Delete):
                await server.backend.delete(request.cluster, key, request.affiliate)
                self.send(p.ok(request.id))
            elif isinstance(request, p.List):
                records = await server.backend.list(request.cluster, key)
                self._send_records(request.id, records)
            else:
                await self._subscribe(request, key)
        except LimitError as e:
            self.refuse(request.id, e.code, e.message)
            log.debug("refused %s for cluster %s: %s", op, tag(request.cluster), e.code)
        except BackendError as e:
            self.refuse(request.id, e.code, e.message)

    def _send_records(self, rid: int, records: list[dict[str, Any]], **fields: Any) -> None:
        groups = p.chunk_records(records)
        for i, group in enumerate(groups):
            self.send(p.ok(rid, affiliates=group, more=i < len(groups) - 1, **fields))

    async def _subscribe(self, request: p.Watch, key: bytes) -> None:
        if self.watch is not None:
            self.refuse(request.id, p.E_WATCH_ACTIVE, "one watch per connection")
            return
        watch = _Watch(self, request.id, request.cluster)
        snapshot = await self.server.backend.subscribe(watch, key)
        self.watch = watch
        self._send_records(request.id, snapshot, event="snapshot")


class Server:
    """Accepts connections on one listener and serves them from ``backend``."""

    def __init__(self, backend: Backend, limits: Limits | None = None) -> None:
        self.backend = backend
        self.limits = limits or Limits()
        self.buckets = RateLimiter(rate=self.limits.rate, burst=self.limits.burst)
        self.stats = Stats()
        self.per_ip: Counter[str] = Counter()
        self.connections: set[_Connection] = set()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the backend, listen, serve until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.backend.run)
            with listening("TCP", host, port):
                listeners = await trio.open_tcp_listeners(port, host=host)
            for listener in listeners:
                address = listener.socket.getsockname()
                log.info("discovery service listening on %s port %d", address[0], address[1])
            task_status.started(listeners)
            await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:
            return
        ip, port = str(peer[0]), int(peer[1])
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        conn = _Connection(self, stream, ip, port)
        self.per_ip[ip] += 1
        self.stats.connections += 1
        self.connections.add(conn)
        try:
            if self.per_ip[ip] > self.limits.max_connections_per_ip:
                conn.fatal(
                    p.E_TOO_MANY_CONNECTIONS,
                    f"more than {self.limits.max_connections_per_ip} from {ip}",
                )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(conn.writer, nursery.cancel_scope)
                await conn.reader()
                conn.closing = True
                conn.wakeup.set()  # the writer flushes what is queued, then ends
                with trio.move_on_after(self.limits.write_timeout):
                    await trio.sleep_forever()  # until the writer cancels the nursery
                nursery.cancel_scope.cancel()
        except Exception:  # never let one connection take the service down
            log.exception("connection from %s failed", ip)
        finally:
            if conn.watch is not None:
                conn.watch.active = False
                self.backend.unsubscribe(conn.watch)
            self.connections.discard(conn)
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]
            with trio.CancelScope(shield=True):
                await stream.aclose()
