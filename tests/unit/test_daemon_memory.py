"""The daemon as a piece a program owns: real ``Daemon``s on in-memory ports, under
trio's MockClock, so every time below is exact and nothing needs root."""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from tests.unit.wgnet import ipv4_packet, ipv6_packet
from uspan.daemon.daemon import WATCH_INTERVAL, Daemon, _echo_request
from uspan.daemon.memory import MemoryNetwork, MemoryTun
from uspan.daemon.ports import Datagram, TunError, TunGone
from uspan.daemon.tun import BATCH
from uspan.wg import prefix
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.constants import MSG_TRANSPORT
from uspan.wg.crypto import clamp, public_key
from uspan.wg.endpoint import Endpoint

KEEPALIVE_SIZE = 32  # a transport header and an empty sealed payload


class Node:
    def __init__(self, network: MemoryNetwork, host: str, address: str,
                 tun: MemoryTun | None = None) -> None:
        self.host, self.address = host, address
        self.private = clamp(os.urandom(32))
        self.public = public_key(self.private)
        self.tun = MemoryTun() if tun is None else tun
        self.daemon = Daemon(self.tun, network.bind(host, 51820))
        self.daemon.set(DeviceChange(private_key=self.private))

    def peer(self, other: Node, keepalive: int | None = None,
             endpoint: bool = True) -> PeerChange:
        return PeerChange(
            public_key=other.public,
            endpoint=Endpoint(other.host, 51820) if endpoint else None,
            allowed_ips=[prefix.parse(f"{other.address}/32")],
            persistent_keepalive=keepalive)


def run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test, clock=trio.testing.MockClock(autojump_threshold=0))


def pair(network: MemoryNetwork, keepalive: int | None = None,
         b_tun: MemoryTun | None = None) -> tuple[Node, Node]:
    a = Node(network, "192.0.2.1", "10.0.0.1")
    b = Node(network, "192.0.2.2", "10.0.0.2", b_tun)
    a.daemon.set(DeviceChange(peers=[a.peer(b, keepalive)]))
    b.daemon.set(DeviceChange(peers=[b.peer(a, endpoint=False)]))
    return a, b


def test_handshake_and_a_packet_through_in_both_directions():
    async def main():
        network = MemoryNetwork()
        a, b = pair(network)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.daemon.run)
            await nursery.start(b.daemon.run)
            packet = ipv4_packet("10.0.0.1", "10.0.0.2")
            a.tun.inject(packet)
            with trio.fail_after(1):
                assert await b.tun.next_written() == packet
            reply = ipv4_packet("10.0.0.2", "10.0.0.1", b"pong" * 5)
            b.tun.inject(reply)  # b learned a's endpoint from the handshake
            with trio.fail_after(1):
                assert await a.tun.next_written() == reply
            assert trio.current_time() == 0  # no timer was needed
            a.daemon.stop("done")
            b.daemon.stop("done")
        assert a.daemon.exit_code == b.daemon.exit_code == 0
        assert network.binds == {}  # every port given to a daemon is closed by it

    run(main)


ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58
ECHO_REQUEST = {ICMP: 8, ICMPV6: 128}


def with_protocol(packet: bytes, protocol: int, version: int = 4) -> bytes:
    """The packet as ``protocol``; an ICMP one is an echo request."""
    at, header = (9, 20) if version == 4 else (6, 40)
    body = bytes([ECHO_REQUEST.get(protocol, 0)]) + packet[header + 1:]
    return packet[:at] + bytes([protocol]) + packet[at + 1:header] + body
REPLY = ipv4_packet("10.0.0.2", "10.0.0.1", b"pong" * 5)


class EchoTun(MemoryTun):
    """Answers each packet inside the write, as the kernel answers a ping or sends an ACK
    (``answers`` packets each)."""

    def __init__(self, answers: int = 1) -> None:
        super().__init__()
        self.answers = answers

    async def write(self, packets: list[bytes]) -> None:
        await super().write(packets)
        self.inject(*(REPLY for _ in range(len(packets) * self.answers)))


