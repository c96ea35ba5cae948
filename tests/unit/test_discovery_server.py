"""The server and client in one trio process on loopback: requests, watch, hostile
connections, rate limits, backlog, failover. (The service as a process: tests/system.)"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
import trio

from uspan.discovery import protocol as p
from uspan.discovery.backend import MemoryBackend
from uspan.discovery.client import (
    Deleted,
    DiscoveryClient,
    DiscoveryError,
    DiscoveryUnavailable,
    Snapshot,
    Updated,
    View,
)
from uspan.discovery.server import Limits, Server

SECRET = bytes(range(32))
FAST = Limits(rate=1000, burst=1000, hello_timeout=0.5, frame_timeout=0.5, idle_timeout=5)

Test = Callable[[Server, str], Awaitable[None]]


def serving(test: Test, limits: Limits = FAST) -> None:
    async def main() -> None:
        server = Server(MemoryBackend(), limits)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, "127.0.0.1", 0)
            port = listeners[0].socket.getsockname()[1]
            with trio.fail_after(20):
                await test(server, f"127.0.0.1:{port}")
            nursery.cancel_scope.cancel()

    trio.run(main)


def client(address: str, secret: bytes = SECRET, **kwargs: Any) -> DiscoveryClient:
    return DiscoveryClient([address], "cluster", secret, backoff_min=0.01, **kwargs)


async def raw(address: str) -> trio.SocketStream:
    host, port = address.rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def read_all(stream: trio.SocketStream) -> list[dict[str, Any]]:
    decoder, out = p.FrameDecoder(), []
    while data := await stream.receive_some(65536):
        out += decoder.feed(data)
    return out


def test_update_list_delete_and_hello() -> None:
    async def test(server: Server, address: str) -> None:
        async with client(address) as c:
            info = await c.hello()
            assert info.address == "127.0.0.1" and info.version == p.VERSION
            await c.update("n1", b"secret data", [("192.0.2.1", 51820)], 60)
            (one,) = await c.list()
            assert (one.id, one.data, one.endpoints) == (
                "n1",
                b"secret data",
                (("192.0.2.1", 51820),),
            )
            raw_records = await c.list_raw()
            assert b"secret data" not in raw_records[0]["data"]  # the service sees blobs
            await c.delete("n1")
            assert await c.list() == []
            assert c.status.requests.connected and c.status.requests.endpoint == address

    serving(test)


def test_connections_notice_a_dead_service_within_30_s() -> None:
    """A NAT that forgets the connection silently leaves an idle watch waiting for hours
    with the kernel's keepalive defaults."""
    async def test(server: Server, address: str) -> None:
        async with client(address) as c:
            await c.hello()
            assert c._link is not None
            sock = c._link.stream.socket
            options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE), (socket.IPPROTO_TCP,
                       socket.TCP_KEEPIDLE), (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                       (socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                       (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)]
            values = [sock.getsockopt(level, name) for level, name in options]
            assert values[0] == 1 and values[1] + values[2] * values[3] <= 30
            assert values[4] == 30_000

    serving(test)


def test_watch_snapshot_then_events() -> None:
    async def test(server: Server, address: str) -> None:
        async with client(address) as writer, client(address) as watcher:
            await writer.update("n1", b"1", [], 60)
            async with watcher.watch() as events:
                snapshot = await events.receive()
                assert isinstance(snapshot, Snapshot)
                assert [a.id for a in snapshot.affiliates] == ["n1"]
                await writer.update("n2", b"2", [], 60)
                event = await events.receive()
                assert isinstance(event, Updated) and event.affiliate.id == "n2"
                await writer.delete("n1")
                assert await events.receive() == Deleted("n1")
                assert watcher.status.watching

    serving(test)


def test_wrong_secret_sees_nothing() -> None:
    async def test(server: Server, address: str) -> None:
        async with client(address) as member, client(address, os.urandom(32)) as outsider:
            await member.update("n1", b"1", [], 60)
            for call in (
                outsider.list,
                lambda: outsider.delete("n1"),
                lambda: outsider.update("n1", b"x", [], 60),
            ):
                with pytest.raises(DiscoveryError) as caught:
                    await call()
                assert caught.value.code == p.E_PROOF_MISMATCH
            assert [a.data for a in await member.list()] == [b"1"]

    serving(test)


def test_limit_refusal_keeps_the_connection() -> None:
    async def test(server: Server, address: str) -> None:
        async with client(address) as c:
            with pytest.raises(DiscoveryError) as caught:
                await c.update_blobs("n1", bytes(3000), [], 60)
            assert caught.value.code == p.E_LIMIT_DATA
            await c.update("n1", b"ok", [], 60)  # same connection still serves
            assert c.status.requests.connects == 1
            assert server.stats.refusals[p.E_LIMIT_DATA] == 1

    serving(test)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # oversized length
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # garbage msgpack
        p.encode({"op": "list", "id": 1}),  # list before hello
        p.encode({"op": "explode", "id": 1}),
        p.encode({"op": "hello", "id": 1, "version": 99}),
        struct.pack(">I", 4) + msgpack.packb([1, 2, 3]),
    ],
)
def test_hostile_connection_closed_others_undisturbed(payload: bytes) -> None:
    async def test(server: Server, address: str) -> None:
        watcher = client(address)
        async with client(address) as writer, watcher, watcher.watch() as events:
            await events.receive()
            stream = await raw(address)
            await stream.send_all(payload)
            replies = await read_all(stream)  # the service closes it
            assert len(replies) == 1 and replies[0]["ok"] is False
            assert replies[0]["fatal"] is True
            await writer.update("n1", b"1", [], 60)
            event = await events.receive()
            assert isinstance(event, Updated)
            assert watcher.status.watch.connects == 1

    serving(test)


