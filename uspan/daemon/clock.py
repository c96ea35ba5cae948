"""Trio's clock as CLOCK_MONOTONIC seconds, with no offset.

Trio's default clock adds a random offset to ``time.perf_counter``; the C data plane
stamps its records in CLOCK_MONOTONIC nanoseconds and the core installs keypairs with the
time it was given. Under this clock ``trio.current_time() * 1e9`` is the plane's clock, so
neither side converts. ``trio.run(..., clock=MonotonicClock())`` in every program that
runs a ``Daemon``.
"""

from __future__ import annotations

import time

import trio

TOLERANCE = 0.01  # seconds: trio.current_time() and time.monotonic() read apart


class MonotonicClock(trio.abc.Clock):
    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return time.monotonic()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - time.monotonic()


def is_monotonic() -> bool:
    """Whether the running trio's clock is CLOCK_MONOTONIC (inside ``trio.run``)."""
    return abs(trio.current_time() - time.monotonic()) < TOLERANCE
