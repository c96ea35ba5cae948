"""The compiled read path (uspan.daemon._gate) against the Python verdicts
(uspan.wg.verdict.classify_py): the same verdict for random and hostile datagrams, one
by one and through ``read`` on a real loopback socket; its cookie replies open at the
initiator and prove its retry; and no silent fallback in CI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uspan.daemon import gate, offload
from uspan.daemon.udp import UdpSocket, _set_buffers
from uspan.wg import crypto, messages
from uspan.wg.config import DeviceChange
from uspan.wg.constants import INITIATION_SIZE, MAC_SIZE, RESPONSE_SIZE
from uspan.wg.cookie import CookieGenerator, cookie_key, mac1_key
from uspan.wg.device import Device
from uspan.wg.verdict import (
    BAD_MAC1,
    PASS,
    PROVEN,
    UNPROVEN,
    Plan,
    classify_py,
    lane_records,
)

compiled = pytest.mark.skipif(not gate.COMPILED, reason="uspan.daemon._gate was not built")
PUBLIC = bytes(range(32))
MAC1_KEY, COOKIE_KEY = mac1_key(PUBLIC), cookie_key(PUBLIC)
SECRET = bytes(range(100, 132))
SOURCE = socket.inet_aton("127.0.0.1") + (40000).to_bytes(2, "big")
REPO = Path(__file__).resolve().parents[2]


def test_compiled_module_is_used_when_required() -> None:
    """CI sets USPAN_REQUIRE_COMPILED=1 (scripts/test): a silent fallback fails here."""
    if os.environ.get("USPAN_REQUIRE_COMPILED") != "1":
        pytest.skip("USPAN_REQUIRE_COMPILED is not set")
    assert gate.COMPILED, "uspan.daemon._gate did not build or import"


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    """Random bytes, and handshake messages right, nearly right and wrong: of each
    type and near each size, mac1 valid or not, mac2 zero, random or the source's."""
    shape = draw(st.sampled_from(["random", "initiation", "response", "other"]))
    if shape == "random":
        return draw(st.binary(max_size=200))
    size = {"initiation": INITIATION_SIZE, "response": RESPONSE_SIZE}.get(shape, 64)
    size += draw(st.sampled_from([0, 0, 0, 1, -1]))
    body = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if size < 2 * MAC_SIZE + 4:
        return bytes(body)
    body[0:4] = bytes([draw(st.sampled_from([1, 2, 3, 4, 0, 255])), 0, 0, 0])
    if draw(st.integers(0, 7)) == 0:
        body[draw(st.integers(1, 3))] = draw(st.integers(1, 255))  # reserved bytes
    mac1_at, mac2_at = size - 2 * MAC_SIZE, size - MAC_SIZE
    if draw(st.booleans()):
        body[mac1_at:mac2_at] = crypto.mac(MAC1_KEY, bytes(body[:mac1_at]))
    mac2 = draw(st.sampled_from(["zero", "random", "valid"]))
    if mac2 == "zero":
        body[mac2_at:] = bytes(MAC_SIZE)
    elif mac2 == "valid":
        body[mac2_at:] = crypto.mac(crypto.mac(SECRET, SOURCE), bytes(body[:mac2_at]))
    return bytes(body)


@compiled
@settings(max_examples=2000, deadline=None)
@given(data=datagrams(), secret=st.sampled_from([SECRET, None]), under_load=st.booleans())
def test_compiled_verdict_matches_python(data: bytes, secret: bytes | None,
                                         under_load: bool) -> None:
    expected = classify_py(data, SOURCE, MAC1_KEY, secret, under_load)
    assert gate.classify(data, SOURCE, MAC1_KEY, secret, under_load) == expected