@pytest.mark.parametrize(("protocol", "answers", "senders"), [
    (ICMP, 1, ["_udp_loop"]),
    (UDP, 1, ["_tun_loop"]),  # the kernel does not answer UDP: no read that finds nothing
    (TCP, 1, ["_tun_loop"]),  # ACKs and the data they let out: the TUN task's batches
    # At most a read per packet delivered (none that finds nothing after a lone ping's
    # reply); the TUN task takes the rest.
    (ICMP, 2, ["_udp_loop", "_tun_loop"]),
])
def test_what_the_kernel_answers_inside_the_write_is_sent_by_the_receiving_task(
        protocol, answers, senders):
    """No wake of the TUN task between a ping in and its reply out: on an idle machine
    that wake is an event loop pass and an epoll_wait on the ping's path."""
    async def main():
        network = MemoryNetwork()
        a, b = pair(network, b_tun=EchoTun(answers))
        sent_by: list[str] = []
        deliver = network.deliver

        def recording(source: tuple[str, int], datagrams: list[Datagram]) -> None:
            if source[0] == b.host:
                sent_by.append(trio.lowlevel.current_task().name.rsplit(".", 1)[-1])
            deliver(source, datagrams)

        network.deliver = recording  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await nursery.start(a.daemon.run)
            await nursery.start(b.daemon.run)
            a.tun.inject(with_protocol(ipv4_packet("10.0.0.1", "10.0.0.2"), protocol))
            with trio.fail_after(1):
                for _ in range(answers):
                    assert await a.tun.next_written() == REPLY
            nursery.cancel_scope.cancel()
        assert sent_by == ["_udp_loop", *senders]  # the handshake response, the answers

    run(main)


@pytest.mark.parametrize(("version", "protocol", "echo"), [
    (4, ICMP, True), (4, TCP, False), (4, UDP, False),
    (6, ICMPV6, True), (6, TCP, False), (6, ICMP, False), (6, UDP, False)])
def test_which_packets_are_echo_requests(version, protocol, echo):
    packet = with_protocol(ipv4_packet("10.0.0.1", "10.0.0.2") if version == 4
                           else ipv6_packet("fd00::1", "fd00::2"), protocol, version)
    assert _echo_request(packet) is echo


def test_an_echo_reply_is_not_a_request():
    """The pinging side reads nothing after delivering the reply."""
    reply = with_protocol(ipv4_packet("10.0.0.2", "10.0.0.1"), ICMP)
    assert not _echo_request(reply[:20] + b"\0" + reply[21:])


def test_persistent_keepalive_every_25_seconds_exactly():
    async def main():
        network = MemoryNetwork()
        a, b = pair(network, keepalive=25)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.daemon.run)
            await nursery.start(b.daemon.run)
            await trio.sleep(110)
            nursery.cancel_scope.cancel()
        keepalives = [sent.time for sent in network.sent
                      if sent.source == ("192.0.2.1", 51820) and len(sent.data) == KEEPALIVE_SIZE
                      and sent.data[0] == MSG_TRANSPORT]
        assert keepalives == [0, 25, 50, 75, 100]

    run(main)


def test_owner_tasks_run_beside_the_device_and_stop_with_it():
    async def main():
        network = MemoryNetwork()
        a, _ = pair(network)
        ticks: list[float] = []

        async def controller() -> None:
            while True:
                ticks.append(trio.current_time())
                await trio.sleep(10)

        async with trio.open_nursery() as nursery:
            await nursery.start(a.daemon.run)
            a.daemon.start_soon(controller)
            await trio.sleep(25)
            a.tun.delete()
        assert a.daemon.exit_reason == "interface deleted"
        assert ticks == [0, 10, 20]

    run(main)


def test_stop_before_run_returns_at_once():
    """A program's stop signal may come before the device runs (uspan.signals)."""
    async def main():
        network = MemoryNetwork()
        a, _ = pair(network)
        a.daemon.stop("received SIGTERM")
        assert await a.daemon.run() == 0
        assert a.daemon.exit_reason == "received SIGTERM"

    run(main)


