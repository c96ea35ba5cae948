"""The node's link to its relay: registration (``uspan.relay.session``) over UDP from the
WireGuard socket or over TCP, and the translation between the core's pseudo-endpoints
and relay frames (``uspan.relay.addressing``).

Outbound, the daemon's ``outbound`` hook turns every datagram for a pseudo-endpoint into
a SEND frame to the relay: on the WireGuard socket (UDP) or on the TCP connection.
Inbound, DELIVER frames arrive through the daemon's demux (UDP) or the TCP reader and
reach the core as datagrams from the sender's pseudo-endpoint. Frames that do not come
from the relay's address are dropped and counted.

A handshake initiation for a relayed peer is also sent to the peer's direct endpoints:
if one of them works now, the peer answers there, both cores roam to the direct path
and the relay drops out without a lost packet.

The TCP connection runs while the session is on TCP. A connection the session finds
dead is closed and another opened; when UDP works again the connection is left to drain
for DRAIN seconds (its queued frames written, what the relay had queued for it read) so
the switch loses nothing.
"""

from __future__ import annotations

import logging
import math
import socket
import struct

import trio

from uspan.daemon.daemon import Daemon
from uspan.daemon.demux import Datagram
from uspan.discovery.proof import MemberKey
from uspan.relay import frames
from uspan.relay.addressing import is_relayed, pseudo_endpoint, relay_address
from uspan.relay.session import Out, RelaySession, Transport
from uspan.relay.stream import write_frames
from uspan.wg.endpoint import Endpoint

log = logging.getLogger("uspan.node.relay")
TCP_OUTBOX = 512  # frames queued for the TCP connection before they are dropped
TCP_RETRY = 1.0
DRAIN = 5.0  # seconds a TCP connection left for UDP is still read (< forwarding.GRACE)
_INITIATION = (1, 148)  # WireGuard handshake initiation: type and size