def test_python_verdicts_of_the_four_kinds() -> None:
    """The reference itself: each verdict where the whitepaper puts it."""
    body = bytearray(os.urandom(INITIATION_SIZE))
    body[0:4] = b"\x01\0\0\0"
    body[116:132] = crypto.mac(MAC1_KEY, bytes(body[:116]))
    body[132:] = bytes(MAC_SIZE)
    assert classify_py(bytes(body), SOURCE, MAC1_KEY, SECRET, False) == PASS
    assert classify_py(bytes(body), SOURCE, MAC1_KEY, SECRET, True) == UNPROVEN
    body[132:] = crypto.mac(crypto.mac(SECRET, SOURCE), bytes(body[:132]))
    assert classify_py(bytes(body), SOURCE, MAC1_KEY, SECRET, True) == PROVEN
    assert classify_py(bytes(body), SOURCE, MAC1_KEY, None, True) == UNPROVEN
    body[120] ^= 1
    assert classify_py(bytes(body), SOURCE, MAC1_KEY, SECRET, True) == BAD_MAC1


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _set_buffers(receiver)
    receiver.bind(("127.0.0.1", 0))
    sender.bind(("127.0.0.1", 0))
    sender.setblocking(False)
    receiver.setblocking(False)
    yield receiver, sender
    receiver.close()
    sender.close()


@pytest.fixture
def gro_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A receiver with UDP GRO and a sender: a GSO send (``_send_run``) over loopback
    arrives as one coalesced receive, as a NIC's GRO makes of one source's datagrams."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.setblocking(False)
    sender.bind(("127.0.0.1", 0))
    sender.settimeout(5)  # a lost reply fails at once, not at pytest's timeout
    try:
        assert offload.enable_gro(receiver), "no UDP GRO here"
        yield receiver, sender
    finally:
        receiver.close()
        sender.close()


def _send_run(pair: tuple[socket.socket, socket.socket], pieces: list[bytes],
              size: int) -> None:
    """``pieces`` in one UDP_SEGMENT send of ``size``-byte datagrams."""
    receiver, sender = pair
    sender.sendmsg([b"".join(pieces)], [offload.gso_cmsg(size)], 0, receiver.getsockname())


def _read(receiver: socket.socket, *, under_load: bool = True, hand_up: int = 0,
          cookies: int = 0, lane: bytes = b"",
          ) -> tuple[list[bytes], tuple[int, int, int, int, int, int]]:
    """One read as the daemon does it, with the cookie secret SECRET."""
    buffer = bytearray(gate.BATCH * gate.BUFFER_SIZE)
    got, counts = gate.read(receiver.fileno(), buffer, gate.ROUNDS, gate.BATCH * gate.ROUNDS,
                            MAC1_KEY, COOKIE_KEY,
                            SECRET, under_load, hand_up, cookies, lane)
    return [item[0] for item in got], counts


@compiled
@settings(max_examples=20, deadline=None)
@given(batch=st.lists(datagrams(), min_size=1, max_size=150), under_load=st.booleans())
def test_read_hands_up_what_python_would_pass(batch: list[bytes], under_load: bool) -> None:
    """Through a real socket: bad mac1 dropped and counted, under load the unproven
    initiations dropped (no budget), everything else handed up whole and in order."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _set_buffers(receiver)
        receiver.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        sender.bind(("127.0.0.1", 0))
        source = socket.inet_aton("127.0.0.1") + sender.getsockname()[1].to_bytes(2, "big")
        sendable = [data for data in batch if data]  # an empty datagram reads as one too
        for data in sendable:
            sender.sendto(data, receiver.getsockname())
        verdicts = [classify_py(d, source, MAC1_KEY, SECRET, under_load) for d in sendable]
        got, counts = _read(receiver, under_load=under_load)
    finally:
        receiver.close()
        sender.close()
    assert got == [d for d, v in zip(sendable, verdicts, strict=True) if v in (PASS, PROVEN)]
    truncated, bad_mac1, handed_up, cookies, dropped, failed = counts
    assert (truncated, handed_up, cookies, failed) == (0, 0, 0, 0)
    assert bad_mac1 == verdicts.count(BAD_MAC1)
    assert dropped == verdicts.count(UNPROVEN)


def _initiation(generator: CookieGenerator, now: float) -> bytes:
    body = bytearray(os.urandom(INITIATION_SIZE))
    body[0:4] = b"\x01\0\0\0"
    generator.add_macs(body, now)
    return bytes(body)


def proven_retry(generator: CookieGenerator, reply: bytes, answered: bytes,
                 sender: socket.socket) -> bytes:
    """The initiator's retry after the cookie ``reply`` to ``answered``: the cookie opens
    (bound to that message's mac1), is MAC(SECRET, the sender's source) and gives the
    retry's mac2."""
    parsed = messages.parse_cookie_reply(reply)
    cookie = crypto.xaead_decrypt(COOKIE_KEY, parsed.nonce, parsed.encrypted_cookie,
                                  answered[116:132])
    source = socket.inet_aton("127.0.0.1") + sender.getsockname()[1].to_bytes(2, "big")
    assert cookie == crypto.mac(SECRET, source)
    retry = bytearray(_initiation(generator, 2.0))
    retry[132:] = crypto.mac(cookie, bytes(retry[:132]))
    return bytes(retry)


