"""The UAPI unix socket ``/var/run/wireguard/<iface>.sock`` and its trio server.

Each connection may carry several requests, like wireguard-go: ``get=1`` followed by a
blank line, or ``set=1`` followed by ``key=value`` lines and a blank line. A ``set`` is
parsed as it arrives (any size: nothing buffers the request) and then applied atomically;
every request gets ``errno=<n>`` back, a refusal only after the whole request was read.
Parsing, applying and sending a ``get`` run in slices (``uspan.daemon.slices``), so the
tunnel and other clients never wait long for one big request.

uspan adds ``stats=1`` (then a blank line): the device's own counters as ``name=value``
lines (drops by reason, TUN and UDP errors), which ``uspan stats IFACE`` prints.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Protocol

import trio

from uspan import privilege, unixsocket, userpaths
from uspan.daemon.slices import Slices, collector_paused
from uspan.wg.config import ConfigError, DeviceChange
from uspan.wg.uapi import SetParser, format_errno

MAX_LINE = 1 << 16  # bytes; requests are streamed, so only a line needs a bound
_RECEIVE_SIZE = 1 << 16
# Bytes of a get's reply sent at once: pieces are a few KB, but a segment's kept lines
# (allowedips.SHARD_AT of them: ~0.4 MB of IPv4 /32s, up to ~0.9 MB of IPv6) go in one write.
_WRITE_SIZE = 1 << 18
_PARSE_STEP = 256  # lines between looks at the slice clock (~0.1 ms, ~10 us in C)
_RELEASE_STEP = 1 << 14  # prefixes let go of at a time (~0.1 ms)
_PAUSE_COLLECTOR_AFTER = 1 << 18  # bytes of one set request (~10,000 lines)
_ACCEPT_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_RETRY = 0.1  # seconds
_ACCEPT_BATCH = 256  # connections accepted between two checkpoints
_LOG_EVERY = 10.0  # seconds between log lines of one recurring condition
log = logging.getLogger("uspan.daemon")


class UapiError(OSError):
    """The UAPI socket could not be created."""


class ConfigTarget(Protocol):
    """What the server configures: the daemon."""

    async def get_pieces(self) -> Iterable[bytes]:
        """The ``get=1`` reply, in pieces (of a consistent snapshot)."""

    async def configure(self, change: DeviceChange) -> None:
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
    """Accept connections forever, one task each.

    Pending connections are accepted in one batch, up to _ACCEPT_BATCH between
    checkpoints (through trio's ``accept`` each cost a pass of the scheduler), and
    served on the bare socket (``_Connection``).

    Out of file descriptors (or memory) for a new connection, wait a moment and retry:
    the tunnel and the connections already open keep working, and the condition is
    logged once a while, in one line.
    """
    listener.setblocking(False)
    last_logged = -math.inf
    async with trio.open_nursery() as nursery:
        while True:
            for _ in range(_ACCEPT_BATCH):
                try:
                    connection, _ = listener.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(listener)
                    break
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY:
                        raise
                    if trio.current_time() - last_logged >= _LOG_EVERY:
                        last_logged = trio.current_time()
                        log.error("UAPI: cannot accept a connection: %s; retrying",
                                  os.strerror(exc.errno or 0))
                    await trio.sleep(_ACCEPT_RETRY)
                    break
                connection.setblocking(False)
                nursery.start_soon(handle, _Connection(connection), target)
            else:
                await trio.lowlevel.checkpoint()


class _Connection(trio.abc.Stream):
    """An accepted UAPI connection: the bare non-blocking socket, read and written at
    once and waited on only when it would block. ``trio.SocketStream`` cost each get two
    failed ``setsockopt`` calls (TCP options on a unix socket) and a pass of the
    scheduler for each read, write and close; the handler's checkpoints (the config
    lock, or its own) keep one connection from holding the loop."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            try:
                return self._sock.recv(max_bytes or _RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    # MSG_NOSIGNAL: a client gone mid-reply is EPIPE, not SIGPIPE (which
                    # ``uspan.cli.main`` leaves at its default: it would end the node).
                    sent += self._sock.send(view[sent:], socket.MSG_NOSIGNAL)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._sock)
                except OSError as exc:
                    raise trio.BrokenResourceError(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def aclose(self) -> None:
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()


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
                    keep_open = await _get(reader, stream, target, operation)
                    if keep_open:
                        continue
                    return
                if operation == b"set=1":
                    reply, keep_open = await _set(reader, target)
                else:
                    log.error("UAPI: invalid operation %r", operation[:32])
                    reply, keep_open = format_errno(errno.EINVAL), False
                await stream.send_all(reply.encode())
                if not keep_open:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except _LineTooLong:
            log.error("UAPI: a line longer than %d bytes", MAX_LINE)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(format_errno(errno.EMSGSIZE).encode())


async def _get(reader: _Reader, stream: trio.abc.Stream, target: ConfigTarget,
               operation: bytes) -> bool:
    """Send the reply; whether to keep the connection. Pieces go out together, in writes
    of up to _WRITE_SIZE bytes (or one piece bigger than that): a write per piece was
    four sends for a peer of 4,000 prefixes, each a pass of the scheduler, and a big
    reply still goes out between other work."""
    following = await reader.line()
    if following != b"" or operation == b"stats=1":
        # No lock taken: a checkpoint, so that a pipeline of these cannot hold the loop.
        await trio.lowlevel.checkpoint()
    if following != b"":
        log.error("UAPI: %s must be followed by a blank line", operation.decode())
        await stream.send_all(format_errno(errno.EINVAL).encode())
        return following is not None
    if operation == b"stats=1":
        lines = "".join(f"{name}={value}\n" for name, value in sorted(target.stats().items()))
        await stream.send_all((lines + format_errno(0)).encode())
        return True
    slices, size = Slices(), 0
    batch: list[bytes] = []
    for piece in await target.get_pieces():
        if batch and size + len(piece) > _WRITE_SIZE:
            await _write(stream, batch)
            batch, size = [], 0
        batch.append(piece)
        size += len(piece)
        await slices.pause()
    await _write(stream, batch)
    return True


async def _write(stream: trio.abc.Stream, pieces: list[bytes]) -> None:
    await stream.send_all(pieces[0] if len(pieces) == 1 else b"".join(pieces))


async def _set(reader: _Reader, target: ConfigTarget) -> tuple[str, bool]:
    """Parse the body as it arrives, then apply it whole. A refusal is sent only once
    the whole request is read, so the client never writes into a closed socket.

    Cyclic garbage collection pauses once the request is big (its full passes over a
    million parsed objects were the long freezes), not before: a small request from a
    client that stalls must not keep the collector off for the whole process."""
    with contextlib.ExitStack() as paused:
        parser: SetParser | None = SetParser()
        change: DeviceChange | None = None
        failure: ConfigError | None = None
        slices = Slices()
        received, pausing = 0, False
        try:
            async for chunk in reader.body():
                if parser is None:  # refused: read on to the end of the request
                    await slices.pause()  # (the bare socket never waits while data is there)
                    continue
                received += len(chunk)
                if received > _PAUSE_COLLECTOR_AFTER and not pausing:
                    paused.enter_context(collector_paused())
                    pausing = True
                try:
                    pos = 0
                    while pos < len(chunk):
                        pos = parser.feed_bytes(chunk, pos, _PARSE_STEP)
                        await slices.pause()
                except ConfigError as exc:
                    failure, parser = exc, None
        except EOFError:
            log.error("UAPI: set request cut short (no blank line): nothing applied")
            return format_errno(errno.EIO), False
        try:
            if parser is None:
                assert failure is not None
                raise failure
            change, parser = parser.finish(), None
            await target.configure(change)
            await _release(change, slices)
        except ConfigError as exc:
            log.error("UAPI: set failed: %s", exc)
            # Maybe no lock taken (refused before): a checkpoint, so that a pipeline of
            # refusals cannot hold the loop (the bare socket never waits while data is
            # there).
            await trio.lowlevel.checkpoint()
            return format_errno(exc.errno), True
        except Exception as exc:  # a bug must not take the daemon down with it
            log.error("UAPI: set failed unexpectedly: %s: %s", type(exc).__name__, exc)
            return format_errno(errno.ENOANO), True
        finally:
            change = parser = None  # freed before the collector is back
    return format_errno(0), True


async def _release(change: DeviceChange, slices: Slices) -> None:
    """Empty the change's lists of prefixes in slices: dropping a million at once is one
    step of ~5 ms (a reference to let go of each)."""
    for peer in change.peers:
        for prefixes in (peer.allowed_ips, peer.remove_allowed_ips):
            while prefixes:
                del prefixes[-_RELEASE_STEP:]
                await slices.pause()


class _LineTooLong(Exception):
    """A line without a newline grew beyond MAX_LINE."""


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
            if start > MAX_LINE:
                raise _LineTooLong
            if not await self._fill():
                return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return line

    async def body(self) -> AsyncIterator[bytes]:
        """The lines up to the next blank line, in chunks of whole lines (each with its
        newline) as they arrive; EOFError if the stream ends first (a request cut short
        is never applied). Nothing bounds the request, only each line (MAX_LINE)."""
        buffer = self._buffer
        while True:
            if buffer.startswith(b"\n"):  # the blank line: the request ends here
                del buffer[:1]
                return
            end = buffer.find(b"\n\n")
            if end >= 0:
                chunk = bytes(buffer[:end + 1])
                del buffer[: end + 2]  # what follows is the next request
                yield chunk
                return
            end = buffer.rfind(b"\n")
            if end >= 0:
                chunk = bytes(buffer[:end + 1])
                del buffer[: end + 1]
                yield chunk
            elif len(buffer) > MAX_LINE:
                raise _LineTooLong
            elif not await self._fill():
                buffer.clear()
                raise EOFError("UAPI request ended without a blank line")
