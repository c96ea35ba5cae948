"""The UAPI text protocol (parse_set / format_get) and the server's request framing."""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.deviceinfo import device_info
from tests.unit.wgnet import Net, ipv4_packet
from uspan import unixsocket
from uspan.daemon import slices, uapi_server
from uspan.daemon.uapi_server import handle
from uspan.wg import prefix
from uspan.wg.config import ConfigError, DeviceChange, PeerChange
from uspan.wg.crypto import clamp
from uspan.wg.device import Device
from uspan.wg.endpoint import Endpoint
from uspan.wg.uapi import (
    GetParts,
    SetParser,
    format_errno,
    format_get,
    get_pieces,
    parse_set,
)

PRIVATE = bytes(range(1, 33))
PEER = bytes(range(100, 132))
PEER2 = bytes(range(200, 232))
PSK = bytes(range(50, 82))


def lines(text: str) -> list[str]:
    return text.strip("\n").split("\n")


def net(text: str) -> int:
    return prefix.of(ipaddress.ip_network(text))


# parse_set ---------------------------------------------------------------------------------


def test_parse_every_key() -> None:
    change = parse_set(lines(f"""
private_key={PRIVATE.hex()}
listen_port=51820
fwmark=4294967295
replace_peers=true
public_key={PEER.hex()}
update_only=true
preshared_key={PSK.hex()}
endpoint=[fd00::1]:51821
persistent_keepalive_interval=25
replace_allowed_ips=true
allowed_ip=10.1.2.0/24
allowed_ip=fd00::/64
protocol_version=1
public_key={PEER2.hex().upper()}
remove=true
"""))
    assert change.private_key == PRIVATE
    assert change.listen_port == 51820
    assert change.fwmark == 0xFFFFFFFF
    assert change.replace_peers
    first, second = change.peers
    assert first.public_key == PEER and first.update_only and not first.remove
    assert first.preshared_key == PSK
    assert first.endpoint == Endpoint("fd00::1", 51821)
    assert first.persistent_keepalive == 25
    assert first.replace_allowed_ips
    assert first.allowed_ips == [net("10.1.2.0/24"), net("fd00::/64")]
    assert first.protocol_version == 1
    assert second.public_key == PEER2 and second.remove
    assert second.allowed_ips == [] and second.endpoint is None


def test_parse_empty_and_defaults() -> None:
    assert parse_set([]) == DeviceChange()
    change = parse_set([f"public_key={PEER.hex()}"])
    peer = change.peers[0]
    assert (peer.preshared_key, peer.endpoint, peer.persistent_keepalive) == (None, None, None)
    assert not (peer.remove or peer.update_only or peer.replace_allowed_ips)


def test_zero_private_key_is_passed_through_to_mean_remove() -> None:
    assert parse_set([f"private_key={'0' * 64}"]).private_key == bytes(32)


def test_prefix_host_bits_are_masked() -> None:
    change = parse_set([f"public_key={PEER.hex()}", "allowed_ip=10.1.2.3/8",
                        "allowed_ip=fd00::1/0", "allowed_ip=192.0.2.1/32"])
    assert change.peers[0].allowed_ips == [net("10.0.0.0/8"), net("::/0"), net("192.0.2.1/32")]


