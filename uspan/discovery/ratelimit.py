"""Per-source-IP token buckets for discovery requests (15 a second, bursts of 60).

Sans-IO: ``take(ip, now)`` returns 0 when a request may go, else the seconds until it
may. Idle buckets are full again and are forgotten; a table that is full refuses new
sources, so a flood of addresses cannot grow memory.
"""

from __future__ import annotations

RATE = 15.0
BURST = 60
MAX_ENTRIES = 65536


class TokenBuckets:
    def __init__(self, rate: float = RATE, burst: int = BURST, max_entries: int = MAX_ENTRIES):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate {rate} and burst {burst} must be positive")
        self.rate = rate
        self.burst = burst
        self._max = max_entries
        self._buckets: dict[str, tuple[float, float]] = {}  # ip -> (tokens, at)
        self._last_gc = 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, ip: str, now: float) -> float:
        """Spend a token of ``ip``: 0.0 if granted, else how long until one is there."""
        if now - self._last_gc > self.burst / self.rate:
            self._collect(now)
        tokens, at = self._buckets.get(ip, (float(self.burst), now))
        if ip not in self._buckets and len(self._buckets) >= self._max:
            return 1.0
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._buckets[ip] = (tokens - 1.0, now)
            return 0.0
        self._buckets[ip] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _collect(self, now: float) -> None:
        full = self.burst / self.rate
        self._buckets = {ip: b for ip, b in self._buckets.items() if now - b[1] < full}
        self._last_gc = now
