"""Reflexive address probes: the service tells a node the source address and port it saw.

A node behind NAT cannot know the address its peers must reach; the service can see it.
The node sends a probe from its WireGuard socket (``uspan.daemon.demux`` tags keep it
apart from WireGuard messages), so the answer names the NAT mapping of that very socket.
The answer repeats the probe's 16-byte random nonce: only someone who saw the probe can
forge one. A probe is never smaller than its answer, so the service amplifies nothing;
it answers at most ``RATE`` probes a second per source IP. Specified in
docs/discovery-protocol.md, section 10.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections import Counter

import trio

from uspan.daemon.demux import tag
from uspan.errors import listening
from uspan.wg.endpoint import Endpoint
from uspan.wg.ratelimit import RateLimiter

log = logging.getLogger("uspan.discovery")

PROBE_TAG = tag(b"PRB")
ANSWER_TAG = tag(b"PRA")
VERSION = 1
NONCE_SIZE = 16
PROBE_SIZE = 48  # tag, version, nonce, zero padding: never smaller than an answer
_ANSWER = struct.Struct("!4sB16sB16sH")  # tag, version, nonce, IP version, address, port
ANSWER_SIZE = _ANSWER.size  # 40
RATE, BURST = 5.0, 20  # probes answered per second per source IP


def encode_probe(nonce: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a probe nonce is {NONCE_SIZE} bytes")
    header = PROBE_TAG + bytes([VERSION]) + nonce
    return header + bytes(PROBE_SIZE - len(header))


def decode_probe(data: bytes) -> bytes | None:
    """The nonce of a well-formed probe, else None."""
    if len(data) != PROBE_SIZE or data[:4] != PROBE_TAG or data[4] != VERSION:
        return None
    return data[5:5 + NONCE_SIZE]


def encode_answer(nonce: bytes, host: str, port: int) -> bytes:
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    packed = address.packed.ljust(16, b"\0")
    return _ANSWER.pack(ANSWER_TAG, VERSION, nonce, address.version, packed, port)


def decode_answer(data: bytes) -> tuple[bytes, Endpoint] | None:
    """(nonce, the address the service saw) of a well-formed answer, else None."""
    if len(data) != ANSWER_SIZE:
        return None
    tag_, version, nonce, ip_version, packed, port = _ANSWER.unpack(data)
    if tag_ != ANSWER_TAG or version != VERSION or port == 0 or ip_version not in (4, 6):
        return None
    address = ipaddress.ip_address(packed[:4] if ip_version == 4 else packed)
    if address.is_unspecified or address.is_multicast:
        return None
    return nonce, Endpoint(str(address), port)


class ProbeResponder:
    """The service's UDP side: one socket per address family on the probe port."""

    def __init__(self, rate: float = RATE, burst: int = BURST) -> None:
        self.buckets = RateLimiter(rate=rate, burst=burst)
        self.counts: Counter[str] = Counter()  # answered, malformed, ratelimited

    def answer(self, data: bytes, source: tuple[str, int], now: float) -> bytes | None:
        """The answer to send back to ``source``, or None (counted)."""
        nonce = decode_probe(data)
        if nonce is None:
            self.counts["malformed"] += 1
            return None
        if not self.buckets.allow(source[0], now):
            self.counts["ratelimited"] += 1
            return None
        self.counts["answered"] += 1
        return encode_answer(nonce, source[0], source[1])

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer probes on UDP ``host:port`` (port 0: any) until cancelled."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        with sock:
            if family == socket.AF_INET6 and host in ("::", ""):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            with listening("reflexive probes, UDP", host, port):
                await sock.bind((host, port))
            bound = sock.getsockname()[1]
            log.info("reflexive probes answered on UDP %s port %d", host, bound)
            task_status.started(bound)
            while True:
                try:
                    data, source = await sock.recvfrom(PROBE_SIZE + 1)
                except OSError:  # e.g. ICMP errors reported on the socket
                    continue
                ip = str(source[0])
                answer = self.answer(data, (ip.removeprefix("::ffff:"), source[1]),
                                     trio.current_time())
                if answer is not None:
                    try:
                        await sock.sendto(answer, source)
                    except OSError:
                        self.counts["send_failed"] += 1