@compiled
def test_read_answers_beyond_hand_up_with_cookies_that_prove_the_retry(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """Of five unproven initiations, two go up, two get a cookie reply from C (which
    opens at the initiator), one is dropped; the initiator's retry is then proven."""
    receiver, sender = pair
    generator = CookieGenerator(PUBLIC)
    sent = []
    for _ in range(5):
        sent.append(_initiation(generator, 1.0))
        sender.sendto(sent[-1], receiver.getsockname())
    got, counts = _read(receiver, hand_up=2, cookies=2)
    assert got == sent[:2]
    assert counts == (0, 0, 2, 2, 1, 0)
    replies = [sender.recv(100) for _ in range(2)]
    assert [len(r) for r in replies] == [64, 64]
    assert [r[4:8] for r in replies] == [m[4:8] for m in sent[2:4]]
    # The generator keeps the mac1 of its last message: the fifth, which got no reply.
    # Its cookie is what C sealed for this source, whichever message it answered.
    retry = proven_retry(generator, replies[0], sent[2], sender)
    reply = messages.parse_cookie_reply(replies[0])
    with pytest.raises(crypto.AuthenticationError):  # bound to its message's mac1
        crypto.xaead_decrypt(COOKIE_KEY, reply.nonce, reply.encrypted_cookie, sent[3][116:132])
    sender.sendto(retry, receiver.getsockname())
    got, counts = _read(receiver)
    assert got == [retry]
    assert counts == (0, 0, 0, 0, 0, 0)


@compiled
def test_standalone_cookie_reply_opens_at_the_initiator() -> None:
    generator = CookieGenerator(PUBLIC)
    initiation = _initiation(generator, 1.0)
    reply = gate.cookie_reply(initiation, SOURCE, SECRET, COOKIE_KEY)
    assert generator.consume_reply(messages.parse_cookie_reply(reply), 1.5)
    retry = bytearray(_initiation(generator, 2.0))
    assert classify_py(bytes(retry), SOURCE, MAC1_KEY, SECRET, True) == PROVEN


@compiled
def test_the_lanes_initiations_always_go_up(pair: tuple[socket.socket, socket.socket]) -> None:
    """A known peer's mac2-less initiations are the core's priority lane: handed up with
    nothing left to hand up or answer, and not counted against ``hand_up``; another
    source on the same address is not in the lane."""
    receiver, sender = pair
    port = sender.getsockname()[1]
    other = socket.inet_aton("127.0.0.1") + (port ^ 1).to_bytes(2, "big")
    lane = lane_records([other, socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big"),
                         bytes(18)])
    sent = [_initiation(CookieGenerator(PUBLIC), 1.0) for _ in range(3)]
    for message in sent:
        sender.sendto(message, receiver.getsockname())
    got, counts = _read(receiver, lane=lane)
    assert got == sent
    assert counts == (0, 0, 0, 0, 0, 0)
    sender.sendto(sent[0], receiver.getsockname())
    got, counts = _read(receiver, lane=lane_records([other]))
    assert (got, counts) == ([], (0, 0, 0, 0, 1, 0))


@compiled
@pytest.mark.parametrize("under_load", [False, True])
def test_a_gated_read_returns_no_more_receives_than_its_limit(
        pair: tuple[socket.socket, socket.socket], under_load: bool) -> None:
    """As the read in Python: ``receive_batch(limit)`` returns at most ``limit``
    receives, the rest stay queued for the next (a read of 1,024 handed the core 16
    times the work of a loop's pass, and a flood's first read before the device was
    under load spent the core's cookie budget on a backlog, dropping the rest); the
    unproven initiations judged in C do not count against it."""
    receiver, sender = pair
    udp = UdpSocket(receiver, offload_=False)
    plan = Plan(MAC1_KEY, COOKIE_KEY, SECRET, under_load, hand_up=0, cookies=1000)
    assert udp.set_gate(lambda: plan, lambda counts: None)
    junk = [_initiation(CookieGenerator(PUBLIC), 1.0) for _ in range(100)] if under_load else []
    data = [bytes([4, 0, 0, 0]) + i.to_bytes(4, "big") + bytes(32) for i in range(200)]
    for message in junk + data:
        sender.sendto(message, receiver.getsockname())
    first = udp.receive_batch(64)
    assert [d for d, _ in first] == data[:64]
    rest = udp.receive_batch(1000)
    assert [d for d, _ in rest] == data[64:]
    for _ in junk:
        assert len(sender.recv(100)) == 64


@compiled
@pytest.mark.parametrize("source", [b"", SOURCE[:5], SOURCE + b"\0"])
def test_a_cookie_reply_for_no_source_key_is_refused_as_such(source: bytes) -> None:
    """A source key is IP || port (6 or 18 bytes): any other length is the caller's
    error (ValueError), not a failure of OpenSSL's; an empty one was reported as that."""
    initiation = _initiation(CookieGenerator(PUBLIC), 1.0)
    with pytest.raises(ValueError):
        gate.cookie_reply(initiation, source, SECRET, COOKIE_KEY)


@compiled
def test_each_datagram_comes_up_with_its_own_source() -> None:
    """The read keeps the last source's Python form: datagrams from senders that
    alternate within a read and across reads, of both families, each come up with
    their own address (a stale one would make the core answer the wrong peer)."""
    sockets: list[socket.socket] = []
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            receiver = socket.socket(family, socket.SOCK_DGRAM)
            receiver.bind((host, 0))
            receiver.setblocking(False)
            senders = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(2)]
            sockets += [receiver, *senders]
            for sender in senders:
                sender.bind((host, 0))
            order = [0, 0, 1, 0, 1, 1]
            buffer = bytearray(gate.BATCH * gate.BUFFER_SIZE)
            for reads in ([order], [order[:3], order[3:]], [[1], [0], [1]]):
                expected = []
                for part in reads:
                    for n, index in enumerate(part):
                        data = bytes([4, 0, 0, 0, index, n]) + bytes(26)
                        senders[index].sendto(data, receiver.getsockname())
                        expected.append((data, senders[index].getsockname()[:2]))
                    got, _ = gate.read(receiver.fileno(), buffer, gate.ROUNDS, 64, MAC1_KEY,
                                       COOKIE_KEY, SECRET, False, 0, 0, b"")
                    assert [(item[0], item[1][:2]) for item in got] == expected
                    expected = []
    finally:
        for sock in sockets:
            sock.close()