@pytest.mark.parametrize(
    ("line", "key", "code"),
    [
        ("private_key=abc", "private_key", errno.EINVAL),
        (f"private_key={'g' * 64}", "private_key", errno.EINVAL),
        (f"private_key={'ab ' * 21}a", "private_key", errno.EINVAL),
        ("listen_port=65536", "listen_port", errno.EINVAL),
        ("listen_port=-1", "listen_port", errno.EINVAL),
        ("listen_port=", "listen_port", errno.EINVAL),
        ("fwmark=4294967296", "fwmark", errno.EINVAL),
        ("fwmark=0x10", "fwmark", errno.EINVAL),
        ("replace_peers=false", "replace_peers", errno.EINVAL),
        ("public_key=00", "public_key", errno.EINVAL),
        ("endpoint=1.2.3.4:1", "endpoint", errno.EINVAL),  # a peer key before any peer
        ("no_such_key=1", "no_such_key", errno.EINVAL),
        ("just text", "line", errno.EPROTO),
    ],
)
def test_device_errors_name_the_key(line: str, key: str, code: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse_set([line])
    assert info.value.field == key
    assert str(info.value).startswith(f"{key}: ")
    assert info.value.errno == code


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("remove=yes", "remove"),
        ("update_only=1", "update_only"),
        ("preshared_key=1234", "preshared_key"),
        ("endpoint=192.0.2.1", "endpoint"),
        ("endpoint=example.com:51820", "endpoint"),
        ("endpoint=[fd00::1]:0", "endpoint"),
        ("persistent_keepalive_interval=65536", "persistent_keepalive_interval"),
        ("persistent_keepalive_interval=x", "persistent_keepalive_interval"),
        ("replace_allowed_ips=TRUE", "replace_allowed_ips"),
        ("allowed_ip=10.0.0.1", "allowed_ip"),
        ("allowed_ip=10.0.0.0/33", "allowed_ip"),
        ("allowed_ip=fd00::/129", "allowed_ip"),
        ("allowed_ip=10.0.0.0/255.0.0.0", "allowed_ip"),
        ("allowed_ip=fe80::1%eth0/64", "allowed_ip"),
        ("allowed_ip=10.0.0/8", "allowed_ip"),
        ("allowed_ip=-10.0.0.0", "allowed_ip"),
        ("protocol_version=2", "protocol_version"),
        ("listen_port=1", "listen_port"),  # a device key after public_key
        ("private_key=" + "00" * 32, "private_key"),
        ("bogus=1", "bogus"),
    ],
)
def test_peer_errors_name_the_key(line: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_set([f"public_key={PEER.hex()}", line])
    assert info.value.field == key
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("key", ["private_key", "preshared_key"])
def test_bad_secret_is_not_echoed(key: str) -> None:
    secret = "7f" * 31 + "zz"
    request = [f"public_key={PEER.hex()}"] if key == "preshared_key" else []
    with pytest.raises(ConfigError) as info:
        parse_set([*request, f"{key}={secret}"])
    assert secret not in str(info.value) and "7f7f" not in str(info.value)


def test_130k_allowed_ips_parse_fast() -> None:
    body = [f"public_key={PEER.hex()}", "replace_allowed_ips=true"]
    body += [f"allowed_ip=10.{i >> 8 & 255}.{i & 255}.0/24" for i in range(65536)]
    body += [f"allowed_ip=fd00:{i:x}::/48" for i in range(130_000 - 65536)]
    start = time.process_time()  # CPU: a loaded machine stretches wall time
    change = parse_set(body)
    elapsed = time.process_time() - start
    networks = change.peers[0].allowed_ips
    assert len(networks) == 130_000
    assert networks[257] == net("10.1.1.0/24")
    assert networks[-1] == net(f"fd00:{130_000 - 65537:x}::/48")
    assert elapsed < 3.0


def parsed_line_by_line(body: list[str]) -> DeviceChange:
    parser = SetParser()
    for line in body:  # batches of one: never the batch path
        parser.feed([line])
    return parser.finish()


def parsed_in_batches(body: list[str], size: int = 64) -> DeviceChange:
    """As the server parses: from the bytes, about ``size`` lines at a time."""
    parser = SetParser()
    data, pos = "".join(line + "\n" for line in body).encode(), 0
    while pos < len(data):
        pos = parser.feed_bytes(data, pos, size)
    return parser.finish()


def hosts(sign: str, first: int, count: int) -> list[str]:
    return [f"allowed_ip={sign}10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32"
            for i in range(first, first + count)]


def test_batches_of_32_bit_prefixes_parse_as_lines_do() -> None:
    """Runs of IPv4 additions (or removals) take a faster path: the same change,
    whatever the mix of additions and removals around them."""
    body = [f"public_key={PEER.hex()}", *hosts("", 0, 300), *hosts("-", 100, 300),
            *hosts("", 250, 100), "allowed_ip=10.9.0.0/16", *hosts("-", 0, 64),
            "allowed_ip=::ffff:10.0.0.1/32", *hosts("", 1000, 200),
            f"public_key={PEER2.hex()}", *hosts("", 5000, 128)]
    for size in (32, 64, 100, 256):
        assert parsed_in_batches(body, size) == parsed_line_by_line(body)
    change = parsed_in_batches(body)
    assert change.peers[0].allowed_ips[0] == net("10.0.0.0/32")
    assert net("10.0.1.94/32") in change.peers[0].remove_allowed_ips
    assert net("10.0.1.0/32") not in change.peers[0].remove_allowed_ips  # added again


_BODY_LINES = st.sampled_from(
    [f"public_key={PEER.hex()}", f"public_key={PEER2.hex()}", "replace_allowed_ips=true",
     "endpoint=192.0.2.1:51820", "persistent_keepalive_interval=25", "listen_port=51820",
     "allowed_ip=fd00::/64", "allowed_ip=-fd00::/64", "allowed_ip=::ffff:10.0.0.1/128",
     "allowed_ip=10.0.0.1/33", "allowed_ip=10.0.0.01/32", "allowed_ip=10.0.0.1/32\r",
     "allowed_ip=-10.0.0.1/24 ", "bogus", "allowed_ip=10.0.0.1\u0661/32"])
_HOSTS = st.builds(lambda sign, first, count, length: [
    f"allowed_ip={sign}10.0.{i & 255}.0/{length}" for i in range(first, first + count)],
    st.sampled_from(["", "-"]), st.integers(0, 8), st.integers(1, 6), st.sampled_from([24, 32]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_BODY_LINES.map(lambda line: [line]) | _HOSTS, max_size=12),
       st.integers(1, 8))
def test_bytes_parse_as_lines_do(runs: list[list[str]], size: int) -> None:
    """The server's path (runs of IPv4 allowed_ip lines read in C, the rest as str lines)
    gives the change, or the error, that the lines one at a time give."""
    body = [line for run in runs for line in run]
    try:
        expected: DeviceChange | str = parsed_line_by_line(body)
    except ConfigError as exc:
        expected = f"{exc!s} {exc.errno}"
    try:
        got: DeviceChange | str = parsed_in_batches(body, size)
    except ConfigError as exc:
        got = f"{exc!s} {exc.errno}"
    assert got == expected


@pytest.mark.parametrize("bad", ["allowed_ip=10.0.0.256/32", "allowed_ip=10.00.0.1/32",
                                 "allowed_ip=10.0.0.1/32/32", "allowed_ipx=10.0.0.1/32",
                                 "allowed_ip=10.0.0.1/32 ", "allowed_ip=-10.0.0.1/033"])
def test_a_bad_line_in_a_batch_is_refused_as_alone(bad: str) -> None:
    body = [f"public_key={PEER.hex()}", *hosts("", 0, 40), bad, *hosts("", 40, 40)]
    with pytest.raises(ConfigError) as alone:
        parsed_line_by_line(body)
    with pytest.raises(ConfigError) as batched:
        parsed_in_batches(body)
    assert str(batched.value) == str(alone.value)


# format_get --------------------------------------------------------------------------------


def sample_device() -> Device:
    """A device with a peer of every field set (handshake, counters) and a bare one."""
    device = Device(rng=bytes)
    device.apply(DeviceChange(private_key=PRIVATE, listen_port=51820, peers=[
        PeerChange(PEER, preshared_key=PSK,
                   endpoint=Endpoint("192.0.2.7", 4500, local="192.0.2.1", ifindex=3),
                   persistent_keepalive=25,
                   allowed_ips=[net("10.0.0.0/24"), net("fd00:1::/64")]),
        PeerChange(PEER2)]), 100.0)
    peer = device.peers[PEER]
    device.wall_offset = 1_700_000_000 - 100
    peer.last_handshake, peer.rx_bytes, peer.tx_bytes = 100.25, 1234, 5678
    return device


def pieces_of(device: Device) -> list[bytes]:
    """The reply to ``get=1`` in the pieces the daemon sends."""
    parts: GetParts = []
    for _ in device.get_steps(parts):
        pass
    return list(get_pieces(parts))


def test_format_get_matches_wireguard_go_order() -> None:
    assert format_get(sample_device()) == (
        f"private_key={clamp(PRIVATE).hex()}\n"
        "listen_port=51820\n"
        f"public_key={PEER.hex()}\n"
        f"preshared_key={PSK.hex()}\n"
        "protocol_version=1\n"
        "endpoint=192.0.2.7:4500\n"
        "last_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=250000000\n"
        "tx_bytes=5678\n"
        "rx_bytes=1234\n"
        "persistent_keepalive_interval=25\n"
        "allowed_ip=10.0.0.0/24\n"
        "allowed_ip=fd00:1::/64\n"
        f"public_key={PEER2.hex()}\n"
        f"preshared_key={'0' * 64}\n"
        "protocol_version=1\n"
        "last_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\n"
        "tx_bytes=0\n"
        "rx_bytes=0\n"
        "persistent_keepalive_interval=0\n"
        "errno=0\n\n"
    )


def lines_of_peer(text: str, key: bytes) -> list[str]:
    """The lines of one peer in a ``get=1`` reply."""
    block = text.split(f"public_key={key.hex()}\n", 1)[1].split("public_key=", 1)[0]
    return block.removesuffix("errno=0\n\n").splitlines()


def test_a_get_shows_what_changed_since_the_get_before() -> None:
    """A peer's lines that only a set or a roam changes are kept from the get before
    (``Peer.get_head``): each way they can change shows in the next get, and so do
    counters and handshakes. Kept too long, the text would show the state before."""
    wires = Net()
    a = wires.add("a", "192.0.2.1", 51820, seed=1)
    b = wires.add("b", "192.0.2.2", 51821, seed=2)
    wires.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"])
    other = bytes([9]) * 32
    b.device.apply(DeviceChange(peers=[PeerChange(other)]), wires.now)
    before = lines_of_peer(format_get(b.device), a.public)
    assert before == [
        f"preshared_key={'0' * 64}", "protocol_version=1", "endpoint=192.0.2.1:51820",
        "last_handshake_time_sec=0", "last_handshake_time_nsec=0", "tx_bytes=0",
        "rx_bytes=0", "persistent_keepalive_interval=0", "allowed_ip=10.0.0.1/32"]

    wires.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])  # a handshake, then data
    wires.run()
    peer = wires.peer(b, a)
    shown = lines_of_peer(format_get(b.device), a.public)
    assert shown[3:7] == [f"last_handshake_time_sec={int(wires.now)}",
                          "last_handshake_time_nsec=0", f"tx_bytes={peer.tx_bytes}",
                          f"rx_bytes={peer.rx_bytes}"]
    assert peer.tx_bytes and peer.rx_bytes

    wires.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    datagram = wires.wire.pop()[0]
    b.device.receive([(datagram, Endpoint("198.51.100.7", 40000))], wires.now)  # roams
    assert lines_of_peer(format_get(b.device), a.public)[2] == "endpoint=198.51.100.7:40000"

    b.device.apply(parse_set([f"public_key={a.public.hex()}", f"preshared_key={PSK.hex()}",
                              "endpoint=192.0.2.9:7", "persistent_keepalive_interval=25"]),
                   wires.now)
    shown = lines_of_peer(format_get(b.device), a.public)
    assert shown[:3] == [f"preshared_key={PSK.hex()}", "protocol_version=1",
                         "endpoint=192.0.2.9:7"]
    assert shown[7:] == ["persistent_keepalive_interval=25", "allowed_ip=10.0.0.1/32"]
    b.device.apply(parse_set([f"public_key={a.public.hex()}", "allowed_ip=10.9.0.0/16"]),
                   wires.now)
    assert lines_of_peer(format_get(b.device), a.public)[8:] == [
        "allowed_ip=10.0.0.1/32", "allowed_ip=10.9.0.0/16"]

    # Another peer takes one of its prefixes over: a set that names only the other.
    b.device.apply(parse_set([f"public_key={other.hex()}", "allowed_ip=10.9.0.0/16"]),
                   wires.now)
    text = format_get(b.device)
    assert lines_of_peer(text, a.public)[8:] == ["allowed_ip=10.0.0.1/32"]
    assert lines_of_peer(text, other)[7:] == ["allowed_ip=10.9.0.0/16"]  # no endpoint


