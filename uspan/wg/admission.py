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
at most one full handshake each before they are flagged again. Spoofed sources never
repeat, so against them the kernel keeps only a fraction ``keep`` of mac2-less
initiations, and the flood's cost to us is bounded.

Which of a spoofed flood get an answer: before a DH a new peer's first initiation looks
like the junk, so its chance per attempt is (answers given) / (flood rate), whatever the
choice; what we can do is give as many answers as we can and waste none. So the sample
is no larger than the budgets: every initiation read gets a handshake or a cookie, none
is read only to be dropped. It is random per datagram, not by source, so a peer missed
once has the same chance at its retry. And it is no larger than we drain: a socket
queue that stays full loses a peer's initiation, its mac2 retry and tunnel traffic as
readily as the junk. While the shell's ``backlog()`` (the queue's fill, 0..1) is above
BACKLOG_HIGH we read all we can, so what we drained then is what we can do (a CPU shared
with the flood's sender drains less than an idle one): the aim is set to DRAIN_SHARE of
it (of the window before, if more: a stalled window is not all we can do), so the queue
empties, and grows back by a quarter each window that stays clear. The sample is the
aim over the flood's rate, which we see only through the sample: from a clear queue,
what we read over the keep (a fall of less than 4x is followed a step a window: one
window read short lifted the sample whole, and the queue overflowed the next); while
behind, at least what we read over the largest keep since it was last clear (older
datagrams were kept at that), and twice that each window it stays behind after the cut.
It was half of what we drained, again each window the queue was still high, and the
flood's rate was what we read over the keep of now: from a queue kept at older, larger
ones it seemed several times the real one, so at a flood's onset or after a stalled read
the sample fell to 1/128 and took 2-3 s to grow back (a newcomer 2 s in had a chance of
1/4 where 0.6 was there; the probe's figures are in ``bench/RESULTS.md``, "Sample
control law"). The budgets cap the aim apart (``target``), so the sample follows their
fall and their rise within a window.

The cookie budget yields to the tunnels: a cookie costs the one thread their data
needs (~35 us, five of their messages), and a flood's answers at 16,000 a second cut an
established TCP stream to about 0.6 of its rate (``bench/flood --tunnel``). So each window it is set
from the transport messages the device accepted (authentic and fresh: spoofed ones
move nothing) and sent in the last one: the whole COOKIES_PER_SECOND while the tunnels
are idle, falling in proportion to their traffic to MIN_COOKIES_PER_SECOND at
TUNNEL_YIELD_RATE (``cookie_rate``; a newcomer's chance per attempt is then that over
the flood rate; peers with a known endpoint take the lane below). The sample follows at
once, so the junk read shrinks with it. The window is judged without a flood too, so
the first answers to one already know the tunnels' traffic: a window is SAMPLE_WINDOW
while initiations come or a sample is set, else up to a second (the shell's filter
loop then calls ``kernel_filter`` once a second). Messages, not bytes: receiving one
costs ~1.7 us at 80 bytes and ~2.9 us at 1,424, so a stream's small ACKs cost nearly
what its data does. The trade-off: a configured peer can hold the budget low with
cheap keepalives (20,000 a second for the least); that takes a peer's keys, and the
lane still serves the peers whose endpoints we know.

Where the shell reads in C (``uspan.daemon.gate``), a cookie costs ~8 us there (with
its read and send) instead of ~35, so the cookies come from a third budget answered in C
(``allow_bulk``, yielding to the tunnels like the other), and the one judged here falls
to MIN_COOKIES_PER_SECOND: enough to judge sources (a few ports repeating are flagged
here), not to spend a flooded CPU three times over on the same answers. ``plan`` says
how many of each a read may give, ``planned`` takes what it gave. The sample counts all
three, so a newcomer's chance per attempt becomes what C answers over the flood rate.

That sample would cost a new peer its first handshakes too (its chance per attempt is
budget / flood rate), so the peers' endpoints (configured or learned from authenticated
packets; the MAX_TRUSTED that ``known`` ranks first, read again every SAMPLE_WINDOW)
form a priority lane: the kernel
passes their mac2-less initiations unsampled, and here they skip the global budgets and
the cookie round trip, limited only per endpoint (TRUSTED_BURST, then one per
SOURCE_INTERVAL: as often as a real peer initiates, with room for a response crossing
its initiation). What that gives a spoofer who knows a peer's exact address and port:
at most that many DHs a second per lane endpoint (a responder must spend one to learn
who is real; the lane bounds how many), and no reply, as a forged initiation fails to
decrypt and a replayed one is stale. An endpoint over its limit is *abused* for
FLAG_TIME: the kernel samples its initiations like anyone's, and here it gets cookies,
never a flag (the kernel would then drop the real peer's initiations too, and it could
never earn a cookie). Its responses are not judged here at all: the device serves a
response to a handshake it has pending and drops one to any other index at the cost of
a lookup (an off-path spoofer cannot guess a 32-bit index), so our own rekeys to that
peer still complete. Such a spoofer thus costs that one peer the fast path for its
initiations, as if it had no lane: the rest of the lane, established tunnels, responses
to our initiations and mac2-bearing retries are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from uspan.wg.constants import (
    COOKIES_PER_SECOND,
    MIN_COOKIES_PER_SECOND,
    SOURCE_INTERVAL,
    TUNNEL_YIELD_RATE,
    UNPROVEN_PER_SECOND,
)
from uspan.wg.drops import Drop
from uspan.wg.endpoint import Endpoint
from uspan.wg.ratelimit import RateLimiter

FLAG_TIME = 10.0  # seconds a refused source's initiations are dropped in the kernel
MAX_FLAGGED = 256
# The kernel lets through a fraction ``keep`` (a step of KEEP_STEP) of the mac2-less
# initiations from unflagged sources, aiming at most at what the budgets answer a second:
# a spoofed flood then costs us that many checks, not one per datagram. While the socket
# queue is fuller than BACKLOG_HIGH the aim is lowered (never below MIN_TARGET, so a few
# new peers under load are not sampled), if the initiations are at least FLOOD_SHARE of
# what was read: a queue full of tunnel data is not theirs to make room for. (Of the
# tunnel messages accepted: spoofed transport junk is no tunnel's, and makes room like
# theirs.)
MIN_TARGET = 1000
BACKLOG_HIGH = 0.25
BACKLOG_FALL = 1 / 16
FLOOD_SHARE = 0.5
# Judged every SAMPLE_WINDOW: while the socket queue is behind we see only what we
# drain, so the flood's rate is a lower bound, doubled each window the queue does not
# fall by BACKLOG_FALL (a full one would take 4 s to empty).
SAMPLE_WINDOW = 0.25
KEEP_STEP = 2.0 ** 0.25  # the sample's steps: it is within a fifth of its aim
MAX_STEPS = 48  # the sample's floor: KEEP_STEP ** -48 = 2 ** -12 (a newcomer's chance is never 0)
DRAIN_SHARE = 0.75  # behind, the aim is this of what we drained (the queue then empties)
MAX_TRUSTED = 64  # endpoints in the priority lane (the kernel filter checks each)
TRUSTED_BURST = 2  # a lane endpoint's mac2-less handshakes at once, then one per interval

Key = tuple[str, int]  # (host, port)


class Verdict(Enum):
    PROCESS = "process"
    COOKIE = "cookie"
    DROP = "drop"


@dataclass(frozen=True)
class KernelFilter:
    """What the kernel should do with mac2-less initiations (the rest it passes): pass
    those from ``lane``; drop those from ``flagged``; of the others keep a random
    fraction ``keep``."""

    flagged: list[Endpoint]
    lane: list[Endpoint]
    keep: float

    def drops_any(self) -> bool:
        return bool(self.flagged) or self.keep < 1.0


def _keep(step: int) -> float:
    """The sample at ``step`` (exact: halved every four steps)."""
    return math.ldexp(2.0 ** -(step % 4 / 4), -(step // 4))


def cookie_rate(tunnels: float, most: int = COOKIES_PER_SECOND) -> int:
    """The cookie budget while the tunnels carry ``tunnels`` messages a second: what
    their work leaves, from ``most`` (idle) down to MIN_COOKIES_PER_SECOND (at
    TUNNEL_YIELD_RATE)."""
    spare = max(0.0, 1.0 - tunnels / TUNNEL_YIELD_RATE)
    least = min(MIN_COOKIES_PER_SECOND, most)
    return round(least + (most - least) * spare)


class Budget:
    """A global token bucket: ``per_second`` tokens a second, bursts of one second's."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self._tokens = float(per_second)
        self._at = float("-inf")

    def set_rate(self, per_second: int) -> None:
        """From now on ``per_second``; a lower rate takes effect at once (no burst of the
        old one's tokens)."""
        self.per_second = per_second
        self._tokens = min(self._tokens, per_second)

    def ready(self, now: float) -> bool:
        """Refill up to ``now``; whether a token is there (``take`` spends it)."""
        if now > self._at:
            self._tokens = min(self.per_second, self._tokens + (now - self._at) * self.per_second)
            self._at = now
        return self._tokens >= 1.0

    def take(self) -> None:
        self._tokens -= 1.0

    def available(self, now: float) -> int:
        """The whole tokens there at ``now`` (``spend`` takes some)."""
        self.ready(now)
        return int(self._tokens)

    def spend(self, count: int) -> None:
        self._tokens -= count


class Admission:
    """The budgets of a device under load; ``drop`` names why the last DROP was given.

    ``known(now)`` yields the peers' endpoints, the most deserving first (read again
    every SAMPLE_WINDOW by whichever call comes first, so a flood that never reaches
    ``unproven`` leaves no stale lane). ``backlog()`` is how full the shell's socket
    queue is (0..1), read once a window while a sample is set. What the shell's kernel
    filter should do is ``kernel_filter(now)``; ``flag_version`` changes whenever that
    does.
    """

    def __init__(self, *, unproven_per_second: int = UNPROVEN_PER_SECOND,
                 cookies_per_second: int = COOKIES_PER_SECOND,
                 known: Callable[[float], Iterable[Endpoint]] = lambda now: (),
                 backlog: Callable[[], float] = lambda: 0.0) -> None:
        self.known = known
        self.backlog = backlog
        self._cookies_most = cookies_per_second  # while the tunnels are idle
        self._bulk_most = 0  # answered in C: none until ``allow_bulk``
        self.aim = float(unproven_per_second + cookies_per_second)  # the backlog's
        self.target = self.aim  # the sample's: ``aim`` capped by the budgets of now
        self.proven = RateLimiter()  # per source IP, for messages with a valid mac2
        self.sources = RateLimiter(rate=1 / SOURCE_INTERVAL, burst=1)  # (host, port) keys
        self._strays = RateLimiter(rate=1 / SOURCE_INTERVAL, burst=1)  # apart: see ``stray``
        self.trusted: dict[Key, Endpoint] = {}  # the lane, from ``known``
        self._trusted_limit = RateLimiter(2 * MAX_TRUSTED, rate=1 / SOURCE_INTERVAL,
                                          burst=TRUSTED_BURST)
        self.abused: dict[Key, float] = {}  # lane endpoints over their limit -> until
        self._unproven = Budget(unproven_per_second)
        self._cookies = Budget(cookies_per_second)
        self._bulk = Budget(0)
        self.drop = Drop.SOURCE_LIMITED
        self.flagged: dict[Key, float] = {}  # refused (host, port) -> until
        self.flag_version = 0
        self.busy_until = float("-inf")  # the last flag's end
        self.keep = 1.0
        self._window = float("-inf")  # start of the window ``_seen`` counts
        self._lane_read = float("-inf")
        self._seen = 0  # mac2-less messages judged in the window
        self.drained = 0.0  # of those a second, in the last window
        self._drained_before = 0.0  # and in the one before
        self.arrived = 0.0  # the estimate of their rate before the sample
        self._keep_high = 1.0  # the largest keep since the queue was last clear
        self._backlog = 0.0  # the queue's fill at the last window's end
        self.others = 0  # the device's count of transport messages accepted (in the window)
        self.sent = 0  # and of those it sent (in the window)
        self.tunnel_total = 0  # the two, in the windows before

    @property
    def tunnel_messages(self) -> int:
        """The tunnel messages counted so far (the shell's stats)."""
        return self.tunnel_total + self.others + self.sent

    def stats(self) -> dict[str, int]:
        """The sample's state for the shell's stats: ``keep`` in millionths, the aim,
        the target and the last window's drained rate and the arrivals estimated (a second)."""
        return {"sample_keep_ppm": round(self.keep * 1e6), "sample_aim": round(self.aim),
                "sample_target": round(self.target),
                "sample_drained": round(self.drained),
                "sample_arrived": round(self.arrived)}

    def proven_allowed(self, ip: bytes, now: float) -> bool:
        """A message with a valid mac2 from ``ip``: within its rate?"""
        return self.proven.allow(ip, now)

    def unproven(self, source: Endpoint, now: float) -> Verdict:
        """What a message without a valid mac2 from ``source`` gets."""
        key = (source.host, source.port)
        if now - self._window >= SAMPLE_WINDOW:
            self._resample(now)
        if now - self._lane_read >= SAMPLE_WINDOW:
            self._read_lane(now)
        trusted = key in self.trusted
        if key in self.flagged and not trusted:  # queued before the kernel's filter had it
            self.drop = Drop.SOURCE_LIMITED
            return Verdict.DROP
        self._seen += 1
        unproven, cookies = self._unproven, self._cookies
        if trusted and self._trusted_limit.allow(key, now):
            return Verdict.PROCESS
        if trusted:  # over the limit a real peer keeps: out of the lane, cookies only
            if key not in self.abused:
                self.flag_version += 1
            self.abused[key] = now + FLAG_TIME
            if cookies.ready(now):
                cookies.take()
                return Verdict.COOKIE
            self.drop = Drop.COOKIE_LIMITED
            return Verdict.DROP
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

    def allow_bulk(self, per_second: int) -> None:
        """The shell answers cookies in C: up to ``per_second`` more while the tunnels
        are idle (see the module's docstring)."""
        self._bulk_most = per_second
        self._bulk.set_rate(per_second)
        self._cookies_most = min(self._cookies_most, MIN_COOKIES_PER_SECOND)
        self._cookies.set_rate(self._cookies_most)
        self.aim = self.target = self._whole()

    def plan(self, now: float) -> tuple[int, int]:
        """For a read in C: (how many unproven initiations it hands up to ``unproven``,
        how many more it answers with a cookie itself), from the budgets' tokens now."""
        if now - self._window >= SAMPLE_WINDOW:
            self._resample(now)
        if now - self._lane_read >= SAMPLE_WINDOW:
            self._read_lane(now)
        hand_up = self._unproven.available(now) + self._cookies.available(now)
        return hand_up, self._bulk.available(now)

    def planned(self, cookies: int, dropped: int) -> None:
        """What a read in C did beyond what it handed up: ``cookies`` answered, ``dropped``
        refused (both judged, for the sample)."""
        self._bulk.spend(cookies)
        self._seen += cookies + dropped

    def stray(self, source: Endpoint, now: float) -> None:
        """A mac2-less message refused anyway (a response to no handshake of ours): only
        its source is judged, so that one repeating it is flagged for the kernel (which
        then drops its initiations; responses it passes from anyone). Counted apart from
        initiations: a peer whose initiation crosses a stray response of its own is not
        flagged for the two together."""
        key = (source.host, source.port)
        strays = self._strays
        if (key not in self.trusted and not strays.allow(key, now)
                and not (strays.full and key not in strays)):
            self._flag(key, now)

    def _read_lane(self, now: float) -> None:
        """Take the lane from ``known`` again; endpoints that leave it are forgotten by its
        limiter, so a full table never refuses a newcomer."""
        trusted: dict[Key, Endpoint] = {}
        for endpoint in self.known(now):
            if len(trusted) >= MAX_TRUSTED:
                break
            trusted[(endpoint.host, endpoint.port)] = endpoint
        if trusted.keys() != self.trusted.keys():
            self.abused = {key: t for key, t in self.abused.items() if key in trusted}
            self._trusted_limit.retain(trusted)
            self.flag_version += 1
        self.trusted = trusted
        self._lane_read = now

    def _resample(self, now: float) -> None:
        """Set the cookie budget for the next window from the tunnels' traffic in the
        last one, ``keep`` from the rate it let through, and the aim from the budgets and
        whether we drained it (see the module's docstring)."""
        seconds = max(SAMPLE_WINDOW, now - self._window)
        drained = self.drained = self._seen / seconds
        tunnels = self.others + self.sent
        self._cookies.set_rate(cookie_rate(tunnels / seconds, self._cookies_most))
        if self._bulk_most:
            self._bulk.set_rate(cookie_rate(tunnels / seconds, self._bulk_most))
        self.tunnel_total += tunnels
        flood = 0 < self._seen >= FLOOD_SHARE * (self._seen + self.others)
        backlog = self.backlog()
        behind = backlog > BACKLOG_HIGH
        # Sampling a flood, the queue fills and we read nothing: stalled (no news).
        stalled = behind and not self._seen and self.keep < 1.0
        self._estimate(drained, backlog, stalled or (flood and (
            behind or self._backlog > BACKLOG_HIGH)))
        if behind:
            if flood or stalled:  # behind because of them: what we drained is all we
                # can do (a stalled window is not: the one before counts too)
                self.aim = max(MIN_TARGET,
                               DRAIN_SHARE * max(drained, self._drained_before))
        else:
            self.aim = min(self._whole(), self.aim * 1.25)
            self._keep_high = 0.0
        self._backlog = backlog
        self.target = min(self._most(), self.aim)
        self._drained_before = drained
        step = 0
        while step < MAX_STEPS and self.arrived * _keep(step) > self.target:
            step += 1
        keep = _keep(step)
        self._keep_high = max(self._keep_high, keep)
        if keep != self.keep:
            self.keep = keep
            self.flag_version += 1
        if keep < 1.0:
            self.busy_until = max(self.busy_until, now + 1.0)
        self._window, self._seen, self.others, self.sent = now, 0, 0, 0

    def _estimate(self, drained: float, backlog: float, behind: bool) -> None:
        """The flood's rate before the sample, from what we ``drained`` (a second) and
        whether we were ``behind`` it (see the module's docstring)."""
        if behind:  # we read what we could, kept at no larger a keep than since clear
            self.arrived = max(self.arrived, drained / self._keep_high)
            if self._backlog > BACKLOG_HIGH and backlog > self._backlog - BACKLOG_FALL:
                self.arrived *= 2  # behind for a window after the cut: more came
            return
        arrived = drained / self.keep  # what it kept (or no flood: the queue's not theirs)
        self.arrived = (arrived if arrived <= self.arrived / 4  # the flood's end
                        else max(arrived, self.arrived / KEEP_STEP))

    def _most(self) -> float:
        """What the budgets answer a second now."""
        return float(self._unproven.per_second + self._cookies.per_second
                     + self._bulk.per_second)

    def _whole(self) -> float:
        """What the budgets answer a second while the tunnels are idle."""
        return float(self._unproven.per_second + self._cookies_most + self._bulk_most)

    def _flag(self, key: Key, now: float) -> None:
        flagged = self.flagged
        if key in flagged or len(flagged) >= MAX_FLAGGED:
            return
        flagged[key] = self.busy_until = now + FLAG_TIME
        self.flag_version += 1

    def kernel_filter(self, now: float) -> KernelFilter:
        """What the kernel should do now. Expired flags and abuses are forgotten here,
        and the window is judged once it is over, also with no flood (so the cookie
        budget follows the tunnels before one starts, and ``keep`` rises soon after a
        flood ends even when no message comes to ``unproven`` any more). The lane is
        read again here only while something is dropped (else it may be stale)."""
        for table in (self.flagged, self.abused):
            expired = [key for key, until in table.items() if until <= now]
            for key in expired:
                del table[key]
            if expired:
                self.flag_version += 1
        if now - self._window >= SAMPLE_WINDOW:
            self._resample(now)
        if self.keep == 1.0 and now >= self.busy_until:
            self.aim = self._whole()  # no flood: the next starts from the whole aim
            self.target = self._most()
        # Idle (the shell calls this every second) the filter is detached and the lane
        # moot: reading it costs a pass over the peers (~15 ms with 20,000).
        if (self.flagged or self.keep < 1.0) and now - self._lane_read >= SAMPLE_WINDOW:
            self._read_lane(now)
        return KernelFilter(flagged=[Endpoint(host, port) for host, port in self.flagged],
                            lane=self.lane(), keep=self.keep)

    def lane(self) -> list[Endpoint]:
        """The lane's endpoints that are not abused: served unsampled."""
        abused = self.abused
        return [e for key, e in self.trusted.items() if key not in abused]
