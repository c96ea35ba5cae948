"""The compiled read path (``uspan.daemon._gate``) on hostile datagrams and arguments.

The input is a few datagrams (each may be made a handshake message of the right size
and mac1, with a mac2 zero, random or proven) and a hostile plan: any ``lane`` bytes
(odd lengths, bad length bytes), negative or huge budgets and limits. Each datagram is
judged by ``classify`` and by the Python reference ``classify_py``; then all go through
``read`` on a real loopback socket, and again as one coalesced receive (a GSO send to a
UDP GRO socket: pieces of the first's size, the last no longer).

Properties: the two verdicts agree; ``read`` returns only whole datagrams sent, in
order, never more than its ``limit``, and its counts add up (each datagram read is
returned, dropped for mac1, answered or dropped); ``cookie_reply`` gives 64 bytes or a
ValueError, nothing else. A coalesced receive goes up whole when none of its pieces is a
handshake message; else it is judged piece by piece (bad mac1s counted, each piece that
passes up alone, in order).
"""

from __future__ import annotations

import socket

import atheris

with atheris.instrument_imports(include=["uspan"]):
    from uspan.daemon import gate, offload
    from uspan.daemon.udp import _set_buffers
    from uspan.wg import crypto
    from uspan.wg.constants import INITIATION_SIZE, MAC_SIZE, RESPONSE_SIZE
    from uspan.wg.verdict import BAD_MAC1, PASS, PROVEN, UNPROVEN, classify_py

from fuzz.harness import check, main

MAC1_KEY = bytes(range(32))
COOKIE_KEY = bytes(range(32, 64))
SECRET = bytes(range(64, 96))
_receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_set_buffers(_receiver)
_receiver.bind(("127.0.0.1", 0))
_receiver.setblocking(False)
_sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_sender.bind(("127.0.0.1", 0))
_sender.setblocking(False)
SOURCE = socket.inet_aton("127.0.0.1") + _sender.getsockname()[1].to_bytes(2, "big")
_buffer = bytearray(gate.BATCH * gate.BUFFER_SIZE)
_coalescing = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_set_buffers(_coalescing)
_coalescing.bind(("127.0.0.1", 0))
_coalescing.setblocking(False)
_GRO = offload.enable_gro(_coalescing)


def _datagram(fdp: atheris.FuzzedDataProvider) -> bytes:
    """Raw bytes, or a handshake message of its size with mac1 (and mac2) made valid."""
    shape = fdp.ConsumeIntInRange(0, 3)
    if shape == 0:
        return bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300)))
    size = INITIATION_SIZE if shape != 2 else RESPONSE_SIZE
    body = bytearray(fdp.ConsumeBytes(size).ljust(size, b"\0"))
    body[0:4] = bytes([1 if size == INITIATION_SIZE else 2, 0, 0, 0])
    mac1_at, mac2_at = size - 2 * MAC_SIZE, size - MAC_SIZE
    body[mac1_at:mac2_at] = crypto.mac(MAC1_KEY, bytes(body[:mac1_at]))
    if shape == 3:
        body[mac2_at:] = crypto.mac(crypto.mac(SECRET, SOURCE), bytes(body[:mac2_at]))
    elif fdp.ConsumeBool():
        body[mac2_at:] = bytes(MAC_SIZE)
    return bytes(body)


