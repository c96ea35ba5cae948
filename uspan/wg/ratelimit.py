"""Per-source-IP token buckets for handshake messages (wireguard-go/kernel ratelimiter).

Each source IP may send HANDSHAKES_PER_SECOND handshakes a second with bursts of
HANDSHAKE_BURST. Tokens are integer nanoseconds so the arithmetic is exact. Idle entries
are collected every GC_INTERVAL; the table never exceeds ``max_entries``, and a new source
that finds it full is refused (as the kernel does) so spoofed floods cannot grow memory.
"""

from __future__ import annotations

from uspan.wg.constants import HANDSHAKE_BURST, HANDSHAKES_PER_SECOND

NANOS = 1_000_000_000
PACKET_COST = NANOS // HANDSHAKES_PER_SECOND
MAX_TOKENS = PACKET_COST * HANDSHAKE_BURST
GC_INTERVAL = 1.0  # seconds; an entry idle this long is full again, so dropping it is lossless
MAX_ENTRIES = 65536


class RateLimiter:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be positive, got {max_entries}")
        self._max_entries = max_entries
        self._entries: dict[bytes, list[int]] = {}  # ip -> [tokens, last seen ns]
        self._last_gc = 0

    def __len__(self) -> int:
        return len(self._entries)

    def allow(self, ip: bytes, now: float) -> bool:
        """Spend one token of ``ip``'s bucket; False when it is empty or the table is full."""
        now_ns = round(now * NANOS)
        if now_ns - self._last_gc >= GC_INTERVAL * NANOS:
            self._collect(now_ns)
        entry = self._entries.get(ip)
        if entry is None:
            if len(self._entries) >= self._max_entries:
                return False
            self._entries[ip] = [MAX_TOKENS - PACKET_COST, now_ns]
            return True
        tokens = min(MAX_TOKENS, entry[0] + max(0, now_ns - entry[1]))
        entry[1] = now_ns
        if tokens >= PACKET_COST:
            entry[0] = tokens - PACKET_COST
            return True
        entry[0] = tokens
        return False

    def _collect(self, now_ns: int) -> None:
        idle = int(GC_INTERVAL * NANOS)
        self._entries = {
            ip: entry for ip, entry in self._entries.items() if now_ns - entry[1] < idle
        }
        self._last_gc = now_ns
