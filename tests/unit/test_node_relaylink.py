"""The node's relay link on real ``Daemon``s with in-memory ports and a real
``Forwarder``, under MockClock: the core reaches a peer through pseudo-endpoints, the
link turns them into relay frames and back, and a direct path takes over by roaming; a
node whose UDP is blocked uses TCP (in-memory streams), replaces a dead connection and
returns to UDP, losing nothing, when UDP works again."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.unit.test_daemon_memory import Node, run
from tests.unit.wgnet import ipv4_packet
from uspan.daemon import daemon as daemon_module
from uspan.daemon.memory import MemoryBind, MemoryNetwork
from uspan.discovery.proof import MemberKey
from uspan.node.relaylink import DRAIN, TCP_RETRY, RelayLink
from uspan.relay import frames
from uspan.relay import session as relay_session
from uspan.relay.addressing import RelayAddresses, pseudo_endpoint
from uspan.relay.forwarding import Forwarder, Out
from uspan.relay.session import Transport
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.endpoint import Endpoint

RELAY = Endpoint("192.0.2.254", 3001)
SECRET, CLUSTER = b"s" * 32, "cluster"


async def serve_relay(bind: MemoryBind, forwarder: Forwarder) -> None:
    while True:
        for data, source in await bind.receive():
            for frame, target in forwarder.receive(data, source.address, trio.current_time()):
                assert isinstance(target, tuple)  # UDP only here
                await bind.send([(frame, Endpoint(*target))])


def link(node: Node) -> RelayLink:
    addresses = RelayAddresses(SECRET, CLUSTER)
    relay_link = RelayLink(node.daemon, RELAY, MemberKey(SECRET, CLUSTER),
                           addresses.of(node.public), fwmark=0)
    relay_link.install()
    return relay_link


class _WallFollowsTrio:
    """``time`` for the daemon whose wall clock moves with MockClock, as a real one moves
    with real time (handshake timestamps must grow between two initiations)."""

    @staticmethod
    def time() -> float:
        return 1.7e9 + trio.current_time()


def test_peers_meet_through_the_relay_then_roam_to_a_direct_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "time", _WallFollowsTrio)

    async def main() -> None:
        network = MemoryNetwork()
        forwarder = Forwarder()
        a = Node(network, "192.0.2.1", "10.0.0.1")
        b = Node(network, "192.0.2.2", "10.0.0.2")
        b_pseudo = pseudo_endpoint(RelayAddresses(SECRET, CLUSTER).of(b.public), RELAY)
        a_peer = a.peer(b)
        a_peer.endpoint = b_pseudo  # cycling picked the relay for b
        a.daemon.set(DeviceChange(peers=[a_peer]))
        b.daemon.set(DeviceChange(peers=[b.peer(a, endpoint=False)]))
        a_link, b_link = link(a), link(b)
        relay_bind = network.bind(*RELAY.address)
        stranger = network.bind("192.0.2.66", 3001)
        async with trio.open_nursery() as nursery, a.daemon.running(), b.daemon.running():
            nursery.start_soon(serve_relay, relay_bind, forwarder)
            a.daemon.start_soon(a_link.run)
            b.daemon.start_soon(b_link.run)
            await trio.sleep(1)  # both registered
            assert len(forwarder.sessions) == 2
            packet = ipv4_packet("10.0.0.1", "10.0.0.2")
            a.tun.inject(packet)
            with trio.fail_after(5):
                assert await b.tun.next_written() == packet
            reply = ipv4_packet("10.0.0.2", "10.0.0.1", b"pong")
            b.tun.inject(reply)  # b roamed to a's pseudo-endpoint
            with trio.fail_after(5):
                assert await a.tun.next_written() == reply
            direct = {(s.source, s.destination) for s in network.sent}
            assert (("192.0.2.1", 51820), ("192.0.2.2", 51820)) not in direct
            roamed = b.daemon.peer_facts()[a.public].endpoint
            assert roamed is not None and roamed.host.startswith("100::")
            # a frame that does not come from the relay is dropped and counted
            junk = frames.DELIVER + bytes(8) + b"\x04junk"
            await stranger.send([(junk, Endpoint(a.host, 51820))])
            await trio.testing.wait_all_tasks_blocked()
            assert a.daemon.stats()["relay_not_from_relay"] == 1
            # a direct path: a's next initiation goes there too; both cores roam to it
            await trio.sleep(1)  # (a responder ignores initiations 20 ms after the last)
            a_link.direct = {a_link.session.address: (), b_link.session.address: (
                Endpoint(b.host, 51820),)}
            a.daemon.set(DeviceChange(peers=[PeerChange(b.public, update_only=True,
                                                        handshake=True)]))
            await trio.sleep(1)
            assert a.daemon.peer_facts()[b.public].endpoint == Endpoint(b.host, 51820)
            assert b.daemon.peer_facts()[a.public].endpoint == Endpoint(a.host, 51820)
            relayed = forwarder.forwarded
            a.tun.inject(packet)
            with trio.fail_after(5):
                assert await b.tun.next_written() == packet
            assert forwarder.forwarded == relayed  # no longer through the relay
            nursery.cancel_scope.cancel()

    run(main)


TCP_LATENCY = 0.05  # the relay reads and writes its TCP connections this much later


class Relay:
    """The relay of the tests: a ``Forwarder`` on a ``MemoryBind`` (UDP) and on in-memory
    streams (TCP, slower than UDP, so frames on the way cross a switch). ``dead`` makes
    every connection silent both ways, as a rebooted NAT does."""

    def __init__(self, network: MemoryNetwork, nursery: trio.Nursery) -> None:
        self.bind = network.bind(*RELAY.address)
        self.forwarder = Forwarder()
        self.nursery = nursery
        self.connections: dict[int, trio.abc.HalfCloseableStream] = {}
        self.dead = False
        nursery.start_soon(self._serve_udp)

    async def _serve_udp(self) -> None:
        while True:
            for data, source in await self.bind.receive():
                await self._send(self.forwarder.receive(data, source.address,
                                                        trio.current_time()))

    async def _send(self, out: Out) -> None:
        for frame, target in out:
            if isinstance(target, tuple):
                await self.bind.send([(frame, Endpoint(*target))])
            elif target in self.connections:
                self.nursery.start_soon(self._write_late, self.connections[target], frame)

    async def _write_late(self, stream: trio.abc.SendStream, frame: bytes) -> None:
        await trio.sleep(TCP_LATENCY)
        if not self.dead:
            with contextlib.suppress(trio.BrokenResourceError):  # closed: lost
                await stream.send_all(frames.stream_frame(frame))

    async def connect(self) -> trio.abc.Stream:
        """What the link's ``_connect`` returns: one end of a new connection."""
        ours, theirs = trio.testing.memory_stream_pair()
        number = len(self.connections) + 1
        self.connections[number] = ours
        self.nursery.start_soon(self._serve_tcp, ours, number)
        return theirs

    async def hang_up(self, number: int) -> None:
        """Connection ``number`` ends from the relay's side (the link reads its end)."""
        await self.connections[number].send_eof()

    async def _serve_tcp(self, stream: trio.abc.Stream, number: int) -> None:
        decoder = frames.StreamDecoder()
        while data := await stream.receive_some(65536):
            await trio.sleep(TCP_LATENCY)
            if not self.dead:
                for frame in decoder.feed(data):
                    await self._send(self.forwarder.receive(frame, number,
                                                            trio.current_time()))
        self.forwarder.forget(number)


