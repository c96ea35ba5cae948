"""Token buckets per key: handshakes per source IP (wireguard-go/kernel ratelimiter), the
budgets of ``admission``, and the discovery service's requests and reflexive probes per
source IP (which tells a refused client when to retry: ``wait``).

By default each key (a source IP) may spend HANDSHAKES_PER_SECOND tokens a second with
bursts of HANDSHAKE_BURST. Tokens are integer nanoseconds so the arithmetic is exact.
Idle entries are collected every GC_INTERVAL, or sooner when a slow bucket needs longer
to refill; the table never exceeds ``max_entries``, and a new key that finds it full is
refused (as the kernel does) so spoofed floods cannot grow memory.
"""

from __future__ import annotations

from collections.abc import Container, Hashable

from uspan.wg.constants import HANDSHAKE_BURST, HANDSHAKES_PER_SECOND

NANOS = 1_000_000_000
GC_INTERVAL = 1.0  # seconds between collections of entries that have refilled
MAX_ENTRIES = 65536


class RateLimiter:
    def __init__(self, max_entries: int = MAX_ENTRIES, *,
                 rate: float = HANDSHAKES_PER_SECOND, burst: int = HANDSHAKE_BURST) -> None:
        if max_entries < 1 or rate <= 0 or burst < 1:
            raise ValueError(f"need max_entries >= 1, rate > 0, burst >= 1: got "
                             f"{max_entries}, {rate}, {burst}")
        self._max_entries = max_entries
        self._cost = round(NANOS / rate)  # nanoseconds of tokens per message
        self._max_tokens = self._cost * burst
        self._entries: dict[Hashable, list[int]] = {}  # key -> [tokens, last seen ns]
        self._last_gc = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def full(self) -> bool:
        return len(self._entries) >= self._max_entries

    def allow(self, key: Hashable, now: float) -> bool:
        """Spend one token of ``key``'s bucket; False when it is empty or the table is full."""
        now_ns = round(now * NANOS)
        if now_ns - self._last_gc >= GC_INTERVAL * NANOS:
            self._collect(now_ns)
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._max_entries:
                return False
            self._entries[key] = [self._max_tokens - self._cost, now_ns]
            return True
        tokens = min(self._max_tokens, entry[0] + max(0, now_ns - entry[1]))
        entry[1] = now_ns
        if tokens >= self._cost:
            entry[0] = tokens - self._cost
            return True
        entry[0] = tokens
        return False

    def wait(self, key: Hashable) -> float:
        """After ``allow`` refused ``key``: seconds until it has a token again (refused for
        a full table: until the next collection may make room)."""
        entry = self._entries.get(key)
        if entry is None:
            return GC_INTERVAL
        return max(0, self._cost - entry[0]) / NANOS

    def retain(self, keys: Container[Hashable]) -> None:
        """Forget every key not in ``keys`` (no longer ours to limit), so it takes no
        room a new one needs."""
        self._entries = {key: entry for key, entry in self._entries.items() if key in keys}

    def _collect(self, now_ns: int) -> None:
        """Drop the entries whose bucket is full again: forgetting them changes nothing."""
        full = self._max_tokens
        self._entries = {
            key: entry for key, entry in self._entries.items()
            if entry[0] + now_ns - entry[1] < full
        }
        self._last_gc = now_ns