class RelayLink:
    """See the module docstring; ``install`` then ``run`` in the daemon's nursery."""

    def __init__(self, daemon: Daemon, relay: Endpoint, key: MemberKey, address: bytes,
                 fwmark: int) -> None:
        self.daemon = daemon
        self.relay = relay
        self.session = RelaySession(key, address)
        self.fwmark = fwmark
        self.direct: dict[bytes, tuple[Endpoint, ...]] = {}  # relay address -> endpoints
        self.counters = {"sent": 0, "sent_bytes": 0, "received": 0, "received_bytes": 0,
                         "not_from_relay": 0, "tcp_backlog": 0}
        self._pseudo: dict[bytes, Endpoint] = {}
        self._outbox: Out = []
        self._wake = trio.Event()
        self._tcp: trio.MemorySendChannel[bytes] | None = None  # the connection in use
        self._serving: trio.CancelScope | None = None  # ... and its scope

    def install(self) -> None:
        demux = self.daemon.demux
        demux.register(frames.DELIVER, self._deliver)
        demux.register(frames.CHALLENGE, self._control)
        demux.register(frames.REGISTERED, self._control)
        self.daemon.outbound = self._outbound
        self.daemon.owner_stats.append(self.stats)

    def stats(self) -> dict[str, int]:
        """For ``uspan stats`` and the metrics: datagrams and bytes relayed each way, what
        was dropped, the transport and its changes."""
        session = self.session
        counters = {f"relay_{name}": value for name, value in self.counters.items()}
        counters.update(relay_bad_control=session.dropped,
                        relay_tcp=int(session.transport is Transport.TCP),
                        relay_registered=int(session.registered(trio.current_time())),
                        relay_fallbacks=session.fallbacks, relay_udp_returns=session.udp_returns,
                        relay_reconnects=session.reconnects)
        return counters

    # Datagrams ---------------------------------------------------------------------------

    def _from_relay(self, source: Endpoint) -> bool:
        if source.address == self.relay.address:
            return True
        self.counters["not_from_relay"] += 1
        return False

    def _deliver(self, data: bytes, source: Endpoint) -> Datagram | None:
        if not self._from_relay(source):
            return None
        return self._unwrap(data, None)

    def _unwrap(self, data: bytes, connection: int | None) -> Datagram | None:
        """A DELIVER frame as a datagram from the sender's pseudo-endpoint; ``connection``
        is the TCP connection's number it came on, None for UDP."""
        if len(data) <= frames.TAG + frames.ADDRESS:
            self.session.dropped += 1
            return None
        address = data[frames.TAG:frames.TAG + frames.ADDRESS]
        endpoint = self._pseudo.get(address)
        if endpoint is None:
            if len(self._pseudo) >= 4096:
                self._pseudo.clear()
            endpoint = self._pseudo[address] = pseudo_endpoint(address, self.relay)
        datagram = data[frames.TAG + frames.ADDRESS:]
        self.counters["received"] += 1
        self.counters["received_bytes"] += len(datagram)
        self.session.delivered(trio.current_time(), connection)
        return datagram, endpoint

    def _control(self, data: bytes, source: Endpoint) -> None:
        if self._from_relay(source):
            self._queue(self.session.receive(data, trio.current_time()), Transport.UDP)
        return None

    def rebound(self) -> None:
        """The WireGuard socket moved to another port: register again at once, so the
        relay delivers to the new port's mapping rather than the old one."""
        self.session.rebound(trio.current_time())
        self._wake.set()

    def _queue(self, control: list[bytes], via: Transport) -> None:
        if control:
            self._outbox.extend((frame, via) for frame in control)
            self._wake.set()

    def _outbound(self, datagrams: list[Datagram]) -> list[Datagram]:
        out: list[Datagram] = []
        udp = self.session.transport is Transport.UDP
        relayed = False
        for data, endpoint in datagrams:
            if not is_relayed(endpoint):
                out.append((data, endpoint))
                continue
            address = relay_address(endpoint)
            if (data[0], len(data)) == _INITIATION:  # direct first: it should win the race
                out.extend((data, direct) for direct in self.direct.get(address, ()))
            frame = frames.send_frame(address, data)
            self.counters["sent"] += 1
            self.counters["sent_bytes"] += len(data)
            relayed = True
            if udp:
                out.append((frame, self.relay))
            else:
                self._to_tcp(frame)
        if relayed and self.session.silent_since is None:
            self.session.sent(trio.current_time())
            self._wake.set()  # the run loop's deadline moved
        return out

    # Registration and transports ---------------------------------------------------------

    async def run(self) -> None:
        """Keep registered; run the TCP connection while the session is on TCP."""
        async with trio.open_nursery() as nursery:
            tcp: trio.CancelScope | None = None
            while True:
                self._wake = trio.Event()  # what is set from here on wakes the wait below
                now = trio.current_time()
                control = self.session.tick(now) + self._outbox
                self._outbox = []
                if self.session.transport is Transport.TCP:
                    if tcp is None:
                        tcp = await nursery.start(self._tcp_connection)
                        log.info("relay %s: UDP unanswered, using TCP", self.relay)
                    elif not self.session.connected and self._serving is not None:
                        log.info("relay %s: the TCP connection does not answer, replacing it",
                                 self.relay)
                        self._serving.cancel()
                elif tcp is not None:
                    log.info("relay %s: UDP answers again, leaving TCP", self.relay)
                    self._drain_tcp(tcp, now)
                    tcp = None
                await self._send_control(control)
                with trio.move_on_at(self.session.next_deadline()):
                    await self._wake.wait()

    async def _send_control(self, control: Out) -> None:
        udp = [(frame, self.relay) for frame, via in control if via is Transport.UDP]
        if udp:
            await self.daemon.send_datagrams(udp)
        for frame, via in control:
            if via is Transport.TCP:
                self._to_tcp(frame)

    def _to_tcp(self, frame: bytes) -> None:
        """Queue a frame for the TCP connection; with none (yet) or a full queue, lost."""
        try:
            if self._tcp is None:
                raise trio.WouldBlock
            self._tcp.send_nowait(frame)
        except (trio.WouldBlock, trio.BrokenResourceError):
            self.counters["tcp_backlog"] += 1

    def _drain_tcp(self, scope: trio.CancelScope, now: float) -> None:
        """Send nothing more on the connection, let it write what is queued and read
        what the relay still sends on it for DRAIN seconds, then close it."""
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        self._serving = None
        scope.deadline = min(scope.deadline, now + DRAIN)

    async def _tcp_connection(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        """Connect (again after a failure) while the session is on TCP; frames both ways.
        ``run`` cancels the scope, or gives it a deadline to drain: a connection left to
        drain that ends early is not replaced (its successor is ``run``'s business)."""
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while self.session.transport is Transport.TCP and math.isinf(scope.deadline):
                try:
                    stream = await self._connect()
                except OSError as exc:
                    log.debug("relay %s over TCP: %s", self.relay, exc)
                else:
                    # Back on UDP meanwhile, or left to drain while connecting: a
                    # successor (if any) is run's, and this one must not take its place.
                    if (self.session.transport is not Transport.TCP
                            or not math.isinf(scope.deadline)):
                        await stream.aclose()
                        return
                    await self._serve_tcp(stream)
                await trio.sleep(TCP_RETRY)

    async def _connect(self) -> trio.abc.Stream:
        sock = trio.socket.socket(self.relay.family, socket.SOCK_STREAM)
        try:
            if self.fwmark:  # around the mesh, like the WireGuard socket
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK,
                                struct.pack("=I", self.fwmark))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with trio.fail_after(5):
                await sock.connect(self.relay.address)
        except (OSError, trio.TooSlowError) as exc:
            sock.close()
            raise OSError(f"cannot connect: {exc}") from None
        return trio.SocketStream(sock)

    async def _serve_tcp(self, stream: trio.abc.Stream) -> None:
        send, receive = trio.open_memory_channel[bytes](TCP_OUTBOX)
        self._tcp = send
        connection = self.session.tcp_connected(trio.current_time())  # register on it
        self._wake.set()
        with trio.CancelScope() as serving:
            self._serving = serving
            try:
                async with stream, trio.open_nursery() as nursery:
                    nursery.start_soon(write_frames, stream, receive)
                    await self._tcp_reader(stream, connection)
                    nursery.cancel_scope.cancel()
            finally:
                if self._tcp is send:
                    self._tcp = None
                if self._serving is serving:
                    self._serving = None
        self.session.tcp_closed(connection)  # (not when the link itself is cancelled)
        self._wake.set()

    async def _tcp_reader(self, stream: trio.abc.Stream, connection: int) -> None:
        decoder = frames.StreamDecoder()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                await self._tcp_frames(decoder.feed(data), connection)
        except (frames.FrameError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("relay %s over TCP: %s", self.relay, exc)

    async def _tcp_frames(self, received: list[bytes], connection: int) -> None:
        batch: list[Datagram] = []
        for frame in received:
            if frame[:frames.TAG] == frames.DELIVER:
                datagram = self._unwrap(frame, connection)
                if datagram is not None:
                    batch.append(datagram)
            else:
                self._queue(self.session.receive(frame, trio.current_time(), connection),
                            Transport.TCP)
        if batch:
            await self.daemon.receive_datagrams(batch)
