"""TAI64N labels: layout, round trip, whitening, ordering."""

from __future__ import annotations

import pytest

from uspan.wg import tai64n


def test_epoch_known_answer() -> None:
    # 2^62 + 10 seconds (TAI is 10 s ahead of the Unix epoch), then nanoseconds, big-endian.
    assert tai64n.encode(0).hex() == "400000000000000a" "00000000"
    assert tai64n.encode(1_700_000_000).hex() == "400000006553f10a" "00000000"


def test_round_trip_seconds_exact_nanoseconds_whitened() -> None:
    label = tai64n.encode(1_700_000_000.75)
    seconds, nanos = tai64n.decode(label)
    assert seconds == 1_700_000_000
    assert nanos % (1 << 24) == 0  # rounded down to a multiple of 2^24 ns
    assert 750_000_000 - (1 << 24) < nanos <= 750_000_000


def test_whitening_hides_times_within_one_window() -> None:
    base = 1_700_000_000.0
    assert tai64n.encode(base) == tai64n.encode(base + 0.016)  # 2^24 ns is about 16.8 ms
    assert tai64n.after(tai64n.encode(base + 0.017), tai64n.encode(base))


def test_nanoseconds_never_reach_a_second() -> None:
    assert tai64n.decode(tai64n.encode(5.9999999999))[1] < 1_000_000_000


def test_ordering_is_strict_and_follows_time() -> None:
    earlier, later = tai64n.encode(100.0), tai64n.encode(101.0)
    assert tai64n.after(later, earlier)
    assert not tai64n.after(earlier, later)
    assert not tai64n.after(earlier, earlier)
    # Ordering across a nanosecond carry: 1.9 s is before 2.0 s.
    assert tai64n.after(tai64n.encode(2.0), tai64n.encode(1.9))


@pytest.mark.parametrize("size", [0, 11, 13])
def test_decode_rejects_bad_size(size: int) -> None:
    with pytest.raises(ValueError, match="12 bytes"):
        tai64n.decode(bytes(size))
