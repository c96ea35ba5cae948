"""The node's local API: a unix socket in its state directory (mode 0600) for ``uspan get``,
``uspan apply-config`` and ``uspan leave``.

One JSON object per line each way. A request is ``{"op": "get", "type": NAME, "id": ID
or null, "watch": bool, "secrets": bool}``, ``{"op": "apply", "config": TEXT}`` or
``{"op": "leave"}``. Replies: ``{"node": HOSTNAME, "resources": [R...]}`` for a get
(HOSTNAME: as the node publishes it to discovery; ``uspan get`` shows it as NODE, as
talosctl shows the node it asked), then, with watch,
``{"events": [{"kind": "created"|"updated"|"destroyed", "resource": R}...]}`` as changes
happen; ``{"ok": TEXT}``, or ``{"error": TEXT}`` (the connection then closes). A
resource R is ``{"type", "id", "version", "created", "updated", "spec"}`` with wall-clock
seconds; secret spec fields are redacted unless the request sets ``secrets``, which only
the node's own user can do, since only they can open the socket.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from uspan import unixsocket
from uspan.mesh.resources import (
    REDACTED,
    Event,
    EventKind,
    Metadata,
    Resource,
    ResourceError,
    ResourceType,
    Store,
    WatchOverflow,
    resolve_type,
)

SOCKET_NAME = "node.sock"
MAX_LINE = 1 << 20  # a config file or a request; larger ones are refused


class ApiError(RuntimeError):
    """The node answered with an error, or cannot be reached; the message says which."""


class Changes:
    """Wakes every waiting watcher when the store changes (the store's ``on_change``)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class NodeControl(Protocol):
    """What the API asks of the running node besides its store."""

    async def apply_config(self, text: str) -> str:
        """Validate and apply a new config in place; a summary, or raise ValueError."""

    async def leave(self) -> str:
        """Delete this node's affiliate from discovery; a summary (``stop`` follows)."""

    def stop(self) -> None:
        """Stop the node (after ``leave``'s reply went out)."""


def to_wire(resource: Resource, show_secrets: bool) -> dict[str, Any]:
    meta = resource.metadata
    spec = dict(resource.spec)
    if not show_secrets:
        hidden = resolve_type(meta.type).secret_fields
        spec = {key: REDACTED if key in hidden else value for key, value in spec.items()}
    return {"type": meta.type, "id": meta.id, "version": meta.version,
            "created": meta.created, "updated": meta.updated, "spec": spec}


def from_wire(item: dict[str, Any]) -> Resource:
    try:
        metadata = Metadata(str(item["type"]), str(item["id"]), int(item["version"]),
                            float(item["created"]), float(item["updated"]))
        spec = item["spec"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiError(f"malformed resource from the node: {exc!r}") from None
    if not isinstance(spec, dict):
        raise ApiError("malformed resource from the node: spec is not a map")
    return Resource(metadata, spec)


# Server ------------------------------------------------------------------------------------


def open_listener(path: str) -> socket.socket:
    """Bind the API socket (0600); a stale file is replaced, a live node is an error."""
    try:
        return unixsocket.listen(path, 0o177)
    except unixsocket.SocketInUse:
        raise ApiError(f"another node is running with this state directory ({path})") from None


@dataclass
class ApiServer:
    store: Store
    changes: Changes
    control: NodeControl
    node: str  # the hostname published to discovery, which ``uspan get`` shows as NODE

    async def serve(self, listener: socket.socket) -> None:
        trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        await trio.serve_listeners(self._handle, [trio_listener])

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            lines = _Lines(stream)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                try:
                    request = json.loads(await lines.next())
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                    await self._dispatch(request, stream)
                except (ValueError, ResourceError, ApiError, WatchOverflow) as exc:
                    await _send(stream, {"error": str(exc).strip("'\"")})

    async def _dispatch(self, request: dict[str, Any], stream: trio.SocketStream) -> None:
        op = request.get("op")
        if op == "get":
            await self._get(request, stream)
        elif op == "apply":
            text = request.get("config")
            if not isinstance(text, str):
                raise ValueError("apply needs 'config': the config file's text")
            await _send(stream, {"ok": await self.control.apply_config(text)})
        elif op == "leave":
            try:
                await _send(stream, {"ok": await self.control.leave()})
            finally:
                self.control.stop()
        else:
            raise ValueError(f"unknown op {op!r}; one of: get, apply, leave")

    async def _get(self, request: dict[str, Any], stream: trio.SocketStream) -> None:
        rtype = resolve_type(str(request.get("type")))
        wanted = request.get("id")
        secrets = bool(request.get("secrets"))
        watch = self.store.watch(rtype, bootstrap=False) if request.get("watch") else None
        try:
            if wanted is None:
                found = self.store.list(rtype)
            else:
                found = [self.store.get(rtype, str(wanted))]
            await _send(stream, {"node": self.node,
                                 "resources": [to_wire(r, secrets) for r in found]})
            if watch is None:
                return
            while True:  # drain before sleeping: what came during a send woke no one
                events = [e for e in watch.drain()
                          if wanted is None or e.resource.metadata.id == wanted]
                if events:
                    await _send(stream, {"events": [
                        {"kind": e.kind.value, "resource": to_wire(e.resource, secrets)}
                        for e in events]})
                else:
                    await self.changes.wait()
        finally:
            if watch is not None:
                self.store.unwatch(watch)


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(message, separators=(",", ":")).encode() + b"\n")


class _Lines:
    """Newline-delimited reads with a size bound."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> bytes:
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE:
                raise ValueError(f"request longer than {MAX_LINE} bytes")
            chunk = await self._stream.receive_some(1 << 16)
            if not chunk:
                if self._buffer:
                    raise ValueError("request cut short (no newline)")
                raise trio.ClosedResourceError
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line


# Client ------------------------------------------------------------------------------------


class ApiClient:
    """One request to the node at ``path``: ``uspan get``, ``apply-config``, ``leave``."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def _connect(self) -> trio.SocketStream:
        try:
            return await trio.open_unix_socket(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ApiError(f"no node is running here (no answer on {self.path})") from None
        except PermissionError:
            raise ApiError(f"permission denied on {self.path}: run as the node's user") from None

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return its first reply (raising the node's error)."""
        stream = await self._connect()
        async with stream:
            await _send(stream, message)
            try:
                return _checked(await _Lines(stream).next())
            except trio.ClosedResourceError:
                raise ApiError("the node closed the connection without a reply") from None

    async def get(self, rtype: ResourceType, resource_id: str | None, *, secrets: bool,
                  on_events: Callable[[str, list[Event]], Awaitable[None]] | None = None,
                  ) -> tuple[str, list[Resource]]:
        """The node's name and its resources; with ``on_events``, then stream changes to it
        (with the node's name) until closed."""
        stream = await self._connect()
        async with stream:
            await _send(stream, {"op": "get", "type": rtype.plural, "id": resource_id,
                                 "watch": on_events is not None, "secrets": secrets})
            lines = _Lines(stream)
            first = _checked(await lines.next())
            node = str(first.get("node", ""))
            resources = [from_wire(item) for item in first.get("resources", [])]
            if on_events is None:
                return node, resources
            await on_events(node, [Event(EventKind.CREATED, r) for r in resources])
            while True:
                try:
                    reply = _checked(await lines.next())
                except trio.ClosedResourceError:
                    raise ApiError("the node closed the connection") from None
                await on_events(node, [Event(EventKind(e["kind"]), from_wire(e["resource"]))
                                       for e in reply.get("events", [])])


def _checked(line: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except ValueError:
        raise ApiError("the node sent something that is not JSON") from None
    if not isinstance(reply, dict):
        raise ApiError("the node sent something that is not a JSON object")
    if "error" in reply:
        raise ApiError(str(reply["error"]))
    return reply
