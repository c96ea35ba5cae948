"""UAPI requests, as a client writes them to ``uspan-wg``'s socket.

The input is the whole byte stream of one connection, served by the daemon's own
``uapi_server.handle`` (framing, ``get``/``set``/``stats``, the size limit) in front of a
real ``Device`` (the daemon's ``set`` adds only the UDP rebind around ``Device.apply``).

Properties: nothing escapes ``handle``, and nothing reaches its catch-all for bugs (the
"set failed unexpectedly" log); a ``set`` answered with a non-zero errno changed nothing;
every reply ends with an errno line (a connection holding one refused ``set`` is
checked; with several requests a later one may rightly change the device).
"""

from __future__ import annotations

import logging

import atheris

with atheris.instrument_imports(include=["uspan"]):
    import trio
    import trio.testing

    from uspan.daemon import uapi_server
    from uspan.wg.config import DeviceChange
    from uspan.wg.crypto import clamp
    from uspan.wg.device import Device
    from uspan.wg.uapi import format_get

from fuzz.harness import PropertyFailure, check, main
from tests.unit.deviceinfo import device_info

KEY = clamp(bytes(range(1, 33)))
PEER = bytes(range(32, 64)).hex()


class _Target:
    """The daemon's ConfigTarget surface over the core alone."""

    def __init__(self) -> None:
        self.device = Device()
        self.device.apply(DeviceChange(private_key=KEY, listen_port=51820), 0.0)

    def get(self) -> str:
        return format_get(self.device)

    def set(self, change: DeviceChange) -> None:
        self.device.apply(change, 0.0)

    def stats(self) -> dict[str, int]:
        return {drop.value: n for drop, n in self.device.counters.items()}

    # The same surface as an async ConfigTarget (the daemon's, once ``get`` streams).
    async def get_pieces(self) -> list[bytes]:
        return [self.get().encode()]

    async def configure(self, change: DeviceChange) -> None:
        self.set(change)


class _Unexpected(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            raise PropertyFailure(f"the UAPI hit its catch-all: {record.getMessage()}")


logging.getLogger("uspan.daemon").addHandler(_Unexpected())
logging.getLogger("uspan.daemon").propagate = False


async def _serve(data: bytes, target: _Target) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    replies = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(uapi_server.handle, server, target)
        await client.send_all(data)
        await client.send_eof()
        while chunk := await client.receive_some(1 << 16):
            replies += chunk
    return bytes(replies)


def test_one(data: bytes) -> None:
    target = _Target()
    before = device_info(target.device)
    replies = trio.run(_serve, data, target).decode()
    check(replies == "" or replies.endswith("\n\n"), "a reply without its blank line")
    errnos = [x for x in replies.split("\n") if x.startswith("errno=")]
    check(len(errnos) == replies.count("\n\n"), "a reply without an errno line")
    if data.startswith(b"set=1\n") and errnos[:2] == [errnos[0]] and errnos[0] != "errno=0":
        # one request, refused (with several, a later one may rightly change the device)
        check(device_info(target.device) == before, "a refused set changed the device")


if __name__ == "__main__":
    main(test_one, [
        b"get=1\n\n",
        b"stats=1\n\n",
        f"set=1\nprivate_key={KEY.hex()}\nlisten_port=51821\nreplace_peers=true\n"
        f"public_key={PEER}\npreshared_key={'ab' * 32}\nendpoint=192.0.2.1:51820\n"
        f"persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
        f"allowed_ip=10.0.0.0/24\nallowed_ip=fd00::/64\n\nget=1\n\n".encode(),
        f"set=1\npublic_key={PEER}\nremove=true\nendpoint=[2001:db8::1]:1\n\n".encode(),
        f"set=1\npublic_key={PEER}\nupdate_only=true\nprotocol_version=1\n\n".encode(),
    ])
