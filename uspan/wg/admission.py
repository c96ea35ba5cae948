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
has the kernel drop its mac2-less initiations before they reach the socket queue
(``uspan.daemon.earlydrop``), where they would push a real peer's packet out. While
sources are flagged the device stays under load, so their return after FLAG_TIME costs
at most one full handshake each before they are flagged again.
"""

from __future__ import annotations

from enum import Enum

from uspan.wg.constants import COOKIES_PER_SECOND, SOURCE_INTERVAL, UNPROVEN_PER_SECOND
from uspan.wg.drops import Drop
from uspan.wg.endpoint import Endpoint
from uspan.wg.ratelimit import RateLimiter

_GLOBAL = b""  # the one key of a global budget
FLAG_TIME = 10.0  # seconds a refused source's initiations are dropped in the kernel
MAX_FLAGGED = 256


class Verdict(Enum):
    PROCESS = "process"
    COOKIE = "cookie"
    DROP = "drop"


class Admission:
    """The budgets of a device under load; ``drop`` names why the last DROP was given."""

    def __init__(self, *, unproven_per_second: int = UNPROVEN_PER_SECOND,
                 cookies_per_second: int = COOKIES_PER_SECOND) -> None:
        self.proven = RateLimiter()  # per source IP, for messages with a valid mac2
        self.sources = RateLimiter(rate=1 / SOURCE_INTERVAL, burst=1)
        self._unproven = _budget(unproven_per_second)
        self._cookies = _budget(cookies_per_second)
        self.drop = Drop.SOURCE_LIMITED
        self.flagged: dict[Endpoint, float] = {}  # refused source -> flagged until
        self.flag_version = 0  # changes whenever ``flagged`` does
        self.busy_until = float("-inf")  # the last flag's end

    def proven_allowed(self, ip: bytes, now: float) -> bool:
        """A message with a valid mac2 from ``ip``: within its rate?"""
        return self.proven.allow(ip, now)

    def unproven(self, source: Endpoint, now: float) -> Verdict:
        """What a message without a valid mac2 from ``source`` gets."""
        sources = self.sources
        if not sources.allow(source, now) and not (sources.full and source not in sources):
            self.drop = Drop.SOURCE_LIMITED
            self._flag(source, now)
            return Verdict.DROP
        if self._unproven is not None and self._unproven.allow(_GLOBAL, now):
            return Verdict.PROCESS
        if self._cookies is not None and self._cookies.allow(_GLOBAL, now):
            return Verdict.COOKIE
        self.drop = Drop.COOKIE_LIMITED
        return Verdict.DROP


    def _flag(self, source: Endpoint, now: float) -> None:
        flagged = self.flagged
        if source in flagged or len(flagged) >= MAX_FLAGGED:
            return
        flagged[source] = self.busy_until = now + FLAG_TIME
        self.flag_version += 1

    def flagged_sources(self, now: float) -> list[Endpoint]:
        """The sources flagged now (expired flags are forgotten here)."""
        expired = [source for source, until in self.flagged.items() if until <= now]
        for source in expired:
            del self.flagged[source]
        if expired:
            self.flag_version += 1
        return list(self.flagged)


def _budget(per_second: int) -> RateLimiter | None:
    """A global budget of ``per_second`` (bursts of one second's worth); None if 0."""
    if per_second <= 0:
        return None
    return RateLimiter(1, rate=per_second, burst=per_second)