@pytest.mark.parametrize("cut", range(1, 4))
def test_a_get_after_a_set_stopped_midway_shows_what_the_device_holds(cut: int) -> None:
    """A set stopped between its slices (cancelled, or a bug raised) leaves the device
    holding part of it: the get must show that part, not the text kept from before. Here
    the peer holds none of the prefixes to remove, so no allowed-IPs stamp changes."""
    device = Device(rng=bytes)
    device.apply(DeviceChange(peers=[PeerChange(PEER, endpoint=Endpoint("192.0.2.1", 1))]),
                 0.0)
    format_get(device)
    steps = device.apply_steps(DeviceChange(peers=[PeerChange(
        PEER, preshared_key=PSK, endpoint=Endpoint("192.0.2.9", 9),
        remove_allowed_ips=[net("10.0.0.0/8")])]), 0.0, [])
    for _ in zip(range(cut), steps, strict=False):
        pass
    steps.close()
    peer = device.peers[PEER]
    endpoint = [] if peer.endpoint is None else [f"endpoint={peer.endpoint}"]
    assert lines_of_peer(format_get(device), PEER)[:3] == [
        f"preshared_key={peer.preshared_key.hex()}", "protocol_version=1", *endpoint]


def test_format_get_empty_device_and_fwmark() -> None:
    device = Device(rng=bytes)
    assert format_get(device) == "errno=0\n\n"
    device.apply(DeviceChange(fwmark=7, listen_port=1), 0.0)
    assert format_get(device) == "listen_port=1\nfwmark=7\nerrno=0\n\n"


