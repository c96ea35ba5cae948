"""The demux: uspan's own datagrams on the WireGuard socket go to the owner's handlers,
never to the core, and the owner sends its own from that socket. Real ``Daemon``s on
in-memory ports under MockClock (the real-UDP case is in tests/system/test_demux.py)."""

from __future__ import annotations

import pytest
import trio

from tests.unit.test_daemon_memory import pair, run
from tests.unit.wgnet import ipv4_packet
from uspan.daemon.demux import Demux, tag
from uspan.daemon.memory import MemoryNetwork
from uspan.wg.endpoint import Endpoint

PROBE = tag(b"PRB")


def test_tags_are_four_bytes_starting_with_0xff_and_each_kind_has_one_handler():
    assert PROBE == b"\xffPRB"
    with pytest.raises(ValueError):
        tag(b"TOOLONG")
    demux = Demux()
    with pytest.raises(ValueError):
        demux.register(b"\x01\0\0\0", lambda data, source: None)  # a WireGuard type
    demux.register(PROBE, lambda data, source: None)
    with pytest.raises(ValueError):
        demux.register(PROBE, lambda data, source: None)


def test_split_keeps_wireguard_and_unclaimed_for_the_core_in_order():
    seen: list[bytes] = []
    demux = Demux()
    demux.register(PROBE, lambda data, source: seen.append(data) or None)
    source = Endpoint("192.0.2.9", 3000)
    batch = [(b"\x01\0\0\0" + b"x" * 144, source), (PROBE + b"nonce", source),
             (b"", source), (b"\xffXYZ", source), (b"\x04\0\0\0" + b"y" * 28, source)]
    assert demux.split(batch) == [batch[0], batch[2], batch[3], batch[4]]
    assert seen == [PROBE + b"nonce"]
    assert (demux.claimed, demux.unclaimed) == (1, 1)


def test_a_handler_may_hand_the_core_a_replacement_datagram():
    inner = (b"\x04\0\0\0" + b"z" * 28, Endpoint("198.51.100.1", 51820))
    demux = Demux()
    demux.register(tag(b"RLY"), lambda data, source: inner)
    assert demux.split([(tag(b"RLY") + inner[0], Endpoint("192.0.2.9", 3478))]) == [inner]


def test_daemon_hands_claimed_datagrams_to_the_owner_and_sends_the_owners():
    async def main():
        network = MemoryNetwork()
        a, b = pair(network)
        probe = network.bind("192.0.2.254", 3000)  # a discovery service's probe port
        got: list[tuple[bytes, Endpoint]] = []
        a.daemon.demux.register(PROBE, lambda data, source: got.append((data, source)) or None)
        async with a.daemon.running(), b.daemon.running():
            # the owner's datagram leaves from the WireGuard port (51820)
            await a.daemon.send_datagrams([(PROBE + b"ask", Endpoint("192.0.2.254", 3000))])
            data, source = (await probe.receive())[0]
            assert (data, source.address) == (PROBE + b"ask", ("192.0.2.1", 51820))
            await probe.send([(PROBE + b"answer", source)])
            await probe.send([(b"\xffXYZjunk", source)])  # nobody's kind: the core drops it
            await trio.testing.wait_all_tasks_blocked()
            assert got == [(PROBE + b"answer", Endpoint("192.0.2.254", 3000))]
            stats = a.daemon.stats()
            assert (stats["udp_own_claimed"], stats["udp_own_unclaimed"]) == (1, 1)
            assert stats["drop_bad_type"] == 1  # the unclaimed one, not the probe answer
            packet = ipv4_packet("10.0.0.1", "10.0.0.2")  # and WireGuard still works
            a.tun.inject(packet)
            with trio.fail_after(1):
                assert await b.tun.next_written() == packet
        probe.close()

    run(main)
