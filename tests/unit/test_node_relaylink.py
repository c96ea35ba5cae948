"""The node's relay link on real ``Daemon``s with in-memory ports and a real
``Forwarder``, under MockClock: the core reaches a peer through pseudo-endpoints, the
link turns them into relay frames and back, and a direct path takes over by roaming."""

from __future__ import annotations

import pytest
import trio

from tests.unit.test_daemon_memory import Node, run
from tests.unit.wgnet import ipv4_packet
from uspan.daemon import daemon as daemon_module
from uspan.daemon.memory import MemoryBind, MemoryNetwork
from uspan.discovery.proof import MemberKey
from uspan.node.relaylink import RelayLink
from uspan.relay import frames
from uspan.relay.addressing import RelayAddresses, pseudo_endpoint
from uspan.relay.forwarding import Forwarder
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
