"""Prometheus metrics over HTTP, served by trio in the program's own thread.

``prometheus_client``'s own server runs in a thread of its own, and its collectors
would then read the program's state while trio changes it. Here a scrape runs in the
trio thread between two steps of the program, so a collector sees consistent state.
"""

from __future__ import annotations

import contextlib

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from uspan.errors import listening

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0


async def serve(host: str, port: int, registry: CollectorRegistry, *,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer ``GET /metrics`` (any path) on HOST:PORT; reports the bound port started."""
    with listening("metrics", host, port):
        listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                head = b""
                with trio.move_on_after(REQUEST_TIMEOUT):
                    while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        head += chunk
                if not head.startswith((b"GET ", b"HEAD ")):
                    await stream.send_all(b"HTTP/1.1 405 Method Not Allowed\r\n"
                                          b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                    return
                body = generate_latest(registry)
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: " + CONTENT_TYPE_LATEST.encode()
                    + b"\r\nContent-Length: " + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + (b"" if head.startswith(b"HEAD ") else body))

    await trio.serve_listeners(handle, listeners)