def relayed_pair(network: MemoryNetwork) -> tuple[Node, Node, RelayLink, RelayLink]:
    """Nodes a and b, each the other's peer through the relay; a's UDP to it blocked."""
    a = Node(network, "192.0.2.1", "10.0.0.1")
    b = Node(network, "192.0.2.2", "10.0.0.2")
    addresses = RelayAddresses(SECRET, CLUSTER)
    a_peer, b_peer = a.peer(b), b.peer(a)
    a_peer.endpoint = pseudo_endpoint(addresses.of(b.public), RELAY)
    b_peer.endpoint = pseudo_endpoint(addresses.of(a.public), RELAY)
    a.daemon.set(DeviceChange(peers=[a_peer]))
    b.daemon.set(DeviceChange(peers=[b_peer]))
    block_udp(network, a)
    return a, b, link(a), link(b)


def block_udp(network: MemoryNetwork, node: Node) -> None:
    udp = (node.host, 51820)
    network.cut |= {(udp, RELAY.address), (RELAY.address, udp)}


async def start_on_tcp(monkeypatch: pytest.MonkeyPatch, relay: Relay, a_link: RelayLink,
                       b_link: RelayLink) -> None:
    """Run both links; a (UDP blocked) falls back to TCP and registers there."""
    monkeypatch.setattr(a_link, "_connect", relay.connect)
    a_link.daemon.start_soon(a_link.run)
    b_link.daemon.start_soon(b_link.run)
    await trio.sleep(relay_session.ATTEMPTS * relay_session.RETRY + 1)
    assert a_link.session.transport is Transport.TCP and a_link.session.connected
    assert relay.forwarder.addresses == 2