def test_format_errno() -> None:
    assert format_errno(errno.EINVAL) == "errno=-22\n\n"
    assert format_errno(-errno.EADDRINUSE) == "errno=-98\n\n"
    assert format_errno(0) == "errno=0\n\n"


SETTABLE = {"private_key", "listen_port", "fwmark", "public_key", "preshared_key",
            "endpoint", "persistent_keepalive_interval", "allowed_ip", "protocol_version"}


def test_get_output_round_trips_through_parse_set() -> None:
    device = sample_device()
    info, text = device_info(device), format_get(device)
    body = [line for line in lines(text) if line.partition("=")[0] in SETTABLE]
    change = parse_set(body)
    assert change.private_key == info.private_key
    assert change.listen_port == info.listen_port
    assert [p.public_key for p in change.peers] == [p.public_key for p in info.peers]
    for peer_change, peer_info in zip(change.peers, info.peers, strict=True):
        assert peer_change.preshared_key == peer_info.preshared_key
        assert prefix.texts(peer_change.allowed_ips) == peer_info.allowed_ips
        assert peer_change.persistent_keepalive == peer_info.persistent_keepalive
        expected = peer_info.endpoint.without_source() if peer_info.endpoint else None
        assert peer_change.endpoint == expected


# The server's framing, against a real Device ---------------------------------------------


