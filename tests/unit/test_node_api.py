"""uspan.node.api: the local socket that ``uspan get``, ``apply-config`` and ``leave`` use."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from uspan.mesh.resources import (
    KUBESPAN_IDENTITY,
    KUBESPAN_PEER_STATUS,
    REDACTED,
    Event,
    EventKind,
    Store,
)
from uspan.node.api import ApiClient, ApiError, ApiServer, Changes, open_listener


class FakeControl:
    def __init__(self) -> None:
        self.applied: list[str] = []
        self.left = False
        self.stopped = 0

    async def apply_config(self, text: str) -> str:
        if "bad" in text:
            raise ValueError("kubespan.mtu: must be at least 1280, not 1000")
        self.applied.append(text)
        return "applied: mtu"

    async def leave(self) -> str:
        self.left = True
        return "left the cluster"

    def stop(self) -> None:
        self.stopped += 1


def status_spec(state: str) -> dict[str, object]:
    return {"label": "n2", "endpoint": "192.0.2.2:51820", "state": state,
            "receiveBytes": 1, "transmitBytes": 2}


async def serving(tmp_path: Path, nursery: trio.Nursery) -> tuple[Store, FakeControl, str]:
    changes = Changes()
    store = Store(wall_offset=1_700_000_000.0, on_change=changes.notify)
    control = FakeControl()
    path = str(tmp_path / "node.sock")
    listener = open_listener(path)
    nursery.start_soon(ApiServer(store, changes, control, "node-1").serve, listener)
    return store, control, path


def test_get_list_one_and_secrets_only_on_request(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            store, _, path = await serving(tmp_path, nursery)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            store.put(KUBESPAN_IDENTITY, "local", {"address": "fd00::1/128",
                                                   "privateKey": "c2VjcmV0", "publicKey": "cA=="},
                      now=5.0)
            client = ApiClient(path)
            node, (found,) = await client.get(KUBESPAN_IDENTITY, None, secrets=False)
            assert node == "node-1"  # uspan get's NODE
            assert found.spec["privateKey"] == REDACTED
            assert found.metadata.version == 1 and found.metadata.created == 1_700_000_005.0
            _, (shown,) = await client.get(KUBESPAN_IDENTITY, "local", secrets=True)
            assert shown.spec["privateKey"] == "c2VjcmV0"
            with pytest.raises(ApiError, match="not found"):
                await client.get(KUBESPAN_IDENTITY, "other", secrets=False)
            nursery.cancel_scope.cancel()

    trio.run(scenario)


def test_watch_streams_changes_as_they_happen(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            store, _, path = await serving(tmp_path, nursery)
            store.put(KUBESPAN_PEER_STATUS, "k1", status_spec("unknown"), now=1.0)
            seen: list[list[Event]] = []

            async def collect(node: str, events: list[Event]) -> None:
                assert node == "node-1"
                seen.append(events)

            async def batches(count: int) -> None:
                with trio.fail_after(5):
                    while len(seen) < count:
                        await trio.sleep(0.01)

            async def watch() -> None:
                with pytest.raises(ApiError):
                    await ApiClient(path).get(KUBESPAN_PEER_STATUS, None, secrets=False,
                                              on_events=collect)

            nursery.start_soon(watch)
            await batches(1)  # the listing: the node is watching from here on
            store.put(KUBESPAN_PEER_STATUS, "k1", status_spec("up"), now=2.0)
            await batches(2)
            store.delete(KUBESPAN_PEER_STATUS, "k1")
            await batches(3)
            assert [[(e.kind, e.resource.metadata.version) for e in batch] for batch in seen] == [
                [(EventKind.CREATED, 1)], [(EventKind.UPDATED, 2)], [(EventKind.DESTROYED, 2)]]
            assert seen[1][0].resource.spec["state"] == "up"
            nursery.cancel_scope.cancel()

    trio.run(scenario)


class ChangingStream(trio.abc.Stream):
    """A connection that sends one request, records the replies, and runs ``change``
    while the first reply is still being sent (a send yields: the store moves on)."""

    def __init__(self, request: dict[str, object], change: Callable[[], None]) -> None:
        self.request: bytes | None = json.dumps(request).encode() + b"\n"
        self.change: Callable[[], None] | None = change
        self.replies: list[dict[str, Any]] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.change is not None:
            change, self.change = self.change, None
            change()
        await trio.lowlevel.checkpoint()
        self.replies.append(json.loads(bytes(data)))

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.request is None:
            await trio.sleep_forever()
        request, self.request = self.request, None
        return request

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def test_a_change_while_the_listing_is_sent_is_streamed_at_once() -> None:
    """The server checks its watch before it sleeps: a change that came while it was
    sending wakes no one, and would wait for the next change (a peer gone down and then
    nothing: shown never)."""
    async def scenario() -> None:
        changes = Changes()
        store = Store(wall_offset=0.0, on_change=changes.notify)
        store.put(KUBESPAN_PEER_STATUS, "k1", status_spec("up"), now=1.0)
        stream = ChangingStream(
            {"op": "get", "type": "kubespanpeerstatuses", "watch": True},
            lambda: store.put(KUBESPAN_PEER_STATUS, "k1", status_spec("down"), now=2.0))
        server = ApiServer(store, changes, FakeControl(), "node-1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._handle, stream)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        listing, *updates = stream.replies
        assert [r["spec"]["state"] for r in listing["resources"]] == ["up"]
        assert [[e["resource"]["spec"]["state"] for e in u["events"]]
                for u in updates] == [["down"]]

    trio.run(scenario)


def test_apply_leave_and_errors(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            _, control, path = await serving(tmp_path, nursery)
            client = ApiClient(path)
            assert (await client.request({"op": "apply", "config": "ok"}))["ok"] == "applied: mtu"
            with pytest.raises(ApiError, match=r"kubespan\.mtu"):
                await client.request({"op": "apply", "config": "bad"})
            assert control.applied == ["ok"]
            assert (await client.request({"op": "leave"}))["ok"] == "left the cluster"
            assert control.stopped == 1  # after the reply went out
            for bad in ({"op": "nope"}, {"op": "get", "type": "nosuchthing"}, [1]):
                with pytest.raises(ApiError):
                    await client.request(bad)  # type: ignore[arg-type]
            # Garbage on the wire: an error reply, and the server carries on.
            stream = await trio.open_unix_socket(path)
            await stream.send_all(b"\xff{not json\n")
            reply = json.loads(await stream.receive_some(4096))
            assert "error" in reply
            await stream.aclose()
            assert (await client.request({"op": "leave"}))["ok"]
            nursery.cancel_scope.cancel()

    trio.run(scenario)


def test_no_node_and_second_node(tmp_path: Path) -> None:
    path = str(tmp_path / "node.sock")
    with pytest.raises(ApiError, match="no node is running"):
        trio.run(ApiClient(path).request, {"op": "leave"})
    live = open_listener(path)
    try:
        with pytest.raises(ApiError, match="another node"):
            open_listener(path)
    finally:
        live.close()
    stale = socket.socket(socket.AF_UNIX)  # a file left by a killed node is replaced
    stale.close()
    open_listener(path).close()


def test_get_watch_prints_talosctls_event_stream(tmp_path: Path) -> None:
    """The real ``uspan get --watch -o yaml`` against a served store: the listing as created
    events, then each change as it happens, documents separated by --- (none before the
    first); the command ends with an error when the node goes away."""
    async def scenario() -> None:
        argv = [sys.executable, "-c", "import sys; from uspan.cli import main; "
                "sys.exit(main(sys.argv[1:]))", "get", "kubespanpeerstatuses", "--watch",
                "-o", "yaml", "--state-dir", str(tmp_path)]
        out = bytearray()
        process: trio.Process | None = None
        try:
            async with trio.open_nursery() as nursery:
                store, _, _ = await serving(tmp_path, nursery)
                store.put(KUBESPAN_PEER_STATUS, "k1", status_spec("unknown"), now=1.0)
                process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE)
                assert process.stdout is not None

                async def until(text: bytes) -> None:
                    assert process is not None and process.stdout is not None
                    with trio.fail_after(30):
                        while text not in out:
                            out.extend(await process.stdout.receive_some(1 << 16))

                await until(b"receiveBytes: 1\n")
                store.put(KUBESPAN_PEER_STATUS, "k1", status_spec("up"), now=2.0)
                await until(b"state: up\n")
                nursery.cancel_scope.cancel()  # the node goes away
            assert process.stdout is not None and process.stderr is not None
            with trio.fail_after(30):
                while chunk := await process.stdout.receive_some(1 << 16):
                    out.extend(chunk)
                error = await process.stderr.receive_some(1 << 16)
                assert await process.wait() == 1
        finally:
            if process is not None:
                process.kill()  # ours; a no-op once it exited
        text = out.decode()
        assert text.startswith("node: node-1\nevent: created\nmetadata:\n    namespace: kubespan\n")
        assert text.count("---\n") == 1
        assert "---\nnode: node-1\nevent: updated\nmetadata:\n" in text
        assert b"the node closed the connection" in error

    trio.run(scenario)
