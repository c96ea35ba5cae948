"""Requests on the node's API socket (``uspan get``, ``apply-config``, ``leave``).

The input is the byte stream of one connection to ``ApiServer._handle`` (the node's own
handler) in front of a resource store holding an identity (with its private key) and a
peer status. The node control behind it parses the config as the node does
(``parse_config``) and records a leave; applying and leaving are the node's business, not
the parser's. Time is trio's autojumping mock clock: a watch waits for changes, so its
request ends after 60 virtual seconds.

Properties: nothing escapes the handler; every reply line is one JSON object; a reply
carries the private key only when the request asked for secrets; a request that got an
error reply did not apply, leave or stop anything.
"""

from __future__ import annotations

import json

import atheris

with atheris.instrument_imports(include=["uspan"]):
    import trio
    import trio.testing

    from uspan.mesh.config import parse_config, render_config
    from uspan.mesh.resources import KUBESPAN_IDENTITY, KUBESPAN_PEER_STATUS, Store
    from uspan.node.api import ApiServer, Changes

from fuzz.harness import check, main

PRIVATE = "cHJpdmF0ZSBrZXkgb2YgdGhlIGZ1enplZCBub2RlIQ=="


class _Control:
    def __init__(self) -> None:
        self.actions: list[str] = []

    async def apply_config(self, text: str) -> str:
        parse_config(text)
        self.actions.append("apply")
        return "applied"

    async def leave(self) -> str:
        self.actions.append("leave")
        return "left"

    def stop(self) -> None:
        self.actions.append("stop")


async def _serve(data: bytes) -> tuple[_Control, bytes]:
    changes = Changes()
    store = Store(1.7e9, on_change=changes.notify)
    store.put(KUBESPAN_IDENTITY, "kubespan", {"address": "fd00::1", "publicKey": "pub",
                                              "privateKey": PRIVATE}, 0.0)
    store.put(KUBESPAN_PEER_STATUS, "pub2", {"label": "n2", "state": "up"}, 0.0)
    control = _Control()
    server = ApiServer(store, changes, control, "fuzz")
    client, stream = trio.testing.memory_stream_pair()
    replies = bytearray()
    with trio.move_on_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._handle, stream)  # type: ignore[arg-type]  # any stream
            await client.send_all(data)
            await client.send_eof()
            while chunk := await client.receive_some(1 << 16):
                replies += chunk
    return control, bytes(replies)


def test_one(data: bytes) -> None:
    control, replies = trio.run(_serve, data, clock=trio.testing.MockClock(autojump_threshold=0))
    try:
        request = json.loads(data.split(b"\n", 1)[0])
    except ValueError:
        request = None
    secrets = isinstance(request, dict) and bool(request.get("secrets"))
    for line in replies.splitlines():
        reply = json.loads(line)
        check(isinstance(reply, dict), "a reply that is not a JSON object")
        if "error" in reply:
            check("apply" not in control.actions, "an error reply after applying")
    check(secrets or PRIVATE.encode() not in replies, "the private key without secrets")


if __name__ == "__main__":
    config = render_config(with_kubespan=True, discovery_endpoints=["192.0.2.254:3000"])
    main(test_one, [
        b'{"op":"get","type":"kubespanidentities","id":null,"watch":false,"secrets":false}\n',
        b'{"op":"get","type":"kubespanpeerstatuses","id":"pub2","secrets":true}\n',
        b'{"op":"get","type":"kubespanidentities","watch":true}\n',
        json.dumps({"op": "apply", "config": config}).encode() + b"\n",
        b'{"op":"leave"}\n',
    ])