@compiled
def test_a_coalesced_receive_of_handshakes_is_judged_piece_by_piece(
        gro_pair: tuple[socket.socket, socket.socket]) -> None:
    """A flood from one source through a NIC that coalesces (UDP GRO; here a GSO send
    over loopback, which arrives as one receive) is judged in C piece by piece, as lone
    datagrams: under load the bad mac1s are dropped and counted and the valid
    initiations answered with cookies, none handed up (it went up whole, up to 64
    initiations for the core to judge in Python); a run of transport data still goes up
    whole, as the kernel coalesced it."""
    receiver, sender = gro_pair
    buffer = bytearray(gate.BATCH * gate.BUFFER_SIZE)
    transport = [bytes([4, 0, 0, 0, n]) + bytes(59) for n in range(4)]
    _send_run(gro_pair, transport, 64)
    got, counts = gate.read(receiver.fileno(), buffer, gate.ROUNDS, 64, MAC1_KEY,
                            COOKIE_KEY, SECRET, True, 0, 1000, b"")
    assert [(item[0], item[3]) for item in got] == [(b"".join(transport), 64)]
    assert counts == (0, 0, 0, 0, 0, 0)

    initiations = [_initiation(CookieGenerator(PUBLIC), 1.0) for _ in range(8)]
    for n in (1, 4, 6):  # a wrong mac1
        initiations[n] = initiations[n][:-2 * MAC_SIZE] + bytes(2 * MAC_SIZE)
    _send_run(gro_pair, initiations, INITIATION_SIZE)
    got, counts = gate.read(receiver.fileno(), buffer, gate.ROUNDS, 64, MAC1_KEY,
                            COOKIE_KEY, SECRET, True, 0, 1000, b"")
    assert got == []
    assert counts == (0, 3, 0, 5, 0, 0)  # bad mac1 3, cookies 5
    replies = [sender.recv(100) for _ in range(5)]
    assert all(len(reply) == 64 and reply[0] == 3 for reply in replies)


