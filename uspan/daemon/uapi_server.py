"""The UAPI unix socket ``/var/run/wireguard/<iface>.sock`` and its trio server.

Each connection may carry several requests, like wireguard-go: ``get=1`` followed by a
blank line, or ``set=1`` followed by ``key=value`` lines and a blank line. A ``set`` is
parsed whole and then applied atomically; every request gets ``errno=<n>`` back.

uspan adds ``stats=1`` (then a blank line): the device's own counters as ``name=value``
lines (drops by reason, TUN and UDP errors), which ``uspan stats IFACE`` prints.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from pathlib import Path
from typing import Protocol

import trio

from uspan import privilege, unixsocket, userpaths
from uspan.wg.config import ConfigError, DeviceChange
from uspan.wg.uapi import format_errno, parse_set

MAX_REQUEST = 64 << 20  # bytes; 130,000 allowed_ip lines are about 3.5 MiB
_RECEIVE_SIZE = 1 << 16
log = logging.getLogger("uspan.daemon")


class UapiError(OSError):
    """The UAPI socket could not be created."""


class ConfigTarget(Protocol):
    """What the server configures: the daemon."""

    def get(self) -> str:
        """The full ``get=1`` reply."""

    def set(self, change: DeviceChange) -> None:
        """Apply atomically; raise ConfigError (with .errno) and change nothing."""

    def stats(self) -> dict[str, int]:
        """The device's counters, by name."""


def socket_path(interface: str, directory: str | None = None) -> str:
    """``DIR/IFACE.sock``; by default DIR is ``userpaths.uapi_dir()`` (root: the system's)."""
    return os.path.join(directory or userpaths.uapi_dir(), f"{interface}.sock")


class UapiSocket:
    """A listening UAPI socket and the file it is bound to.

    ``close`` removes the file only while it is still the one we created, so a second
    daemon that replaced it keeps its own.
    """

    def __init__(self, listener: socket.socket, path: str) -> None:
        self.listener = listener
        self.path = path
        self._identity = _identity(path)

    @classmethod
    def open(cls, path: str) -> UapiSocket:
        """Bind and listen on ``path`` (mode 0600 via umask 177); raise UapiError.

        A stale socket file (nobody answers on it) is replaced; a live one is an error.
        The system directory is made 0755 as wireguard-go makes it; any other is private
        to its user (0700, see uspan.userpaths).
        """
        directory = os.path.dirname(path) or "."
        try:
            if directory != userpaths.SYSTEM_UAPI_DIR:
                userpaths.private_dir(Path(directory))
            elif not os.path.isdir(directory):
                os.makedirs(directory, exist_ok=True)
                os.chmod(directory, 0o755)  # not narrowed by the caller's umask
        except OSError as exc:
            hint = privilege.dir_hint(exc.errno, directory,
                                      f"${userpaths.UAPI_DIR_ENV} or --uapi-dir")
            raise UapiError(exc.errno or 0, privilege.with_hint(
                f"cannot create {directory}: {exc.strerror or exc}", hint)) from None
        try:
            return cls(unixsocket.listen(path, 0o177), path)
        except unixsocket.SocketInUse:
            raise UapiError(errno.EADDRINUSE, f"unix socket {path} in use") from None
        except OSError as exc:
            raise UapiError(exc.errno or 0, f"cannot listen on {path}: {exc.strerror}") from exc

    def removed(self) -> bool:
        """Whether our socket file is gone or replaced (``rm`` of it stops the daemon)."""
        return _identity(self.path) != self._identity

    async def serve(self, target: ConfigTarget) -> None:
        await serve(self.listener, target)

    def close(self) -> None:
        self.listener.close()
        if not self.removed():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _identity(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


async def serve(listener: socket.socket, target: ConfigTarget) -> None:
    """Accept connections forever, one task each."""
    trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))

    async def connection(stream: trio.SocketStream) -> None:
        await handle(stream, target)

    await trio.serve_listeners(connection, [trio_listener])


async def handle(stream: trio.abc.Stream, target: ConfigTarget) -> None:
    """Serve the requests of one connection until it closes or sends nonsense."""
    reader = _Reader(stream)
    async with stream:
        try:
            while True:
                operation = await reader.line()
                if operation is None:
                    return
                if operation in (b"get=1", b"stats=1"):
                    reply, keep_open = await _get(reader, target, operation)
                elif operation == b"set=1":
                    reply, keep_open = await _set(reader, target)
                else:
                    log.error("UAPI: invalid operation %r", operation[:32])
                    reply, keep_open = format_errno(errno.EINVAL), False
                await stream.send_all(reply.encode())
                if not keep_open:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _get(reader: _Reader, target: ConfigTarget, operation: bytes) -> tuple[str, bool]:
    following = await reader.line()
    if following != b"":
        log.error("UAPI: %s must be followed by a blank line", operation.decode())
        return format_errno(errno.EINVAL), following is not None
    if operation == b"stats=1":
        lines = "".join(f"{name}={value}\n" for name, value in sorted(target.stats().items()))
        return lines + format_errno(0), True
    return target.get(), True


async def _set(reader: _Reader, target: ConfigTarget) -> tuple[str, bool]:
    try:
        body = await reader.block()
    except EOFError:
        log.error("UAPI: set request cut short (no blank line): nothing applied")
        return format_errno(errno.EIO), False
    if body is None:
        log.error("UAPI: set request larger than %d bytes", MAX_REQUEST)
        return format_errno(errno.EMSGSIZE), False
    try:
        lines = body.decode("utf-8", errors="replace").split("\n") if body else []
        target.set(parse_set(lines))
    except ConfigError as exc:
        log.error("UAPI: set failed: %s", exc)
        return format_errno(exc.errno), True
    except Exception:  # a bug must not take the daemon down with it
        log.exception("UAPI: set failed unexpectedly")
        return format_errno(errno.ENOANO), True
    return format_errno(0), True


class _Reader:
    """Buffered reads of lines and blank-line-terminated blocks from a stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        if self._eof:
            return False
        data = await self._stream.receive_some(_RECEIVE_SIZE)
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    async def line(self) -> bytes | None:
        """The next line without its newline; None at end of stream."""
        start = 0
        while (end := self._buffer.find(b"\n", start)) < 0:
            start = len(self._buffer)
            if start > MAX_REQUEST or not await self._fill():
                return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    async def block(self) -> bytes | None:
        """Everything up to the next blank line, without it.

        None if the block grows beyond MAX_REQUEST; EOFError if the stream ends first
        (a request cut short is never applied).
        """
        start = 0
        while True:
            if self._buffer.startswith(b"\n"):
                del self._buffer[:1]
                return b""
            end = self._buffer.find(b"\n\n", start)
            if end >= 0:
                block = bytes(self._buffer[:end])
                del self._buffer[: end + 2]
                return block
            start = max(len(self._buffer) - 1, 0)
            if len(self._buffer) > MAX_REQUEST:
                return None
            if not await self._fill():
                self._buffer.clear()
                raise EOFError("UAPI request ended without a blank line")