def test_set_listen_port_rebinds_and_traffic_follows():
    async def main():
        network = MemoryNetwork()
        a, b = pair(network)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.daemon.run)
            await nursery.start(b.daemon.run)
            b.daemon.set(DeviceChange(listen_port=51999))
            assert ("192.0.2.2", 51820) not in network.binds
            a.daemon.set(DeviceChange(peers=[PeerChange(
                public_key=b.public, endpoint=Endpoint("192.0.2.2", 51999))]))
            packet = ipv4_packet("10.0.0.1", "10.0.0.2")
            a.tun.inject(packet)
            with trio.fail_after(1):
                assert await b.tun.next_written() == packet
            assert b"listen_port=51999" in b"".join(await b.daemon.get_pieces())
            nursery.cancel_scope.cancel()

    run(main)


def test_owner_waits_for_peer_events_and_reads_facts():
    async def main():
        network = MemoryNetwork()
        a, b = pair(network)
        network.cut.add((("192.0.2.1", 51820), ("192.0.2.2", 51820)))
        async with trio.open_nursery() as nursery:
            await nursery.start(a.daemon.run)
            await nursery.start(b.daemon.run)
            a.tun.inject(ipv4_packet("10.0.0.1", "10.0.0.2"))
            seen = await a.daemon.wait_peer_events(a.daemon.device.peer_events)
            facts = a.daemon.peer_facts()[b.public]
            assert facts.gave_up == trio.current_time() and facts.attempts == 19 + 1
            network.cut.clear()
            a.tun.inject(ipv4_packet("10.0.0.1", "10.0.0.2"))
            await a.daemon.wait_peer_events(seen)
            facts = a.daemon.peer_facts()[b.public]
            assert facts.last_handshake == trio.current_time() and facts.gave_up is None
            nursery.cancel_scope.cancel()

    run(main)


def test_stats_names_are_what_uspan_stats_has_always_printed():
    async def main():
        network = MemoryNetwork()
        a, _ = pair(network)
        return a.daemon.stats()

    stats = trio.run(main)
    assert list(stats) == [f"drop_{name}" for name in (
        "bad_length", "bad_type", "bad_mac1", "cookie_sent", "ratelimited",
        "handshake_failed", "unknown_peer", "stale_initiation", "unknown_index",
        "bad_cookie_reply", "expired_key", "decrypt_failed", "replay", "bad_inner_packet",
        "not_allowed_source", "no_route", "no_endpoint", "no_private_key", "bad_peer_key",
        "staged_overflow", "staged_dropped", "source_limited", "cookie_limited")] + [
        "tun_read_dropped", "tun_write_dropped", "udp_send_errors", "udp_receive_dropped",
        "udp_own_claimed", "udp_own_unclaimed", "tunnel_messages", "udp_socket_drops",
        "udp_backlog_permille", "gate_reads", "gate_handed_up", "gate_cookies",
        "gate_dropped", "sample_keep_ppm", "sample_aim", "sample_target", "sample_drained",
        "sample_arrived"]


def test_running_as_an_async_context_manager():
    async def main():
        network = MemoryNetwork()
        a, b = pair(network)
        async with a.daemon.running(), b.daemon.running():
            packet = ipv4_packet("10.0.0.1", "10.0.0.2")
            a.tun.inject(packet)
            assert await b.tun.next_written() == packet
        assert a.daemon.exit_reason == b.daemon.exit_reason == "owner finished"
        assert network.binds == {}

    run(main)


def test_an_mtu_change_reaches_the_core_within_a_watch_interval():
    async def main():
        network = MemoryNetwork()
        a, _ = pair(network)
        async with a.daemon.running():
            a.tun.set_mtu(1280)
            await trio.sleep(WATCH_INTERVAL + 0.001)  # the watcher's first look is at 1 s
            assert a.daemon.device.mtu == 1280

    run(main)


