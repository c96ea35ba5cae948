"""The relay's trio server on loopback: real UDP and TCP sockets, real registrations."""

from __future__ import annotations

import socket

import trio

from uspan.discovery.proof import MemberKey
from uspan.relay import frames
from uspan.relay.server import RelayServer
from uspan.relay.session import RelaySession

KEY = MemberKey(b"s" * 32, "cluster")


async def udp_client(port: int, address: bytes) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    await sock.connect(("127.0.0.1", port))
    session = RelaySession(KEY, address)
    for frame, _ in session.tick(trio.current_time()):
        await sock.send(frame)
    while not session.registered(trio.current_time()):
        for frame in session.receive(await sock.recv(2048), trio.current_time()):
            await sock.send(frame)
    return sock


async def tcp_client(port: int, address: bytes) -> tuple[trio.SocketStream, list[bytes]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    session = RelaySession(KEY, address)
    decoder = frames.StreamDecoder()
    pending: list[bytes] = []
    for frame, _ in session.tick(trio.current_time()):
        await stream.send_all(frames.stream_frame(frame))
    while not session.registered(trio.current_time()):
        pending += decoder.feed(await stream.receive_some(4096))
        while pending and not session.registered(trio.current_time()):
            for frame in session.receive(pending.pop(0), trio.current_time()):
                await stream.send_all(frames.stream_frame(frame))
    return stream, pending


async def exchange() -> None:
    server = RelayServer()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await members_exchange(server, nursery)
            nursery.cancel_scope.cancel()


async def members_exchange(server: RelayServer, nursery: trio.Nursery) -> None:
    """Two UDP members and a TCP one exchange datagrams; a stranger is dropped."""
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    a = await udp_client(port, b"aaaaaaaa")
    b = await udp_client(port, b"bbbbbbbb")
    c, _ = await tcp_client(port, b"cccccccc")
    await a.send(frames.send_frame(b"bbbbbbbb", b"\x04wg to b"))
    assert frames.decode(await b.recv(2048)) == frames.Deliver(b"aaaaaaaa", b"\x04wg to b")
    await a.send(frames.send_frame(b"cccccccc", b"\x04wg to c"))
    decoder = frames.StreamDecoder()
    got: list[bytes] = []
    while not got:
        got = decoder.feed(await c.receive_some(4096))
    assert frames.decode(got[0]) == frames.Deliver(b"aaaaaaaa", b"\x04wg to c")
    await c.send_all(frames.stream_frame(frames.send_frame(b"aaaaaaaa", b"\x04from c")))
    assert frames.decode(await a.recv(2048)) == frames.Deliver(b"cccccccc", b"\x04from c")
    assert server.forwarder.forwarded == 3 and len(server.tcp) == 1
    # a stranger's frames are dropped and counted; a broken stream closes its connection
    stranger = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await stranger.sendto(frames.send_frame(b"aaaaaaaa", b"\x04x"), ("127.0.0.1", port))
    await c.send_all(b"\x00\x00")
    with trio.fail_after(5):
        while server.tcp or not server.forwarder.dropped["not_member"]:
            await trio.sleep(0.01)
    assert server.forwarder.dropped["bad_frame"] == 1
    assert b"cccccccc" not in {s.address for s in server.forwarder.sessions.values()}
    for sock in (a, b, stranger):
        sock.close()


def test_udp_and_tcp_members_exchange_datagrams() -> None:
    trio.run(exchange)
