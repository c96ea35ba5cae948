"""Discovery frames as the service receives them from a client.

The input becomes the byte stream of one connection to the service's own connection
handler (``server._Connection``: framing, hello, proofs, requests, the store), with a
fresh in-memory backend. The first byte picks the form:

- 0: a valid hello frame, then the rest raw;
- 1: the rest raw, from the first byte on;
- 2: the rest as one msgpack message, which the harness signs correctly (the fuzzer
  cannot forge Ed25519) after a hello, so updates, deletes, lists and watches reach the
  store and its limits.

Properties: nothing escapes the handler (the service's catch-all for bugs is never
reached); every reply is a well-formed frame; a connection that got only refusals left
the store as it was; the outbox stays bounded.
"""

from __future__ import annotations

import struct

import atheris

with atheris.instrument_imports(include=["uspan"]):
    import msgpack
    import trio

    from uspan.discovery import protocol as p
    from uspan.discovery.backend import MemoryBackend
    from uspan.discovery.proof import MemberKey, proof_message
    from uspan.discovery.server import OUTBOX_LIMIT, Server, _Connection

from fuzz.harness import check, main

SECRET = bytes(range(32))
CLUSTER = "fuzz-cluster"
KEY = MemberKey(SECRET, CLUSTER)
HELLO = p.encode({"op": "hello", "id": 1, "version": p.VERSION})


class _Stream:
    """The connection's client side: what it sent, then end of stream."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        chunk, self.data = self.data[:65536], self.data[65536:]
        await trio.lowlevel.checkpoint()
        return chunk


def signed(message: dict[str, object], nonce: bytes) -> bytes:
    op = message.get("op")
    fields = {k: message.get(k) for k in ("affiliate", "data", "endpoints", "ttl")}
    endpoints = fields["endpoints"]
    try:
        sig = KEY.sign(proof_message(
            nonce, 1, str(op), CLUSTER, fields["affiliate"] or "", fields["data"],  # type: ignore[arg-type]
            tuple(endpoints) if isinstance(endpoints, list) else (), fields["ttl"] or 0))  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError, struct.error):
        sig = bytes(64)  # fields proof_message cannot take: the service must refuse them
    try:
        return p.encode({"id": 2, "cluster": CLUSTER, **message, "key": KEY.public, "seq": 1,
                         "sig": sig})
    except (TypeError, ValueError, p.ProtocolError):
        return b""


async def _serve(data: bytes) -> tuple[Server, _Connection, list[object], list[object]]:
    server = Server(MemoryBackend())
    conn = _Connection(server, _Stream(b""), "192.0.2.7", 40000)  # type: ignore[arg-type]
    mode, body = data[0] % 3, data[1:]
    if mode == 0:
        stream = HELLO + body
    elif mode == 1:
        stream = body
    else:
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except Exception:
            return server, conn, [], []
        if not isinstance(message, dict):
            return server, conn, [], []
        stream = HELLO + signed(message, conn.proof.nonce)
    conn.stream = _Stream(stream)  # type: ignore[assignment]
    store = server.backend.store  # type: ignore[attr-defined]
    before = store.dump()
    await conn.reader()
    return server, conn, before, store.dump()


def test_one(data: bytes) -> None:
    if not data:
        return
    _, conn, before, after = trio.run(_serve, data)
    check(len(conn.outbox) <= OUTBOX_LIMIT + 1, "the outbox grows past its limit")
    frames = p.FrameDecoder().feed(b"".join(frame for frame, _ in conn.outbox))
    check(len(frames) == len(conn.outbox), "a reply is not one whole frame")
    refused = all(f.get("ok") is not True or "version" in f for f in frames)
    if refused:
        check(before == after, "a refused connection changed the store")


if __name__ == "__main__":
    import os

    nonce = os.urandom(p.NONCE_SIZE)
    main(test_one, [
        b"\x00",
        b"\x01" + HELLO,
        b"\x02" + msgpack.packb({"op": "update", "affiliate": "a1", "data": b"blob",
                                 "endpoints": [b"e1", b"e2"], "ttl": 60}),
        b"\x02" + msgpack.packb({"op": "list"}),
        b"\x02" + msgpack.packb({"op": "watch"}),
        b"\x02" + msgpack.packb({"op": "delete", "affiliate": "a1"}),
        b"\x00" + signed({"op": "list"}, nonce),
    ])
