"""The kernel filter on real loopback sockets: a flagged source's mac2-less handshake
messages are dropped before the queue, everything else arrives."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from uspan.daemon import earlydrop

INITIATION = b"\x01\x00\x00\x00" + os.urandom(128) + bytes(16)  # no mac2
WITH_MAC2 = INITIATION[:-16] + b"\x01" * 16
TRANSPORT = b"\x04\x00\x00\x00" + bytes(40)
RESPONSE = b"\x02\x00\x00\x00" + os.urandom(72) + bytes(16)  # no mac2
COOKIE_REPLY = b"\x03\x00\x00\x00" + os.urandom(60)


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def family(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def sockets(family: int) -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    made = []
    try:
        for _ in range(3):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            made.append(sock)
            sock.bind((host, 0))
        made[0].settimeout(0.5)
        yield made[0], made[1], made[2]
    except OSError as exc:
        pytest.skip(f"no loopback for this family: {exc}")
    finally:
        for sock in made:
            sock.close()


def arrives(receiver: socket.socket, sender: socket.socket, data: bytes) -> bool:
    """Send ``data``, then a marker; True if ``data`` is what arrives first."""
    marker = b"marker" + os.urandom(4)
    sender.sendto(data, receiver.getsockname())
    sender.sendto(marker, receiver.getsockname())
    first = receiver.recv(4096)
    if first != marker:
        assert receiver.recv(4096) == marker
    return first == data


def flag(receiver: socket.socket, *senders: socket.socket) -> None:
    sources = []
    for sender in senders:
        host, port = sender.getsockname()[:2]
        sources.append((socket.inet_pton(receiver.family, host), port))
    earlydrop.attach(receiver, earlydrop.program(receiver.family, sources))


def test_flagged_source_loses_only_its_mac2_less_handshakes(sockets) -> None:
    receiver, flagged, other = sockets
    flag(receiver, flagged)
    assert not arrives(receiver, flagged, INITIATION)
    assert not arrives(receiver, flagged, RESPONSE)
    assert arrives(receiver, flagged, WITH_MAC2)
    assert arrives(receiver, flagged, RESPONSE[:-16] + b"\x01" * 16)
    assert arrives(receiver, flagged, TRANSPORT)
    assert arrives(receiver, flagged, COOKIE_REPLY)
    assert arrives(receiver, flagged, b"\x02" + INITIATION[1:])  # a type-2 of 148 bytes
    assert arrives(receiver, flagged, INITIATION[:-1])  # not an initiation: the core counts it
    assert arrives(receiver, other, INITIATION)
    assert arrives(receiver, other, RESPONSE)


def test_detach_lets_everything_through_again(sockets) -> None:
    receiver, flagged, _ = sockets
    flag(receiver, flagged)
    earlydrop.detach(receiver)
    assert arrives(receiver, flagged, INITIATION)
    earlydrop.detach(receiver)  # none attached: no error


def test_the_most_sources_fit_the_kernels_limit(sockets) -> None:
    receiver, flagged, _ = sockets
    size = 4 if receiver.family == socket.AF_INET else 16
    sources = [(os.urandom(size), port) for port in range(earlydrop.MAX_SOURCES - 1)]
    host, port = flagged.getsockname()[:2]
    sources.append((socket.inet_pton(receiver.family, host), port))
    earlydrop.attach(receiver, earlydrop.program(receiver.family, sources))
    assert not arrives(receiver, flagged, INITIATION)


def test_a_sample_of_the_unflagged_initiations_passes(sockets) -> None:
    receiver, sender, _ = sockets
    earlydrop.attach(receiver, earlydrop.program(receiver.family, [], keep=0.0))
    assert not arrives(receiver, sender, INITIATION)
    assert arrives(receiver, sender, WITH_MAC2)
    assert arrives(receiver, sender, TRANSPORT)
    assert arrives(receiver, sender, RESPONSE)  # never sampled: it answers our initiation
    earlydrop.attach(receiver, earlydrop.program(receiver.family, [], keep=0.5))
    passed = sum(arrives(receiver, sender, INITIATION) for _ in range(200))
    assert 60 < passed < 140