def test_slow_loris_is_cut_off() -> None:
    async def test(server: Server, address: str) -> None:
        silent = await raw(address)  # never says hello
        dribbling = await raw(address)
        await dribbling.send_all(p.encode({"op": "hello", "id": 1, "version": 1})[:5])
        for stream in (silent, dribbling):
            replies = await read_all(stream)
            assert replies[-1]["code"] == p.E_TIMEOUT
        # after hello: one byte at a time, each well within the timeout, is still cut off
        slow = await raw(address)
        await slow.send_all(p.encode({"op": "hello", "id": 1, "version": 1}))
        frame = p.encode(
            {"op": "list", "id": 2, "cluster": "c", "key": bytes(32), "seq": 1, "sig": bytes(64)}
        )
        start = trio.current_time()
        replies: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery:

            async def dribble() -> None:
                for byte in frame[:-1]:
                    await slow.send_all(bytes([byte]))
                    await trio.sleep(0.1)

            nursery.start_soon(dribble)
            decoder = p.FrameDecoder()
            while not any("code" in r for r in replies):  # past the hello reply
                replies += decoder.feed(await slow.receive_some(65536))
            nursery.cancel_scope.cancel()
        assert replies[-1]["code"] == p.E_TIMEOUT
        assert trio.current_time() - start < 2

    serving(test)


def test_rate_limit_refuses_and_client_waits() -> None:
    async def test(server: Server, address: str) -> None:
        async with client(address, attempts=1) as c:
            start = trio.current_time()
            await c.hello()
            served = 1
            with pytest.raises(DiscoveryError) as caught:  # a loaded machine refills some
                for _ in range(100):
                    await c.list()
                    served += 1
            assert caught.value.code == p.E_RATE_LIMITED and caught.value.retryable
            refilled = (trio.current_time() - start) * 20
            assert 5 <= served <= 5 + refilled + 1  # the burst, then the rate
        async with client(address, attempts=5) as patient:
            await patient.list()  # waits for a token (retry_after) and succeeds

    serving(test, Limits(rate=20, burst=5))


def test_lagging_watcher_is_cut_off_and_resubscribes() -> None:
    async def test(server: Server, address: str) -> None:
        watcher = client(address)
        async with client(address) as writer, watcher, watcher.watch() as events:
            await events.receive()
            # flood while the consumer does not read: more than 32 + buffers behind
            for i in range(3000):
                await writer.update_blobs(f"n{i % 900}", bytes(2000), [], 60)
            assert server.stats.refusals[p.E_WATCH_OVERFLOW] >= 1
            # the client re-subscribed: after a fresh snapshot, it has everything
            view = View()
            while not (view.snapshots and len(view.affiliates) == 900):
                view.apply(await events.receive())

    serving(test)


def test_failover_to_the_next_address() -> None:
    async def test(server: Server, address: str) -> None:
        dead = trio.socket.socket()
        await dead.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{dead.getsockname()[1]}"  # bound, not listening: refused
        c = DiscoveryClient([dead_address, address], "cluster", SECRET, backoff_min=0.01)
        async with c:
            await c.update("n1", b"1", [], 60)
            assert c.status.requests.endpoint == address
            assert c.status.requests.last_error is not None
        dead.close()
        nobody = DiscoveryClient([dead_address], "cluster", SECRET, backoff_min=0.01)
        with pytest.raises(DiscoveryUnavailable):
            await nobody.list()

    serving(test)
