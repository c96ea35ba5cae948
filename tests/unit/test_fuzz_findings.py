"""What the fuzz targets found, pinned: each was a crash, a hang or a traceback for the
user before its fix."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing

from uspan.discovery import protocol as p
from uspan.discovery.client import BACKOFF_MAX, DiscoveryClient, DiscoveryError
from uspan.lab.record import LabError, load
from uspan.mesh.config import ConfigError, parse_config
from uspan.node.node import NodeError, load_config


@pytest.mark.parametrize("after", [1e300, float("inf"), -5.0, float("nan")])
def test_a_service_cannot_make_the_client_wait_for_ever(after: float) -> None:
    """fuzz/discovery_client: ``retry_after`` 8.9e307 made ``list()`` sleep for ever."""

    async def service(stream: trio.SocketStream) -> None:
        decoder = p.FrameDecoder()
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                for message in decoder.feed(data):
                    if message["op"] == "hello":
                        reply = p.ok(message["id"], version=p.VERSION, server="x",
                                     address="127.0.0.1", port=1, nonce=bytes(p.NONCE_SIZE))
                    else:
                        reply = {"id": message["id"], "ok": False, "code": p.E_RATE_LIMITED,
                                 "message": "slow down", "retry_after": after}
                    await stream.send_all(frame(reply))

    def frame(message: dict[str, object]) -> bytes:
        body = msgpack.packb(message, use_bin_type=True)
        return p.HEADER.pack(len(body)) + body

    async def main() -> float:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, service, 0)
            port = listeners[0].socket.getsockname()[1]
            client = DiscoveryClient([f"127.0.0.1:{port}"], "c", bytes(32), attempts=3)
            started = trio.current_time()
            with pytest.raises(DiscoveryError):
                await client.list()
            await client.aclose()
            nursery.cancel_scope.cancel()
        return trio.current_time() - started

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.05))
    assert elapsed <= 2 * BACKOFF_MAX + 1


def test_a_config_file_that_is_not_utf8_is_one_error_line(tmp_path: Path) -> None:
    """fuzz/config: a stray byte made ``uspan run`` die with UnicodeDecodeError."""
    path = tmp_path / "config.yaml"
    path.write_bytes(b"kubespan:\n  enabled: \x93true\n")
    with pytest.raises(NodeError, match="not UTF-8 text"):
        load_config(path)


def test_a_yaml_error_is_one_line() -> None:
    """fuzz/config: a control character gave a multi-line message."""
    with pytest.raises(ConfigError) as caught:
        parse_config("cluster:\n  id: \x02\n")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("record", [
    [], {"name": "x"}, {"name": "x", "root": "/", "networks": 1, "mtu": 1420,
                         "nodes": [{"adDress": 1}]},
    {"name": "x", "root": "/", "networks": "1", "mtu": 1420, "nodes": []},
    {"name": "x", "root": "/", "networks": 1, "mtu": 1420, "nodes": [],
     "discovery": {"pid": "12", "start": None, "argv": []}},
])
def test_a_damaged_lab_record_is_one_error_line(tmp_path: Path, record: object) -> None:
    """fuzz/labrecord: a damaged ``lab.json`` gave TypeError/KeyError tracebacks."""
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "lab.json").write_text(json.dumps(record))
    with pytest.raises(LabError, match="unreadable lab record"):
        load(tmp_path, "lab")


def test_a_non_ascii_private_key_is_an_identity_error(tmp_path: Path) -> None:
    """fuzz/config: ``privateKey: é`` raised a bare ValueError out of base64."""
    from uspan.mesh import identity

    (tmp_path / identity.KUBESPAN_IDENTITY_FILE).write_text("privateKey: \u00e9\n")
    with pytest.raises(identity.IdentityError, match="not base64"):
        identity.load_or_create(tmp_path)


def test_a_record_with_endpoints_that_are_not_bin_opens_without_them() -> None:
    """fuzz/discovery_client: ``endpoints: [7]`` in a service's reply raised TypeError."""
    client = DiscoveryClient(["127.0.0.1:1"], "c", bytes(32))
    for endpoints in ([7, "x", None], 7, "text"):
        affiliate = client._open_record({"id": "a", "data": None, "endpoints": endpoints})
        assert affiliate.endpoints == ()
