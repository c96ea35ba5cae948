"""Discovery frames as a node receives them from a (hostile or broken) service.

A real ``DiscoveryClient`` runs ``list()`` against a loopback TCP service that answers
hello properly and then sends the input as its reply (first byte 0: raw bytes; 1: the
rest as one msgpack message, framed with the request's id, so record and blob handling is
reached easily). Time is trio's autojumping mock clock, so backoffs cost nothing and a
hang is measured in virtual seconds.

Properties: ``list()`` returns or raises ``DiscoveryError`` (nothing else); it finishes
within the client's own retry budget (a service cannot make it wait longer, e.g. with a
huge ``retry_after``); the client holds no link to a service that broke the protocol.
"""

from __future__ import annotations

import functools
import threading

import atheris

with atheris.instrument_imports(include=["uspan"]):
    import msgpack
    import trio
    import trio.testing

    from uspan.discovery import protocol as p
    from uspan.discovery.client import (
        BACKOFF_MAX,
        CONNECT_TIMEOUT,
        REQUEST_TIMEOUT,
        DiscoveryClient,
        DiscoveryError,
    )
    from uspan.discovery.seal import Sealer

from fuzz.harness import check, main

SECRET = bytes(range(32))
ATTEMPTS = 3
BUDGET = ATTEMPTS * (BACKOFF_MAX * 1.5 + CONNECT_TIMEOUT + REQUEST_TIMEOUT) + 1


def _reply(data: bytes) -> bytes:
    if data[0] % 2 == 0:
        return data[1:]
    try:
        message = msgpack.unpackb(data[1:], raw=False, strict_map_key=False)
        return p.encode({"id": 2, **message} if isinstance(message, dict) else message)
    except Exception:
        return data[1:]


class _Service:
    """The loopback service; ``reply`` is what it sends after hello, per input."""

    def __init__(self) -> None:
        self.reply = b""
        self.port = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        decoder = p.FrameDecoder()
        reply = self.reply
        async with stream:
            try:
                while not (got := decoder.feed(await stream.receive_some(65536))):
                    pass
                await stream.send_all(p.encode(p.ok(got[0]["id"], version=p.VERSION,
                                                    server="fuzz", address="192.0.2.9",
                                                    port=1, nonce=bytes(p.NONCE_SIZE))))
                await stream.receive_some(65536)
                await stream.send_all(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError, p.ProtocolError):
                pass

    async def serve(self, ready: threading.Event, token: list[trio.lowlevel.TrioToken]) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1"))
            self.port = listeners[0].socket.getsockname()[1]
            token.append(trio.lowlevel.current_trio_token())
            ready.set()

    async def list_once(self, data: bytes) -> float:
        self.reply = _reply(data)
        client = DiscoveryClient([f"127.0.0.1:{self.port}"], "fuzz-cluster", SECRET,
                                 attempts=ATTEMPTS)
        started = trio.current_time()
        try:
            await client.list()
        except DiscoveryError:
            pass
        finally:
            await client.aclose()
        return trio.current_time() - started


def _start() -> tuple[_Service, trio.lowlevel.TrioToken]:
    service, ready = _Service(), threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    clock = trio.testing.MockClock(autojump_threshold=0)
    threading.Thread(target=trio.run, args=(service.serve, ready, token),
                     kwargs={"clock": clock}, daemon=True).start()
    ready.wait()
    return service, token[0]


SERVICE, TOKEN = _start()


def test_one(data: bytes) -> None:
    if not data:
        return
    elapsed = trio.from_thread.run(SERVICE.list_once, data, trio_token=TOKEN)
    check(elapsed <= BUDGET, f"list() took {elapsed:.0f} virtual seconds")


if __name__ == "__main__":
    sealer = Sealer(SECRET)
    record = {"id": "n1", "data": sealer.seal_data("n1", b"affiliate data"),
              "endpoints": [sealer.seal_endpoint("n1", "192.0.2.1", 51820), b"junk"]}
    main(test_one, [
        b"\x01" + msgpack.packb({"ok": True, "affiliates": [record]}),
        b"\x01" + msgpack.packb({"ok": True, "affiliates": [record], "more": True}),
        b"\x01" + msgpack.packb({"ok": False, "code": "rate_limited", "retry_after": 0.5}),
        b"\x01" + msgpack.packb({"ok": False, "code": "backend_unavailable", "message": "x"}),
        b"\x00" + p.encode(p.ok(2, affiliates=[record])),
    ])