def test_one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    under_load = fdp.ConsumeBool()
    secret = SECRET if fdp.ConsumeBool() else None
    hand_up = fdp.ConsumeIntInRange(-(1 << 40), 1 << 40)
    cookies = fdp.ConsumeIntInRange(-3, 80)
    limit = fdp.ConsumeIntInRange(-3, 80)
    lane = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))
    datagrams = [_datagram(fdp) for _ in range(fdp.ConsumeIntInRange(0, 80))]
    for datagram in datagrams:
        verdict = gate.classify(datagram, SOURCE, MAC1_KEY, secret, under_load)
        check(verdict == classify_py(datagram, SOURCE, MAC1_KEY, secret, under_load),
              "the compiled verdict is not Python's")
    try:
        reply = gate.cookie_reply(datagrams[0] if datagrams else b"", lane[:20], SECRET,
                                  COOKIE_KEY)
        check(len(reply) == 64, "a cookie reply not of 64 bytes")
    except ValueError:
        pass
    sent = [d for d in datagrams if d]  # an empty datagram is read as one too: kept apart
    for datagram in sent:
        _sender.sendto(datagram, _receiver.getsockname())
    read, counts = gate.read(_receiver.fileno(), _buffer, gate.ROUNDS, limit, MAC1_KEY,
                             COOKIE_KEY, secret, under_load, hand_up, cookies, lane)
    while _receiver_drained():
        pass
    got = [item[0] for item in read]
    truncated, bad_mac1, handed_up, answered, dropped, _failed = counts
    check(len(got) <= max(limit, 0), "more returned than the limit")
    check(truncated == 0, "a loopback datagram cut short")
    judged = len(got) + bad_mac1 + answered + dropped
    check(judged <= len(sent), "more datagrams judged than sent")
    verdicts = [classify_py(d, SOURCE, MAC1_KEY, secret, under_load) for d in sent[:judged]]
    check(bad_mac1 == verdicts.count(BAD_MAC1), "bad mac1 miscounted")
    check(handed_up + answered + dropped <= verdicts.count(UNPROVEN),
          "more unproven judged than read")
    passing = [d for d, v in zip(sent[:judged], verdicts, strict=True) if v in (PASS, PROVEN)]
    up = [d for d, v in zip(sent[:judged], verdicts, strict=True) if v != BAD_MAC1]
    check([d for d in got if d in passing] == passing,
          "a datagram that passes was lost, altered or reordered")
    check(all(d in up for d in got), "a datagram returned that was not sent or failed mac1")
    if _GRO and sent:
        _check_coalesced(sent[:64], secret, under_load, hand_up, cookies, lane)
    while True:  # the cookie replies sent back
        try:
            _sender.recv(100)
        except BlockingIOError:
            break


def _is_handshake(piece: bytes) -> bool:
    return piece[1:4] == bytes(3) and (piece[:1], len(piece)) in (
        (b"\x01", INITIATION_SIZE), (b"\x02", RESPONSE_SIZE))


def _check_coalesced(datagrams: list[bytes], secret: bytes | None, under_load: bool,
                     hand_up: int, cookies: int, lane: bytes) -> None:
    """``datagrams`` cut to the first's size (the last no longer) and sent as one GSO
    run; the read's verdict on the coalesced receive."""
    size = len(datagrams[0])
    pieces = [d[:size].ljust(size, b"\0") for d in datagrams[:-1]] + [datagrams[-1][:size]]
    _sender.sendmsg([b"".join(pieces)], [offload.gso_cmsg(size)], 0,
                    _coalescing.getsockname())
    read, counts = gate.read(_coalescing.fileno(), _buffer, gate.ROUNDS, 64, MAC1_KEY,
                             COOKIE_KEY, secret, under_load, hand_up, cookies, lane)
    while True:
        try:
            _coalescing.recv(65535)
        except BlockingIOError:
            break
    check(counts[0] == 0, "a coalesced receive cut short")
    if not any(map(_is_handshake, pieces)):
        check([item[0] for item in read] == [b"".join(pieces)],
              "a coalesced receive without handshakes not up whole")
        check(counts[1:5] == (0, 0, 0, 0), "a coalesced receive without handshakes judged")
        return
    verdicts = [classify_py(p, SOURCE, MAC1_KEY, secret, under_load) for p in pieces]
    check(counts[1] == verdicts.count(BAD_MAC1), "bad mac1 miscounted in a coalesced receive")
    check(all(item[3] == 0 for item in read), "a judged piece up with a gso_size")
    passing = [p for p, v in zip(pieces, verdicts, strict=True) if v in (PASS, PROVEN)]
    got = [item[0] for item in read]
    check([d for d in got if d in passing] == passing,
          "a piece that passes was lost, altered or reordered")
    check(len(got) + sum(counts[1:5]) - counts[2] == len(pieces),
          "the pieces of a coalesced receive do not add up")


def _receiver_drained() -> bool:
    """Read one datagram left behind (a limit short of what was sent); False once none."""
    try:
        _receiver.recv(65535)
    except BlockingIOError:
        return False
    return True


if __name__ == "__main__":
    main(test_one, [b"", b"\x01" * 200, bytes(range(256)) * 4])