@contextlib.asynccontextmanager
async def both_on_tcp(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[
        tuple[MemoryNetwork, Node, Node, RelayLink, RelayLink, Relay, trio.Nursery]]:
    """``relayed_pair`` running, a on TCP to the relay (``start_on_tcp``); the caller
    cancels the nursery when done."""
    network = MemoryNetwork()
    a, b, a_link, b_link = relayed_pair(network)
    async with trio.open_nursery() as nursery, a.daemon.running(), b.daemon.running():
        relay = Relay(network, nursery)
        await start_on_tcp(monkeypatch, relay, a_link, b_link)
        yield network, a, b, a_link, b_link, relay, nursery


def test_tcp_fallback_a_dead_connection_replaced_and_back_to_udp_without_a_loss(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "time", _WallFollowsTrio)

    async def main() -> None:
        async with both_on_tcp(monkeypatch) as (network, a, b, a_link, _b_link, relay, nursery):

            async def ping_pong(count: int) -> None:
                """a pings b every 0.1 s, b answers each; every one must arrive."""
                for i in range(count):
                    ping = ipv4_packet("10.0.0.1", "10.0.0.2", b"ping%d" % i)
                    a.tun.inject(ping)
                    with trio.fail_after(2):
                        assert await b.tun.next_written() == ping
                    pong = ipv4_packet("10.0.0.2", "10.0.0.1", b"pong%d" % i)
                    b.tun.inject(pong)
                    with trio.fail_after(2):
                        assert await a.tun.next_written() == pong
                    await trio.sleep(0.1)

            await ping_pong(10)
            stats = a.daemon.stats()
            assert stats["relay_tcp"] == 1 and stats["relay_fallbacks"] == 1
            assert stats["relay_sent"] >= 10 and stats["relay_received"] >= 10
            assert stats["relay_sent_bytes"] > stats["relay_sent"] * 32

            # a NAT reboots: the connection goes silent; a new one takes over in bounded time
            relay.dead = True
            died = trio.current_time()
            while a_link.session.reconnects == 0:
                await trio.sleep(0.1)
            noticed = trio.current_time() - died
            tries = relay_session.ATTEMPTS * relay_session.RETRY  # (a try of UDP may come first)
            assert noticed <= relay_session.KEEPALIVE + 2 * tries
            relay.dead = False
            await trio.sleep(TCP_RETRY + 2 * tries)
            assert len(relay.connections) == 2 and a_link.session.registered(trio.current_time())
            await ping_pong(3)
            assert a.daemon.stats()["relay_reconnects"] == 1

            # the firewall rule is lifted: a returns to UDP with traffic flowing both ways,
            # losing none (what was on the way over TCP is still forwarded, and read)
            network.cut.clear()
            dropped = dict(relay.forwarder.dropped)
            await trio.sleep_until(a_link.session.probe_at - 1)
            sent: dict[str, list[bytes]] = {"a": [], "b": []}
            got: dict[str, list[bytes]] = {"a": [], "b": []}

            async def stream(node: Node, name: str, to: Node) -> None:
                for i in range(500):  # for 10 s
                    packet = ipv4_packet(node.address, to.address, b"%s%d" % (name.encode(), i))
                    node.tun.inject(packet)
                    sent[name].append(packet)
                    await trio.sleep(0.02)

            async def collect(node: Node, name: str) -> None:
                while True:
                    got[name].append(await node.tun.next_written())

            async with trio.open_nursery() as traffic:
                traffic.start_soon(collect, a, "a")
                traffic.start_soon(collect, b, "b")
                async with trio.open_nursery() as senders:
                    senders.start_soon(stream, a, "a", b)
                    senders.start_soon(stream, b, "b", a)
                await trio.sleep(1)
                traffic.cancel_scope.cancel()
            assert a_link.session.transport is Transport.UDP
            assert sorted(got["b"]) == sorted(sent["a"]) and sorted(got["a"]) == sorted(sent["b"])
            stats = a.daemon.stats()
            assert stats["relay_tcp"] == 0 and stats["relay_udp_returns"] == 1
            assert stats["relay_tcp_backlog"] == 0
            assert relay.forwarder.dropped == dropped  # nothing from the old connection refused
            nursery.cancel_scope.cancel()

    run(main)


def test_a_draining_connection_that_ends_early_leaves_the_next_one_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """a returns to UDP (connection 1 drains), UDP fails again at once and a falls back
    to a new connection 2; then the relay ends connection 1 before the drain is over.
    Its close was taken for connection 2's: the link cut the working connection 2,
    and connection 1's task, back on TCP, connected again beside its replacement."""
    monkeypatch.setattr(daemon_module, "time", _WallFollowsTrio)

    async def main() -> None:
        async with both_on_tcp(monkeypatch) as (network, a, b, a_link, _b_link, relay, nursery):
            session = a_link.session
            network.cut.clear()
            while session.transport is Transport.TCP:
                await trio.sleep(0.1)
            returned = trio.current_time()
            block_udp(network, a)
            a_link.rebound()  # (the socket moved: a registers over UDP at once, in vain)
            while not session.connected:
                await trio.sleep(0.1)
            assert len(relay.connections) == 2 and trio.current_time() - returned < DRAIN
            await relay.hang_up(1)
            await trio.sleep(TCP_RETRY + 1)
            assert session.connected and session.reconnects == 0
            assert len(relay.connections) == 2
            packet = ipv4_packet("10.0.0.2", "10.0.0.1")
            b.tun.inject(packet)
            with trio.fail_after(2):
                assert await a.tun.next_written() == packet
            nursery.cancel_scope.cancel()

    run(main)


def test_a_connection_left_to_drain_while_connecting_never_serves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection task told to drain while its connect was still under way (a return
    to UDP, then a fall back to a successor) must not serve what it connects: it took
    the successor's place in the link, and when its drain ended nothing served the
    session's connection."""
    monkeypatch.setattr(daemon_module, "time", _WallFollowsTrio)

    async def main() -> None:
        async with both_on_tcp(monkeypatch) as (_network, _a, _b, a_link, _b_link, relay, nursery):
            release = trio.Event()

            async def slow_connect() -> trio.abc.Stream:
                await release.wait()
                return await relay.connect()

            monkeypatch.setattr(a_link, "_connect", slow_connect)
            serving, tcp = a_link._serving, a_link._tcp
            scope = await nursery.start(a_link._tcp_connection)
            a_link._drain_tcp(scope, trio.current_time())  # run's drain, mid-connect
            a_link._serving, a_link._tcp = serving, tcp  # (what the successor holds)
            release.set()
            await trio.sleep(1)
            assert len(relay.connections) == 2  # it connected, then hung up at once
            assert a_link._serving is serving and a_link._tcp is tcp
            assert a_link.session.transport is Transport.TCP and a_link.session.connected
            nursery.cancel_scope.cancel()

    run(main)
