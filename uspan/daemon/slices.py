"""Long control work in short slices, so the data path never waits for it.

uspan runs the tunnel and its configuration on one trio thread: a million-prefix set or
a ``get`` of it would hold that thread for seconds. Such work checks ``Slices.pause``
often; once a slice has run SLICE seconds, ``pause`` lets every other ready task (the
data path, timers, other clients, signals) run before the next one. Cancellation (a stop
signal) takes effect there too.
"""

from __future__ import annotations

import time

import trio

SLICE = 0.002  # seconds of control work between checkpoints


class Slices:
    """The clock of one long operation's current slice."""

    __slots__ = ("_start",)

    def __init__(self) -> None:
        self._start = time.perf_counter()

    async def pause(self) -> None:
        """Let others run if this slice is used up (a checkpoint only then)."""
        if time.perf_counter() - self._start >= SLICE:
            await trio.sleep(0)
            self._start = time.perf_counter()
