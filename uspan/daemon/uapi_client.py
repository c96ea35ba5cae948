"""One request on a WireGuard UAPI socket (``wg``'s protocol), for our own tools."""

from __future__ import annotations

import socket
from pathlib import Path


class UapiClientError(RuntimeError):
    """The socket did not answer, or answered with a non-zero errno; the message says."""


def request(path: str | Path, text: str, timeout: float = 5.0) -> list[str]:
    """Send ``text`` (ending in a blank line); the reply's lines, ``errno=0`` checked off."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(text.encode())
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        raise UapiClientError(f"{path}: {exc.strerror or exc}") from None
    lines = reply.decode(errors="replace").split("\n")
    if "errno=0" not in lines:
        errno = next((x for x in lines if x.startswith("errno=")), "no errno line")
        raise UapiClientError(f"{path}: {errno}")
    return [line for line in lines if line and not line.startswith("errno=")]
