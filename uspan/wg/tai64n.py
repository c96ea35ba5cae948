"""TAI64N timestamps as WireGuard sends them in handshake initiations."""

from __future__ import annotations

import struct

TAI64_BASE = (1 << 62) + 10
# wireguard-go rounds nanoseconds down to a multiple of 2^24 so a timestamp leaks
# less about the sender's clock; we do the same.
WHITENER_MASK = 0xFFFFFF


def encode(unix_seconds: float) -> bytes:
    """The 12-byte TAI64N label of a wall-clock time given in Unix seconds."""
    secs = int(unix_seconds // 1)
    nanos = int((unix_seconds - secs) * 1_000_000_000)
    nanos = min(nanos, 999_999_999) & ~WHITENER_MASK
    return struct.pack(">QI", TAI64_BASE + secs, nanos)


def decode(label: bytes) -> tuple[int, int]:
    """(unix seconds, nanoseconds) of a TAI64N label; raises ValueError on a bad size."""
    if len(label) != 12:
        raise ValueError(f"TAI64N label must be 12 bytes, got {len(label)}")
    secs, nanos = struct.unpack(">QI", label)
    return secs - TAI64_BASE, nanos


def after(a: bytes, b: bytes) -> bool:
    """True if label a is strictly later than label b (big-endian byte order is time order)."""
    return a > b
