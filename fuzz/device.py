"""Datagrams into the WireGuard core, as the UDP socket hands them over.

Two devices A and B have completed a handshake (live sessions both ways, a preshared
key), and B is under attack. The first input byte picks what the rest becomes:

- 0: a raw datagram to B from A's address (every message type, every length);
- 1: a transport message A really sealed under its current session, carrying the rest
  as plaintext, so B's inner-packet checks (padding, IP version, allowed source) run;
- 2: a raw datagram to A, the initiator, from B's address;
- 3: a raw datagram to B from a stranger's address.

Properties: ``receive`` never raises (the core's contract: drop and count); a forged
datagram that is dropped (nothing for the TUN, no reply) leaves the device's observable
state as it was: peers, endpoints, counters, sessions, handshakes (an authentic one, mode
1, moves the byte counters and the replay window even when its inner packet is refused,
as in wireguard-go); keypairs and handshakes stay bounded by the peers (the rest of
memory: libFuzzer's RSS, which ``fuzz.run`` reports at start and end).
"""

from __future__ import annotations

import ipaddress
import random
import struct

import atheris

with atheris.instrument_imports(include=["uspan"]):
    from uspan.wg import prefix
    from uspan.wg.config import DeviceChange, PeerChange
    from uspan.wg.crypto import clamp, public_key
    from uspan.wg.device import Device
    from uspan.wg.endpoint import Endpoint

from fuzz.harness import check, main
from tests.unit.deviceinfo import device_info

NOW = 1000.0
A_EP = Endpoint("192.0.2.1", 51820)
B_EP = Endpoint("192.0.2.2", 51820)
STRANGER = Endpoint("203.0.113.9", 4444)
A_NET, B_NET = "10.0.0.1/32", "10.0.0.2/32"


def _device(seed: int) -> tuple[Device, bytes]:
    r = random.Random(seed)
    device = Device(rng=r.randbytes)
    private = clamp(random.Random(seed + 1000).randbytes(32))
    device.apply(DeviceChange(private_key=private, listen_port=51820), NOW)
    return device, public_key(private)


def _ipv4(src: str, dst: str, payload: bytes) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, 17, 0,
                       ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed) + payload


def _pair() -> tuple[Device, Device, list[bytes]]:
    """A and B with sessions both ways; the datagrams that made them (seeds)."""
    a, a_pub = _device(1)
    b, b_pub = _device(2)
    psk = bytes(range(32))
    a.apply(DeviceChange(peers=[PeerChange(b_pub, preshared_key=psk, endpoint=B_EP,
            allowed_ips=[prefix.parse(B_NET)])]), NOW)
    b.apply(DeviceChange(peers=[PeerChange(a_pub, preshared_key=psk, endpoint=A_EP,
            allowed_ips=[prefix.parse(A_NET)])]), NOW)
    seen: list[bytes] = []
    initiation = a.send([_ipv4("10.0.0.1", "10.0.0.2", b"hello")], NOW)
    seen += [d for d, _ in initiation]
    _, response = b.receive([(d, A_EP) for d, _ in initiation], NOW)
    seen += [d for d, _ in response]
    _, data = a.receive([(d, B_EP) for d, _ in response], NOW)  # A sends what it queued
    seen += [d for d, _ in data]
    tun, _ = b.receive([(d, A_EP) for d, _ in data], NOW)
    check(tun != [], "the fuzz setup did not complete a handshake")
    back = b.send([_ipv4("10.0.0.2", "10.0.0.1", b"back")], NOW)
    seen += [d for d, _ in back]
    a.receive([(d, B_EP) for d, _ in back], NOW)
    b.under_load_rate = 10**9  # never under load: the full handshake path runs
    return a, b, seen


A, B, SEEDS = _pair()
A_PEER = next(iter(A.peers.values()))


def _state(device: Device) -> tuple[object, ...]:
    return (
        device_info(device), sorted(device.keypairs), sorted(device.handshakes),
        [(p.current, p.previous, p.next, p.handshake) for p in device.peers.values()],
    )


def test_one(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    if mode == 1:
        keypair = A_PEER.current
        check(keypair is not None, "A lost its session")
        assert keypair is not None
        target, source, datagram = B, A_EP, keypair.seal([body], 0)[0]  # MTU 0: unpadded
    elif mode == 2:
        target, source, datagram = A, B_EP, body
    else:
        target, source, datagram = B, A_EP if mode == 0 else STRANGER, body
    before = _state(target)
    drops = sum(target.counters.values())
    tun, out = target.receive([(datagram, source)], NOW + 1)
    dropped = not tun and not out and sum(target.counters.values()) > drops
    if dropped and mode != 1:  # mode 1 is authentic: its counters and replay window move
        check(_state(target) == before, "a dropped datagram changed the device")
    check(len(target.keypairs) <= 3 * len(target.peers), "keypairs pile up")
    check(len(target.handshakes) <= len(target.peers), "handshakes pile up")


if __name__ == "__main__":
    main(test_one, [bytes([0]) + s for s in SEEDS]
         + [bytes([1]) + _ipv4("10.0.0.1", "10.0.0.2", b"x" * 40), bytes([2]) + SEEDS[1]])