@compiled
def test_every_gated_read_is_counted_also_when_it_judged_nothing(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """``gate_reads`` (``uspan stats``) counts every read in C: the core is told of a
    read's counts only when it judged something, so the reads are counted where the
    plan is made."""
    receiver, sender = pair
    device = Device()
    device.apply(DeviceChange(private_key=crypto.clamp(bytes(range(32)))), 1.0)
    udp = UdpSocket(receiver, offload_=False)
    assert udp.set_gate(lambda: device.gate_plan(1.0),
                        lambda counts: device.gate_done(counts, 1.0))
    for n in range(3):
        sender.sendto(bytes([4, 0, 0, 0, n]) + bytes(27), receiver.getsockname())
        assert len(udp.receive_batch()) == 1
    assert device.gate_totals["reads"] == 3


def _bind_same_port(hosts: list[tuple[socket.AddressFamily, str]]) -> list[socket.socket]:
    """Sockets bound to ``hosts`` on one port (a free one: tried again if taken)."""
    for _ in range(20):
        sockets: list[socket.socket] = []
        try:
            for family, host in hosts:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sockets.append(sock)
                sock.bind((host, sockets[0].getsockname()[1] if len(sockets) > 1 else 0))
            return sockets
        except OSError:
            for sock in sockets:
                sock.close()
    raise AssertionError("no port free on all of them")


@compiled
@pytest.mark.parametrize("family", ["ipv4", "dual-stack ipv6"])
def test_sources_that_differ_only_in_their_address_are_told_apart(family: str) -> None:
    """The address cache compares a whole sockaddr of the family: senders on one port
    whose addresses differ only past the first 16 bytes of a sockaddr_in6 (``::1`` and
    ``::ffff:127.0.0.1``: family, port, flowinfo and the first 8 address bytes alike)
    or only in the IPv4 address each come up with their own (a cache comparing
    sizeof(sockaddr_in) for both families, or the family and port, gave the last one)."""
    if family == "ipv4":
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        senders = _bind_same_port([(socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "127.0.0.2")])
        targets = [receiver.getsockname()] * 2
        expected_hosts = ["127.0.0.1", "127.0.0.2"]
    else:
        receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        receiver.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        receiver.bind(("::", 0))
        senders = _bind_same_port([(socket.AF_INET6, "::1"), (socket.AF_INET, "127.0.0.1")])
        port = receiver.getsockname()[1]
        targets = [("::1", port), ("127.0.0.1", port)]
        expected_hosts = ["::1", "::ffff:127.0.0.1"]
    try:
        receiver.setblocking(False)
        buffer = bytearray(gate.BATCH * gate.BUFFER_SIZE)
        for reads in ([[0, 1, 0, 1]], [[1], [0], [1]]):
            for part in reads:
                for n, index in enumerate(part):
                    senders[index].sendto(bytes([4, 0, 0, 0, index, n]) + bytes(26),
                                          targets[index])
                got, _ = gate.read(receiver.fileno(), buffer, gate.ROUNDS, 64, MAC1_KEY,
                                   COOKIE_KEY, SECRET, False, 0, 0, b"")
                assert [item[1][0] for item in got] == [expected_hosts[i] for i in part]
                assert {item[1][1] for item in got} == {senders[0].getsockname()[1]}
    finally:
        receiver.close()
        for sender in senders:
            sender.close()


@compiled
def test_a_handshake_anywhere_in_a_coalesced_receive_is_judged(
        gro_pair: tuple[socket.socket, socket.socket]) -> None:
    """The whole coalesced receive is looked through, its last piece at its own length
    (shorter than gso_size): a run of transport data whose third piece is an
    initiation, or whose short last piece is a response, each with a bad mac1, is
    judged piece by piece (the bad one dropped and counted, the transport pieces up
    alone); looking at the first piece only, or at gso_size bytes for the last, sent
    the run up whole."""
    receiver, _ = gro_pair
    buffer = bytearray(gate.BATCH * gate.BUFFER_SIZE)
    transport = [bytes([4, 0, 0, 0, n]) + bytes(INITIATION_SIZE - 5) for n in range(2)]
    bad_initiation = b"\x01\0\0\0" + os.urandom(INITIATION_SIZE - 4)
    bad_response = b"\x02\0\0\0" + os.urandom(RESPONSE_SIZE - 4)
    for last in (bad_initiation, bad_response):
        _send_run(gro_pair, [*transport, last], INITIATION_SIZE)
        got, counts = gate.read(receiver.fileno(), buffer, gate.ROUNDS, 64, MAC1_KEY,
                                COOKIE_KEY, SECRET, False, 0, 0, b"")
        assert [(item[0], item[3]) for item in got] == [(t, 0) for t in transport]
        assert counts == (0, 1, 0, 0, 0, 0)


_READ_OUT_OF_MEMORY = """
import json, socket, _testcapi
from tests.unit.test_gate import COOKIE_KEY, MAC1_KEY, PUBLIC, SECRET, _initiation
from uspan.daemon import gate
from uspan.wg.cookie import CookieGenerator

receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.bind(("127.0.0.1", 0))
sender.bind(("127.0.0.1", 0))
receiver.setblocking(False)
sender.setblocking(False)
buffer = bytearray(gate.BATCH * gate.BUFFER_SIZE)
trials = []
for nth in range(20):
    for _ in range(2):  # no hand_up budget: both get a cookie reply from C
        sender.sendto(_initiation(CookieGenerator(PUBLIC), 1.0), receiver.getsockname())
    sender.sendto(bytes([4, 0, 0, 0]) + bytes(28), receiver.getsockname())  # goes up
    try:
        _testcapi.set_nomemory(nth, nth + 1)  # that one allocation fails, no other
        try:
            gate.read(receiver.fileno(), buffer, 1, 64, MAC1_KEY, COOKIE_KEY, SECRET,
                      True, 0, 2, b"")
        finally:
            _testcapi.remove_mem_hooks()
        raised = False
    except MemoryError:
        raised = True
    replies = 0
    for sock in (sender, receiver):  # count the replies; leave nothing for the next
        while True:
            try:
                sock.recv(65535)
            except BlockingIOError:
                break
            replies += sock is sender
    trials.append((raised, replies))
print(json.dumps(trials))
"""


@compiled
def test_cookies_made_before_an_error_midway_are_still_sent() -> None:
    """A read that fails midway (here a MemoryError handing up the datagram after two
    answered with a cookie) still sends the replies it made: their datagrams are read
    and the budget spent, and the caller sees only the exception. Each allocation of
    the read is failed in turn, in a child process (``_testcapi.set_nomemory``)."""
    pytest.importorskip("_testcapi")  # CPython's own test hooks (python3.11 has them)
    done = subprocess.run([sys.executable, "-c", _READ_OUT_OF_MEMORY], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    trials = [tuple(trial) for trial in json.loads(done.stdout)]
    assert trials[-1] == (False, 2)  # past the read's allocations: a whole read
    assert (True, 2) in trials  # failed after the cookies: they went out
    assert all(replies in (0, 2) for _, replies in trials)