class DeviceTarget:
    """The daemon's ConfigTarget without sockets: a bare Device."""

    def __init__(self) -> None:
        self.device = Device(rng=lambda n: bytes(n))

    def get(self) -> str:
        return format_get(self.device)

    async def get_pieces(self) -> Iterator[bytes]:
        return iter(pieces_of(self.device))

    async def configure(self, change: DeviceChange) -> None:
        self.device.apply(change, 0.0)


async def converse(target: DeviceTarget, request: bytes, half_close: bool = True) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    reply = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle, server, target)
        await client.send_all(request)
        if half_close:
            await client.send_eof()
        while data := await client.receive_some(1 << 16):
            reply += data
    return bytes(reply)


class RecordingStream(trio.abc.Stream):
    """The server's end of a memory stream, recording the size of each write."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.writes: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(len(data))
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


def get_writes(target: DeviceTarget) -> list[int]:
    """The sizes of the writes of one ``get=1``, whose reply is checked whole."""

    async def run() -> tuple[bytes, list[int]]:
        client, server = trio.testing.memory_stream_pair()
        recording = RecordingStream(server)
        reply = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle, recording, target)
            await client.send_all(b"get=1\n\n")
            await client.send_eof()
            while data := await client.receive_some(1 << 20):
                reply += data
        return bytes(reply), recording.writes

    reply, writes = trio.run(run)
    assert reply.decode() == target.get()
    return writes


def test_a_get_goes_out_in_few_bounded_writes() -> None:
    """A write per piece was four sends (each a pass of the scheduler) for a peer of
    4,000 prefixes, the size ``bench/control``'s clients case reads; a huge reply still
    goes out in bounded writes, between other work."""
    target = DeviceTarget()
    for count in (4000, 40_000):
        body = "".join(f"allowed_ip=10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32\n"
                       for i in range(count))
        trio.run(converse, target, f"set=1\npublic_key={PEER.hex()}\n"
                                   f"replace_allowed_ips=true\n{body}\n".encode())
        assert len(list(pieces_of(target.device))) > 1
        writes = get_writes(target)
        pieces = [len(piece) for piece in pieces_of(target.device)]
        if count == 4000:
            assert len(writes) == 1
        else:
            assert len(writes) > 1 and min(writes) > 0
            assert max(writes) <= max(uapi_server._WRITE_SIZE, *pieces)


def test_a_peers_allowed_ips_are_rendered_once_per_change_of_them() -> None:
    """200 clients polling a peer of 3,700 prefixes joined and encoded its ~90 KB of
    lines at every get: now a get sends the bytes the first one made, until they change."""
    target = DeviceTarget()
    body = "".join(f"allowed_ip=10.0.{i >> 8}.{i & 255}/32\n" for i in range(3700))
    trio.run(converse, target, f"set=1\npublic_key={PEER.hex()}\n{body}\n".encode())

    def big_pieces() -> list[bytes]:
        return [piece for piece in pieces_of(target.device) if len(piece) > 80_000]

    assert big_pieces() == []  # the first get renders them, GET_PIECE_LINES a piece
    (kept,) = big_pieces()
    assert big_pieces()[0] is kept
    assert kept.count(b"\nallowed_ip=") == 3699
    trio.run(converse, target, f"set=1\npublic_key={PEER.hex()}\n"
                               "allowed_ip=10.1.0.0/16\n\n".encode())
    assert big_pieces() == []
    (changed,) = big_pieces()
    assert changed is not kept and changed == kept + b"allowed_ip=10.1.0.0/16\n"
    assert big_pieces()[0] is changed


class TaskSteps(trio.abc.Instrument):
    """Steps taken by tasks of a name (a step is a pass of the scheduler)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task.name.endswith(self.name)


def test_pending_connections_are_accepted_in_one_step(tmp_path: Path) -> None:
    """Through trio's ``accept`` each connection cost a pass of the scheduler, with 200
    clients polling ``get`` a good part of the daemon's CPU."""
    path = str(tmp_path / "uapi.sock")
    listener = unixsocket.listen(path, 0o177)
    clients = []
    for _ in range(50):  # waiting in the backlog, each with its request
        clients.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        clients[-1].connect(path)
        clients[-1].sendall(b"get=1\n\n")
    accepting = TaskSteps("serve")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uapi_server.serve, listener, DeviceTarget())
            with trio.fail_after(10):
                while len(select.select(clients, [], [], 0)[0]) < len(clients):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main, instruments=[accepting])
    assert all(client.recv(100) == b"errno=0\n\n" for client in clients)
    for client in clients:
        client.close()
    listener.close()
    assert accepting.steps <= 3