def test_a_read_after_a_ping_never_overtakes_tun_packets_waiting_to_send() -> None:
    """b's TUN task sealed x1 and waits on a full socket; a ping arrives, and the read
    after it would take x2 (same flow, queued behind x1) and send it first."""

    async def main() -> None:
        network = MemoryNetwork()
        a, b = pair(network)
        async with trio.open_nursery() as nursery:
            await nursery.start(a.daemon.run)
            await nursery.start(b.daemon.run)
            a.tun.inject(ipv4_packet("10.0.0.1", "10.0.0.2"))
            await b.tun.next_written()
            b.tun.inject(ipv4_packet("10.0.0.2", "10.0.0.1"))
            await a.tun.next_written()
            full = trio.Event()
            send = b.daemon.bind.send

            async def gated(datagrams: list[tuple[bytes, Endpoint]]) -> list[Endpoint]:
                if trio.lowlevel.current_task().name.endswith("_tun_loop"):
                    await full.wait()  # the socket is full (EAGAIN) until set
                return await send(datagrams)

            b.daemon.bind.send = gated  # type: ignore[method-assign]
            x1 = with_protocol(ipv4_packet("10.0.0.2", "10.0.0.1", b"1" * 20), TCP)
            x2 = with_protocol(ipv4_packet("10.0.0.2", "10.0.0.1", b"2" * 20), TCP)
            b.tun.inject(x1)
            await trio.sleep(0.01)  # the TUN task sealed x1 and waits to send it
            b.tun.inject(x2)
            a.tun.inject(with_protocol(ipv4_packet("10.0.0.1", "10.0.0.2"), ICMP))
            await b.tun.next_written()  # the ping reached b
            await trio.sleep(0.01)
            full.set()
            got = [await a.tun.next_written() for _ in range(2)]
            nursery.cancel_scope.cancel()
        assert got == [x1, x2]

    run(main)


def test_the_memory_tun_reads_as_the_kernel_tun_does() -> None:
    """The double must not hide scheduling the daemon meets on a real TUN: a read is
    always a schedule point (the kernel read waits for readability first) and takes at
    most one batch of reads, the rest left for the next."""
    async def main() -> None:
        tun = MemoryTun()
        tun.inject(*(bytes([i % 256]) * 40 for i in range(BATCH + 5)))
        with trio.testing.assert_checkpoints():
            first = await tun.read()
        assert len(first) == BATCH
        assert len(await tun.read()) == 5

    trio.run(main)


class FailingReadTun(MemoryTun):
    """A TUN whose reads fail, but only the read a receiving task makes after a ping."""

    def __init__(self, error: TunError) -> None:
        super().__init__()
        self.error = error

    def read_batch(self, limit: int) -> list[bytes]:
        if trio.lowlevel.current_task().name.endswith("_udp_loop"):
            raise self.error
        return super().read_batch(limit)


@pytest.mark.parametrize(("error", "code", "reason"), [
    (TunGone(errno.EBADFD, "gone"), 0, "interface deleted"),
    (TunError(errno.EIO, "broken"), 1, "TUN read failed"),
])
def test_a_failed_read_after_a_ping_stops_the_daemon_as_the_tun_task_would(
        error: TunError, code: int, reason: str) -> None:
    async def main() -> None:
        network = MemoryNetwork()
        a, b = pair(network, b_tun=FailingReadTun(error))
        async with trio.open_nursery() as nursery:
            await nursery.start(a.daemon.run)
            await nursery.start(b.daemon.run)
            a.tun.inject(with_protocol(ipv4_packet("10.0.0.1", "10.0.0.2"), ICMP))
            with trio.fail_after(5):
                await b.tun.next_written()  # delivered, then the read after it failed
                while not b.daemon.exit_reason:
                    await trio.sleep(0.01)
            a.daemon.stop("done")
        assert (b.daemon.exit_code, b.daemon.exit_reason) == (code, reason)

    run(main)
