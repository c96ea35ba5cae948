"""Which handshake messages get work while the device is under load (sans-IO).

A flood of initiations with a valid mac1 (it takes only our public key) must not cost a
DH each, nor a cookie reply each: both grow with the attacker's rate. wireguard-go
answers every one with a cookie and serves only messages whose mac2 proves the source
address, so a real peer waits a whole retry (REKEY_TIMEOUT) for its second initiation.
Here a message with a valid mac2 goes through the per-IP limiter (wireguard-go's: 20/s,
burst 5). One without is judged by its source (address and port): a source that sent
nothing in the last SOURCE_INTERVAL is what a real initiator looks like, and is served at
once, with a full handshake while a small global budget allows, else a cookie reply
while another allows; a source that repeats sooner is dropped. So a flood from a few
ports costs one check per datagram, a spoofed flood costs at most the two budgets, and a
real peer's first initiation is answered without a cookie round trip.

A refused source is also *flagged* for FLAG_TIME (at most MAX_FLAGGED at once): the shell
has the kernel drop its mac2-less handshakes before they reach the socket queue
(``uspan.daemon.earlydrop``), where they would push a real peer's packet out. While
sources are flagged the device stays under load, so their return after FLAG_TIME costs
at most one full handshake each before they are flagged again. Spoofed sources never
repeat, so against them the kernel keeps only a fraction ``keep`` of mac2-less
initiations, enough to spend the budgets: a real peer's chance per attempt stays what
the budgets give (budget / flood rate), and the flood's cost to us is bounded.
"""

from __future__ import annotations

from enum import Enum

from uspan.wg.constants import COOKIES_PER_SECOND, SOURCE_INTERVAL, UNPROVEN_PER_SECOND
from uspan.wg.drops import Drop
from uspan.wg.endpoint import Endpoint
from uspan.wg.ratelimit import RateLimiter

FLAG_TIME = 10.0  # seconds a refused source's initiations are dropped in the kernel
MAX_FLAGGED = 256
# The kernel lets through a fraction ``keep`` (a power of 2) of the mac2-less initiations
# from unflagged sources, aiming at SAMPLE_TARGET a second: a spoofed flood then costs
# us that many checks, not one per datagram, and no fewer than the budgets can use.
SAMPLE_TARGET = 4 * (UNPROVEN_PER_SECOND + COOKIES_PER_SECOND)
# Judged every SAMPLE_WINDOW: while the socket queue overflows we see only what we drain,
# so the first estimates are low and it takes a few windows to settle.
SAMPLE_WINDOW = 0.25
MIN_KEEP = 2.0 ** -12


class Verdict(Enum):
    PROCESS = "process"
    COOKIE = "cookie"
    DROP = "drop"


class Budget:
    """A global token bucket: ``per_second`` tokens a second, bursts of one second's."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._tokens = float(per_second)
        self._at = float("-inf")

    def ready(self, now: float) -> bool:
        """Refill up to ``now``; whether a token is there (``take`` spends it)."""
        if now > self._at:
            self._tokens = min(self.per_second, self._tokens + (now - self._at) * self.per_second)
            self._at = now
        return self._tokens >= 1.0

    def take(self) -> None:
        self._tokens -= 1.0


class Admission:
    """The budgets of a device under load; ``drop`` names why the last DROP was given.

    What the shell's kernel filter should drop: ``flagged_sources(now)`` and ``keep``;
    ``flag_version`` changes whenever either does.
    """

    def __init__(self, *, unproven_per_second: int = UNPROVEN_PER_SECOND,
                 cookies_per_second: int = COOKIES_PER_SECOND) -> None:
        self.proven = RateLimiter()  # per source IP, for messages with a valid mac2
        self.sources = RateLimiter(rate=1 / SOURCE_INTERVAL, burst=1)  # (host, port) keys
        self._unproven = Budget(unproven_per_second)
        self._cookies = Budget(cookies_per_second)
        self.drop = Drop.SOURCE_LIMITED
        self.flagged: dict[tuple[str, int], float] = {}  # refused (host, port) -> until
        self.flag_version = 0
        self.busy_until = float("-inf")  # the last flag's end
        self.keep = 1.0
        self._window = float("-inf")  # start of the window ``_seen`` counts
        self._seen = 0  # mac2-less messages judged in the window

    def proven_allowed(self, ip: bytes, now: float) -> bool:
        """A message with a valid mac2 from ``ip``: within its rate?"""
        return self.proven.allow(ip, now)

    def unproven(self, source: Endpoint, now: float) -> Verdict:
        """What a message without a valid mac2 from ``source`` gets."""
        key = (source.host, source.port)
        if key in self.flagged:  # queued before the kernel's filter had it
            self.drop = Drop.SOURCE_LIMITED
            return Verdict.DROP
        if now - self._window >= SAMPLE_WINDOW:
            self._resample(now)
        self._seen += 1
        unproven, cookies = self._unproven, self._cookies
        if not unproven.ready(now) and not cookies.ready(now):
            self.drop = Drop.COOKIE_LIMITED  # nothing left to give: no need to look closer
            return Verdict.DROP
        sources = self.sources
        if not sources.allow(key, now) and not (sources.full and key not in sources):
            self.drop = Drop.SOURCE_LIMITED
            self._flag(key, now)
            return Verdict.DROP
        if unproven.ready(now):
            unproven.take()
            return Verdict.PROCESS
        cookies.take()
        return Verdict.COOKIE

    def _resample(self, now: float) -> None:
        """Set ``keep`` for the next window from the rate the last one let through."""
        arrived = self._seen / self.keep / max(SAMPLE_WINDOW, now - self._window)
        keep = 1.0
        while keep > MIN_KEEP and arrived * keep > SAMPLE_TARGET:
            keep /= 2
        if keep != self.keep:
            self.keep = keep
            self.flag_version += 1
        if keep < 1.0:
            self.busy_until = max(self.busy_until, now + 1.0)
        self._window, self._seen = now, 0

    def _flag(self, key: tuple[str, int], now: float) -> None:
        flagged = self.flagged
        if key in flagged or len(flagged) >= MAX_FLAGGED:
            return
        flagged[key] = self.busy_until = now + FLAG_TIME
        self.flag_version += 1

    def flagged_sources(self, now: float) -> list[Endpoint]:
        """The sources flagged now. Expired flags are forgotten here, and ``keep`` is
        looked at again once its window is over, so it rises soon after a flood ends
        even when no message comes to ``unproven`` any more."""
        expired = [key for key, until in self.flagged.items() if until <= now]
        for key in expired:
            del self.flagged[key]
        if expired:
            self.flag_version += 1
        if self.keep < 1.0 and now - self._window >= SAMPLE_WINDOW:
            self._resample(now)
        return [Endpoint(host, port) for host, port in self.flagged]
