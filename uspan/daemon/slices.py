"""Long control work in short slices, so the data path never waits for it.

uspan runs the tunnel and its configuration on one trio thread: a million-prefix set or
a ``get`` of it would hold that thread for seconds. Such work checks ``Slices.pause``
often (each unit of work between checks is kept to a millisecond at most); once a slice
has run SLICE seconds, ``pause`` lets every other ready task (the data path, timers,
other clients, signals) run before the next one. Cancellation (a stop signal) takes
effect there too.

A slice is short because a packet waits for whole passes of the loop: one that becomes
readable while a slice runs waits for the rest of that pass, and in it for the timer
pass too (a handshake initiation, ~0.2 ms). A ping crosses a node in two such waits (TUN
read, then the reply's UDP receive): 2 ms slices put 4-5 ms on the pings during a set
of 1,000 mesh peers (p99 7.1 ms, current wireguard-go 4.4). At 0.5 ms, a pass of control
work, timers and packets stays under ~1 ms; a checkpoint costs ~17 us (two a pause:
~7 % more CPU for a big set or get).

Python's cycle collector is the other source of long pauses: a million prefixes in
flight are millions of objects, and each full collection walks all of them (0.5 s and
more at a time). ``collector_paused`` keeps it off while such work runs; what the work
allocated is freed by reference counting once it is done (the device keeps prefixes as
plain ints, which the collector never walks).

What stays is the peers: 20,000 of them are ~200,000 objects, and a full collection walks
them all (0.1-0.2 s) every few seconds while their handshakes churn. ``Frozen`` moves
them out of the collector's sight (``gc.freeze``) after changes that made many peers.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator

import trio

SLICE = 0.0005  # seconds of control work between checkpoints (see above)
FREEZE_AFTER = 1000  # peer changes that make the long-lived heap worth freezing again
REFRESH_AFTER = 3600.0  # seconds between freezes that collect the frozen heap in full


class Slices:
    """The clock of one long operation's current slice."""

    __slots__ = ("_start",)

    def __init__(self) -> None:
        self._start = time.perf_counter()

    async def pause(self) -> None:
        """Let others run if this slice is used up (checkpoints only then).

        Two checkpoints: trio runs each batch of ready tasks in either order, so after
        one, a datagram's task woken by the slice's I/O poll ran after the next slice
        half the time (waiting two slices); the second makes every task that was ready
        at the pause run before the next slice starts."""
        if time.perf_counter() - self._start >= SLICE:
            await trio.sleep(0)
            await trio.sleep(0)
            self._start = time.perf_counter()


_paused = 0  # operations running with the cycle collector off


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection until every such block has ended (they may nest or
    overlap across tasks). Drop the big objects before the block ends."""
    global _paused
    if _paused == 0:
        gc.disable()
    _paused += 1
    try:
        yield
    finally:
        _paused -= 1
        if _paused == 0:
            gc.enable()


class Frozen:
    """Keeps long-lived objects out of the cycle collector's full collections.

    After FREEZE_AFTER peer changes (one big set or many small ones) everything alive is
    frozen: a frozen object is still freed when its last reference goes, but the
    collector never walks it again, so a full collection covers only what came since.
    The price is that frozen objects in a reference cycle are never freed. The device
    breaks the cycles of a peer it removes; what stays is the cyclic garbage pending at
    that moment and what was alive then and later dies in a cycle (a connection's task,
    say): a few objects per freeze. So at most once per REFRESH_AFTER, a freeze first
    thaws everything and collects it in full (0.1-0.2 s at 20,000 peers): what a long
    run of reconfigurations can keep is bounded by an hour's worth.
    """

    __slots__ = ("_changes", "_clock", "_refreshed")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._changes = 0
        self._clock = clock
        self._refreshed = clock()

    def changed(self, peers: int) -> None:
        """A configuration changed ``peers`` peers and is done with its objects."""
        self._changes += peers
        if self._changes >= FREEZE_AFTER:
            self._changes = 0
            now = self._clock()
            if now - self._refreshed >= REFRESH_AFTER:
                self._refreshed = now
                gc.unfreeze()
                gc.collect()
            gc.freeze()
