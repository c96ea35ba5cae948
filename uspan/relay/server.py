"""The relay's trio shell: one UDP socket and a TCP listener on the same port, moving
frames through a ``Forwarder``; metrics for Prometheus.

UDP is the normal transport. TCP is the fallback for nodes whose UDP is blocked: the
same frames, each preceded by its u16 length, and a registration lives as long as its
connection (and its lifetime). A frame for a TCP client whose outbox is full is dropped
and counted (``tcp_backlog``), like a datagram lost on the way: WireGuard copes.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Iterator

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from uspan.errors import listening
from uspan.relay import frames
from uspan.relay.forwarding import BAD_FRAME, Forwarder, Out, Source
from uspan.relay.stream import write_frames

log = logging.getLogger("uspan.relay")
UDP_BATCH = 64  # datagrams read per wake-up
TCP_OUTBOX = 256  # frames queued for one TCP client
TCP_IDLE = 90.0  # seconds without a frame before a connection is closed
MAX_TCP_CLIENTS = 4096
EXPIRE_INTERVAL = 10.0
SOCKET_BUFFER = 4 << 20
TCP_BACKLOG = "tcp_backlog"  # drop reasons of the shell: outboxes full
UDP_BACKLOG = "udp_backlog"
_now = trio.current_time


PORT_TRIES = 16  # port 0: ephemeral UDP ports tried until TCP's same number is free too


async def _bind_both(host: str, port: int) -> tuple[socket.socket, list[trio.SocketListener]]:
    """A UDP socket and TCP listeners on one port. With port 0 the kernel picks the UDP
    port, whose TCP twin may be taken by another program: then another is tried, the
    refused ones held until the end so that the kernel cannot pick them again."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    refused: list[socket.socket] = []
    try:
        while True:
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.setblocking(False)
                for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                    udp.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
                with listening("relay, UDP", host, port):
                    udp.bind((host, port))
                chosen = udp.getsockname()[1]
                with listening("relay, TCP", host, chosen):
                    return udp, await trio.open_tcp_listeners(chosen, host=host)
            except OSError as exc:
                retry = not port and exc.errno == errno.EADDRINUSE and len(refused) < PORT_TRIES
                if not retry or not udp.getsockname()[1]:
                    udp.close()
                    raise
                refused.append(udp)
            except BaseException:
                udp.close()
                raise
    finally:
        for each in refused:
            each.close()


class RelayServer:
    """Serve ``Forwarder`` over UDP and TCP on one address."""

    def __init__(self, forwarder: Forwarder | None = None) -> None:
        self.forwarder = Forwarder() if forwarder is None else forwarder
        self.tcp: dict[int, trio.MemorySendChannel[bytes]] = {}
        self._next_connection = 0
        self._udp: socket.socket | None = None
        self.port = 0

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on HOST:PORT (UDP and TCP; port 0 picks one free for both)."""
        udp, listeners = await _bind_both(host, port)
        self.port = udp.getsockname()[1]
        self._udp = udp
        with udp:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._udp_loop, udp)
                nursery.start_soon(trio.serve_listeners, self._tcp_client, listeners)
                nursery.start_soon(self._expire_loop)
                log.info("relay on %s port %d (UDP and TCP)", host, self.port)
                task_status.started(self.port)

    async def _udp_loop(self, udp: socket.socket) -> None:
        forwarder = self.forwarder
        while True:
            await trio.lowlevel.wait_readable(udp)
            now = _now()
            for _ in range(UDP_BATCH):
                try:
                    data, address = udp.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue  # an ICMP error reported for an earlier send
                self._send(forwarder.receive(data, (address[0], address[1]), now))

    def _send(self, out: Out) -> None:
        assert self._udp is not None
        for frame, target in out:
            if isinstance(target, int):
                channel = self.tcp.get(target)
                if channel is None:
                    continue
                try:
                    channel.send_nowait(frame)
                except trio.WouldBlock:
                    self.forwarder.dropped[TCP_BACKLOG] += 1
                except trio.BrokenResourceError:
                    pass
            else:
                try:
                    self._udp.sendto(frame, target)
                except BlockingIOError:
                    self.forwarder.dropped[UDP_BACKLOG] += 1
                except OSError:
                    pass  # unreachable: the node will register again

    async def _tcp_client(self, stream: trio.SocketStream) -> None:
        if len(self.tcp) >= MAX_TCP_CLIENTS:
            await stream.aclose()
            return
        self._next_connection += 1
        connection = self._next_connection
        source: Source = connection
        send, receive = trio.open_memory_channel[bytes](TCP_OUTBOX)
        self.tcp[connection] = send
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(write_frames, stream, receive)
                await self._tcp_reader(stream, source)
                nursery.cancel_scope.cancel()
        finally:
            del self.tcp[connection]
            self.forwarder.forget(source)

    async def _tcp_reader(self, stream: trio.SocketStream, source: Source) -> None:
        """Frames from one connection until it closes, idles or breaks the framing."""
        decoder = frames.StreamDecoder()
        try:
            while True:
                with trio.move_on_after(TCP_IDLE) as idle:
                    data = await stream.receive_some(65536)
                if idle.cancelled_caught or not data:
                    return
                now = _now()
                for frame in decoder.feed(data):
                    self._send(self.forwarder.receive(frame, source, now))
        except frames.FrameError:
            self.forwarder.dropped[BAD_FRAME] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(EXPIRE_INTERVAL)
            self.forwarder.expire(_now())


class RelayCollector(Collector):
    """The relay's counters at scrape time."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        forwarder = self.server.forwarder
        yield GaugeMetricFamily("uspan_relay_registrations", "Live registrations",
                                forwarder.addresses)
        yield GaugeMetricFamily("uspan_relay_tcp_clients", "Open TCP connections",
                                len(self.server.tcp))
        yield CounterMetricFamily("uspan_relay_forwarded_frames", "Datagrams forwarded",
                                  forwarder.forwarded)
        yield CounterMetricFamily("uspan_relay_forwarded_bytes", "Payload bytes forwarded",
                                  forwarder.forwarded_bytes)
        yield CounterMetricFamily("uspan_relay_registered", "Registrations accepted",
                                  forwarder.registrations)
        dropped = CounterMetricFamily("uspan_relay_dropped_frames", "Frames dropped by reason",
                                      labels=["reason"])
        for reason, count in sorted(forwarder.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
