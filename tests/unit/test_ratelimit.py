"""Per-IP handshake token buckets: burst, refill rate, independence, bounded memory."""

from __future__ import annotations

import pytest

from uspan.wg.constants import HANDSHAKE_BURST, HANDSHAKES_PER_SECOND
from uspan.wg.ratelimit import GC_INTERVAL, RateLimiter

IP_A = bytes([192, 0, 2, 1])
IP_B = bytes([192, 0, 2, 2])
T0 = 1000.0
INTERVAL = 1 / HANDSHAKES_PER_SECOND  # 50 ms


def test_burst_then_refused() -> None:
    limiter = RateLimiter()
    assert [limiter.allow(IP_A, T0) for _ in range(HANDSHAKE_BURST + 2)] == (
        [True] * HANDSHAKE_BURST + [False, False]
    )


def test_refills_one_token_per_interval() -> None:
    limiter = RateLimiter()
    for _ in range(HANDSHAKE_BURST):
        limiter.allow(IP_A, T0)
    assert not limiter.allow(IP_A, T0 + INTERVAL * 0.9)
    assert limiter.allow(IP_A, T0 + INTERVAL)
    assert not limiter.allow(IP_A, T0 + INTERVAL)


def test_sustained_rate_is_twenty_per_second() -> None:
    limiter = RateLimiter()
    allowed = sum(limiter.allow(IP_A, T0 + i * 0.001) for i in range(10_000))  # 10 s at 1 kHz
    assert allowed == HANDSHAKE_BURST + 10 * HANDSHAKES_PER_SECOND - 1


def test_burst_never_exceeds_its_cap_after_idling() -> None:
    limiter = RateLimiter()
    limiter.allow(IP_A, T0)
    later = T0 + 0.5  # idle long enough to refill many times over, still one entry
    assert sum(limiter.allow(IP_A, later) for _ in range(20)) == HANDSHAKE_BURST


def test_sources_are_independent() -> None:
    limiter = RateLimiter()
    for _ in range(HANDSHAKE_BURST):
        limiter.allow(IP_A, T0)
    assert not limiter.allow(IP_A, T0)
    assert limiter.allow(IP_B, T0)


def test_idle_entries_are_collected() -> None:
    limiter = RateLimiter()
    for i in range(100):
        limiter.allow(i.to_bytes(4, "big"), T0)
    assert len(limiter) == 100
    limiter.allow(IP_A, T0 + 1.5)
    assert len(limiter) == 1


def test_table_is_capped_against_spoofed_floods() -> None:
    limiter = RateLimiter(max_entries=8)
    results = [limiter.allow(i.to_bytes(4, "big"), T0) for i in range(20)]
    assert results == [True] * 8 + [False] * 12
    assert len(limiter) == 8
    assert limiter.allow((0).to_bytes(4, "big"), T0)  # known sources keep their buckets
    assert limiter.allow(IP_A, T0 + 1.5)  # room again once idle entries are collected


def test_max_entries_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        RateLimiter(max_entries=0)


def test_a_slow_bucket_is_kept_until_it_has_refilled() -> None:
    """One token per 5 s: GC must not forget a spent entry after 1 s (that would refill it)."""
    limiter = RateLimiter(rate=0.2, burst=1)
    assert limiter.allow(IP_A, T0)
    limiter.allow(IP_B, T0 + 2.0)  # a collection runs
    assert IP_A in limiter
    assert not limiter.allow(IP_A, T0 + 4.9)
    assert limiter.allow(IP_A, T0 + 5.0)  # a refused attempt spends nothing


def test_a_full_table_refuses_new_keys_and_says_so() -> None:
    limiter = RateLimiter(2)
    assert limiter.allow(IP_A, T0) and limiter.allow(IP_B, T0)
    assert limiter.full
    assert not limiter.allow(b"\x01\x02\x03\x04", T0)
    assert b"\x01\x02\x03\x04" not in limiter


def test_bad_parameters_are_refused() -> None:
    for kwargs in ({"rate": 0}, {"burst": 0}):
        with pytest.raises(ValueError):
            RateLimiter(**kwargs)


def test_retain_forgets_the_other_keys_and_frees_their_room() -> None:
    limiter = RateLimiter(2)
    assert limiter.allow(IP_A, T0) and limiter.allow(IP_B, T0)
    limiter.retain({IP_A})
    assert IP_B not in limiter and IP_A in limiter and not limiter.full
    assert limiter.allow(b"\x01\x02\x03\x04", T0)


def test_wait_says_when_a_refused_key_has_a_token_again() -> None:
    """What the discovery service tells a refused client (retry_after)."""
    limiter = RateLimiter(max_entries=2, rate=15.0, burst=60)
    while limiter.allow(IP_A, T0):
        pass
    assert limiter.wait(IP_A) == pytest.approx(1 / 15)
    assert not limiter.allow(IP_A, T0 + 0.05)
    assert limiter.wait(IP_A) == pytest.approx(1 / 15 - 0.05)
    assert limiter.allow(IP_A, T0 + 1 / 15)
    limiter.allow(IP_B, T0)
    assert not limiter.allow(b"third", T0)  # the table is full: until a collection
    assert limiter.wait(b"third") == GC_INTERVAL
