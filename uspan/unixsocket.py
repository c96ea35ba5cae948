"""Listening unix sockets for our servers (the UAPI, the node's API): one way to take a
path, replace a stale file a killed process left behind, and refuse a live one."""

from __future__ import annotations

import errno
import os
import socket


class SocketInUse(OSError):
    """Another live process answers on the path."""


def listen(path: str, umask: int) -> socket.socket:
    """Bind ``path`` under ``umask`` (so the file is private from birth) and listen,
    non-blocking, with the kernel's largest backlog (clients connect many at once)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            _bind(sock, path, umask)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            if answers(path):
                raise SocketInUse(errno.EADDRINUSE, f"{path} is in use") from None
            os.unlink(path)
            _bind(sock, path, umask)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def answers(path: str) -> bool:
    """Whether a process accepts connections on ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _bind(sock: socket.socket, path: str, umask: int) -> None:
    old = os.umask(umask)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