def test_a_get_on_the_socket_takes_few_passes_of_the_scheduler(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trio.SocketStream took a pass of the scheduler for each read, write and close of
    a connection (and two failed setsockopt calls): five for a get of one write, now
    the config lock's (none here) and the wait for the client's end."""
    path = str(tmp_path / "uapi.sock")
    listener = unixsocket.listen(path, 0o177)
    target = DeviceTarget()
    body = "".join(f"allowed_ip=10.0.{i >> 8}.{i & 255}/32\n" for i in range(3000))
    trio.run(converse, target, f"set=1\npublic_key={PEER.hex()}\n{body}\n".encode())
    monkeypatch.setattr(slices, "SLICE", 60.0)  # no pause of the reply's own (on a busy machine)
    handling = TaskSteps("handle")
    waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    waiting.connect(path)
    waiting.sendall(b"get=1\n\n")  # there when the handler starts: no wait for it

    async def main() -> bytes:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uapi_server.serve, listener, target)
            client = trio.socket.from_stdlib_socket(waiting)
            reply = bytearray()
            while not reply.endswith(b"\n\n"):
                reply += await client.recv(1 << 20)
            client.close()
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        return bytes(reply)

    assert trio.run(main, instruments=[handling]).decode() == target.get()
    listener.close()
    assert handling.steps <= 3


def test_server_handles_several_requests_per_connection() -> None:
    target = DeviceTarget()
    request = (
        f"set=1\nprivate_key={PRIVATE.hex()}\nlisten_port=5\npublic_key={PEER.hex()}\n"
        "allowed_ip=10.0.0.0/8\n\nget=1\n\n"
    ).encode()
    reply = trio.run(converse, target, request).decode()
    first, rest = reply.split("\n\n", 1)
    assert first == "errno=0"
    assert rest == format_get(target.device)
    assert f"public_key={PEER.hex()}\n" in rest and "allowed_ip=10.0.0.0/8\n" in rest


def test_server_bad_set_changes_nothing_and_keeps_connection() -> None:
    target = DeviceTarget()
    before = target.get()
    request = (f"set=1\npublic_key={PEER.hex()}\nallowed_ip=10.0.0.0/8\nallowed_ip=bad\n\n"
               "get=1\n\n").encode()
    reply = trio.run(converse, target, request).decode()
    assert reply == "errno=-22\n\n" + before


def test_server_rejects_unknown_operation_and_closes() -> None:
    reply = trio.run(converse, DeviceTarget(), b"hello=1\nget=1\n\n")
    assert reply == b"errno=-22\n\n"


def test_server_get_needs_blank_line() -> None:
    reply = trio.run(converse, DeviceTarget(), b"get=1\nx\n")
    assert reply == b"errno=-22\n\n"


def test_server_survives_garbage() -> None:
    target = DeviceTarget()
    for request in (b"\xff\xfe\n\n", b"set=1\n\xff=\x00\n\n", b"set=1\nnoequals\n\n", b"",
                    b"set=1\n" + b"a" * 100_000, b"get=1"):
        reply = trio.run(converse, target, request)
        assert reply in (b"", b"errno=-22\n\n", b"errno=-71\n\n", b"errno=-5\n\n",
                         b"errno=-90\n\n")
    assert target.get() == "errno=0\n\n"


def test_server_set_cut_short_by_eof_applies_nothing() -> None:
    target = DeviceTarget()
    before = target.get()
    reply = trio.run(converse, target, b"set=1\nreplace_peers=true\nlisten_port=7\n")
    assert reply == b"errno=-5\n\n"
    assert target.get() == before


def test_server_large_set_in_small_pieces() -> None:
    target = DeviceTarget()
    body = "".join(f"allowed_ip=10.{i >> 8}.{i & 255}.0/24\n" for i in range(20_000))
    request = f"set=1\npublic_key={PEER.hex()}\n{body}\n".encode()

    async def run() -> bytes:
        client, server = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle, server, target)
            for i in range(0, len(request), 1000):
                await client.send_all(request[i:i + 1000])
            reply = await client.receive_some(100)
            await client.aclose()
        return reply

    assert trio.run(run) == b"errno=0\n\n"
    assert len(device_info(target.device).peers[0].allowed_ips) == 20_000


def test_allowed_ip_removal_line() -> None:
    change = parse_set([f"public_key={PEER.hex()}", "allowed_ip=-10.1.0.0/16"])
    assert change.peers[0].remove_allowed_ips == [net("10.1.0.0/16")]
    assert change.peers[0].allowed_ips == []


@pytest.mark.parametrize(
    ("body", "mine", "others"),
    [
        # replace_allowed_ips drops what came before it
        (["allowed_ip=10.0.0.0/24", "replace_allowed_ips=true", "allowed_ip=10.1.0.0/24"],
         ["10.1.0.0/24"], ["10.2.0.0/24"]),
        # a later addition cancels an earlier removal, and the other way round
        (["allowed_ip=-10.9.0.0/24", "allowed_ip=10.9.0.0/24"],
         ["10.9.0.0/24"], ["10.2.0.0/24"]),
        (["allowed_ip=10.9.0.0/24", "allowed_ip=-10.9.0.0/24"], [], ["10.2.0.0/24"]),
        # as in wireguard-go: the addition takes the prefix over, the removal drops it
        (["allowed_ip=10.2.0.0/24", "allowed_ip=-10.2.0.0/24"], [], []),
        (["allowed_ip=-10.2.0.0/24"], [], ["10.2.0.0/24"]),
        (["allowed_ip=10.9.0.0/24", "allowed_ip=-10.9.0.0/24", "allowed_ip=10.9.0.0/24",
          "allowed_ip=10.9.0.0/24"], ["10.9.0.0/24"], ["10.2.0.0/24"]),
    ],
)
def test_allowed_ip_lines_have_their_effect_in_order(body: list[str], mine: list[str],
                                                     others: list[str]) -> None:
    device = Device(rng=bytes)
    device.apply(parse_set([f"public_key={PEER2.hex()}", "allowed_ip=10.2.0.0/24"]), 0.0)
    device.apply(parse_set([f"public_key={PEER.hex()}", *body]), 0.0)
    shown = {peer.public_key: list(peer.allowed_ips) for peer in device_info(device).peers}
    assert shown == {PEER2: others, PEER: mine}


def test_nul_in_prefix_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_set([f"public_key={PEER.hex()}", "allowed_ip=1.2.3.4\x00/32"])
    assert info.value.field == "allowed_ip" and info.value.errno == errno.EINVAL


@pytest.mark.parametrize("bare", ["allowed_ip", "endpoint"])
def test_a_peer_key_without_a_value_is_a_protocol_error(bare: str) -> None:
    with pytest.raises(ConfigError) as info:  # wireguard-go: errno=-71 for both
        parse_set(["public_key=" + "ab" * 32, bare])
    assert info.value.errno == errno.EPROTO


def test_server_lets_go_of_a_big_change_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parsed prefixes of a big set are dropped a slice at a time after it is applied
    (a million at once is one ~5 ms step), and all of them are dropped."""
    monkeypatch.setattr(slices, "SLICE", 0.0)  # every pause is a checkpoint
    count = 3 * uapi_server._RELEASE_STEP
    request = "".join(["set=1\n", f"public_key={PEER.hex()}\n",
                       *(f"allowed_ip={line[11:]}\n" for line in hosts("", 0, count)),
                       "\n"]).encode()
    target = KeepingTarget()
    seen: set[int] = set()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                while True:
                    if target.change is not None:
                        seen.add(len(target.change.peers[0].allowed_ips))
                    await trio.sleep(0)
            nursery.start_soon(watch)
            assert await converse(target, request) == b"errno=0\n\n"
            nursery.cancel_scope.cancel()

    trio.run(run)
    assert target.change is not None and target.change.peers[0].allowed_ips == []
    assert len(target.device.allowed_ips) == count
    assert {n for n in seen if 0 < n < count}  # seen part released


class KeepingTarget(DeviceTarget):
    """Keeps the change it applied, to see what the server does with it afterwards."""

    change: DeviceChange | None = None

    async def configure(self, change: DeviceChange) -> None:
        self.device.apply(change, 0.0)
        self.change = change


def test_a_last_line_without_a_newline_parses_whole() -> None:
    """feed_bytes cut the last byte of data that did not end in a newline: the last
    prefix became another one (1.2.3.4/32 read as 0.0.0.0/3), without an error."""
    body = [f"public_key={PEER.hex()}", "allowed_ip=10.0.0.0/8", "allowed_ip=1.2.3.4/32"]
    parser = SetParser()
    data, pos = "\n".join(body).encode(), 0
    while pos < len(data):
        pos = parser.feed_bytes(data, pos, 256)
    assert parser.finish() == parsed_line_by_line(body)


def test_a_call_parses_few_of_the_lines_python_reads() -> None:
    """A mesh set is all key, endpoint and IPv6 lines, 2-5 us each in Python: 256 of
    them between two looks at the slice clock held the loop 1-2 ms. A call reads an
    eighth as many of those, and the whole still parses as line by line."""
    body = [line for i in range(100) for line in (
        f"public_key={(bytes([i + 1]) * 32).hex()}",
        f"endpoint=198.18.0.{i}:51820", "persistent_keepalive_interval=25",
        f"preshared_key={(bytes([i + 2]) * 32).hex()}", f"allowed_ip=fd00:78::{i:x}/128")]
    data, pos, parser = "".join(line + "\n" for line in body).encode(), 0, SetParser()
    read = []
    while pos < len(data):
        start, pos = pos, parser.feed_bytes(data, pos, 256)
        read.append(data.count(b"\n", start, pos))
    assert max(read) == 256 // 8
    assert sum(read) == len(body)
    assert parser.finish() == parsed_line_by_line(body)


class ReadyStream(trio.abc.Stream):
    """A client's requests all there at once, read and answered without a checkpoint:
    what the bare socket (``uapi_server._Connection``) does while data is ready."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return self.chunks.pop(0) if self.chunks else b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def steps_of_handling(chunks: list[bytes]) -> tuple[bytes, int]:
    stream, handling = ReadyStream(list(chunks)), TaskSteps("handle")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle, stream, DeviceTarget())

    trio.run(main, instruments=[handling])
    return bytes(stream.sent), handling.steps


def test_pipelined_refused_sets_each_pass_a_checkpoint() -> None:
    """A refused set takes no config lock: on the bare socket, a client pipelining them
    held the loop (the tunnel) for as long as it kept the socket's buffer full."""
    request = b"set=1\nlisten_port=nonsense\n\n"
    reply, steps = steps_of_handling([request * 100])
    assert reply == format_errno(errno.EINVAL).encode() * 100
    assert steps > 100


def test_a_refused_sets_body_is_read_on_in_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read on to its end after a refusal, a big body (data always ready on the bare
    socket) was read in one step of the scheduler."""
    monkeypatch.setattr(slices, "SLICE", 0.0)
    body = b"".join(b"allowed_ip=10.0.%d.%d/32\n" % (i >> 8, i & 255) for i in range(2000))
    chunks = [b"set=1\nnonsense=1\n" + body[:1000]]
    chunks += [body[start:start + 1000] for start in range(1000, len(body), 1000)]
    chunks.append(b"\n")
    count = len(chunks)
    reply, steps = steps_of_handling(chunks)
    assert reply == format_errno(errno.EINVAL).encode()
    assert steps > count // 2


def test_a_client_gone_mid_reply_ends_its_handler_and_others_are_served(
        tmp_path: Path) -> None:
    """On the bare socket: a client that closes before reading a big reply makes the
    write fail (EPIPE or ECONNRESET), which ends its handler and closes its socket; the
    next client gets its whole reply."""
    path = str(tmp_path / "uapi.sock")
    listener = unixsocket.listen(path, 0o177)
    target = DeviceTarget()
    body = "".join(f"allowed_ip=10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32\n"
                   for i in range(40_000))
    trio.run(converse, target, f"set=1\npublic_key={PEER.hex()}\n{body}\n".encode())
    expected = target.get().encode()
    assert len(expected) > 3 * uapi_server._WRITE_SIZE  # more than the socket buffers

    async def get(read_all: bool) -> bytes:
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(path)
        await client.send(b"get=1\n\n")
        reply = bytearray(await client.recv(100))
        while read_all and not reply.endswith(b"errno=0\n\n"):
            reply += await client.recv(1 << 20)
        client.close()
        return bytes(reply)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(uapi_server.serve, listener, target)
            with trio.fail_after(30):
                assert len(await get(read_all=False)) <= 100
                assert await get(read_all=True) == expected
                while len(nursery.child_tasks) > 1:  # serve's own: the handlers ended
                    await trio.sleep(0.01)
                (serving,) = nursery.child_tasks
                while serving.child_nurseries[0].child_tasks:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    listener.close()


_SIGPIPE_SERVER = """
import signal, socket, sys, trio
sys.path.insert(0, sys.argv[2])
from test_uapi import DeviceTarget, PEER, converse
from uspan import unixsocket
from uspan.daemon import uapi_server
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a tool has it (e.g. a test harness)
target = DeviceTarget()
body = "".join(f"allowed_ip=10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32\\n" for i in range(40_000))
trio.run(converse, target, f"set=1\\npublic_key={PEER.hex()}\\n{body}\\n".encode())
listener = unixsocket.listen(sys.argv[1], 0o177)

async def main():
    async with trio.open_nursery() as nursery:
        nursery.start_soon(uapi_server.serve, listener, target)
        client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await client.connect(sys.argv[1])
        await client.send(b"get=1\\n\\n")
        await client.recv(100)
        client.close()  # gone mid-reply: the server's next write fails
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()

trio.run(main)
print("alive")
"""


def test_a_client_gone_mid_reply_never_raises_sigpipe(tmp_path: Path) -> None:
    """Whatever the process's SIGPIPE (``uspan.cli.main`` once set it to its default
    for services too), a write to a client gone mid-reply must not kill it: the UAPI
    sends with MSG_NOSIGNAL."""
    result = subprocess.run(
        [sys.executable, "-c", _SIGPIPE_SERVER, str(tmp_path / "uapi.sock"),
         str(Path(__file__).parent)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "alive\n"), result.stderr[-2000:]
