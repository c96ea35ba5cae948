"""Telling WireGuard datagrams from uspan's own on the one WireGuard UDP socket.

A node's probes for its reflexive address and its relay frames must leave from the
WireGuard socket itself, so that the NAT mapping they reveal or use is the one peers must
reach; their answers then arrive on that socket too. They are told apart by the first
bytes, before the protocol core parses anything:

- a WireGuard message starts with its type as a little-endian 32-bit integer, 1 to 4:
  byte 0 is 1-4 and bytes 1-3 are zero;
- a uspan datagram starts with a 4-byte tag: byte 0 is ``0xFF`` (never a WireGuard
  type), bytes 1-3 name the kind (``tag(b"PRB")``, ...). Each kind has one handler.

Everything else (WireGuard, and anything nobody claimed) goes to the core, which drops
and counts what it cannot use, exactly as without a demux.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from uspan.wg.endpoint import Endpoint

Datagram = tuple[bytes, Endpoint]
MARK = 0xFF  # the first byte of every uspan datagram
TAG_SIZE = 4

Handler = Callable[[bytes, Endpoint], Datagram | None]
"""Called with a claimed datagram and its source, in the receive loop (so: quick, no
waiting). Returns None when it consumed the datagram, or a datagram for the core instead
(say, a WireGuard message unwrapped from a relay frame)."""


def tag(kind: bytes) -> bytes:
    """The 4-byte tag of a uspan datagram kind (3 bytes, e.g. ``b"PRB"``)."""
    if len(kind) != TAG_SIZE - 1:
        raise ValueError(f"a datagram kind is 3 bytes, not {len(kind)}")
    return bytes([MARK]) + kind


class Demux:
    """The handlers of uspan datagram kinds, and counts of what they were given."""

    def __init__(self) -> None:
        self._handlers: dict[bytes, Handler] = {}
        self.claimed = 0  # datagrams given to a handler
        self.unclaimed = 0  # tagged datagrams of a kind nobody handles (to the core)

    def __bool__(self) -> bool:
        return bool(self._handlers)

    def register(self, kind_tag: bytes, handler: Handler) -> None:
        """Hand datagrams starting with ``kind_tag`` (from ``tag``) to ``handler``."""
        if len(kind_tag) != TAG_SIZE or kind_tag[0] != MARK:
            raise ValueError(f"not a uspan datagram tag: {kind_tag!r}")
        if kind_tag in self._handlers:
            raise ValueError(f"{kind_tag!r} already has a handler")
        self._handlers[kind_tag] = handler

    def unregister(self, kind_tag: bytes) -> None:
        self._handlers.pop(kind_tag, None)

    def split(self, batch: Iterable[Datagram]) -> list[Datagram]:
        """Give claimed datagrams to their handlers; return what is for the core."""
        core: list[Datagram] = []
        for datagram in batch:
            data = datagram[0]
            if not data or data[0] != MARK:
                core.append(datagram)
                continue
            handler = self._handlers.get(data[:TAG_SIZE])
            if handler is None:
                self.unclaimed += 1
                core.append(datagram)
                continue
            self.claimed += 1
            replacement = handler(data, datagram[1])
            if replacement is not None:
                core.append(replacement)
        return core
