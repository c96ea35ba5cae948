"""Per-peer timers of whitepaper section 6, as deadlines (sans-IO).

Events from the peer (``data_sent``, ``handshake_complete``, ...) arm or disarm deadlines;
``due(now)`` reports which timers have expired and disarms them. What a timer *does* when
it fires lives in ``peer.py``. All times are monotonic seconds; jitter comes from the
injected ``rng`` (through ``Jitter``) so tests are exact.
"""

from __future__ import annotations

from collections.abc import Callable

from uspan.wg.constants import (
    KEEPALIVE_TIMEOUT,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEYS_AFTER,
)

RETRANSMIT = "retransmit_handshake"
SEND_KEEPALIVE = "send_keepalive"
NEW_HANDSHAKE = "new_handshake"
ZERO_KEYS = "zero_key_material"
PERSISTENT_KEEPALIVE = "persistent_keepalive"
SEND_STAGED = "send_staged"
TIMERS = (RETRANSMIT, SEND_KEEPALIVE, NEW_HANDSHAKE, ZERO_KEYS, PERSISTENT_KEEPALIVE, SEND_STAGED)


JITTER_DRAW = 256  # random bytes drawn at once for jitter


class Jitter:
    """Random 16-bit numbers for the timers' jitter, drawn from ``rng`` in blocks: with
    ``os.urandom`` one draw is a getrandom system call, and the data path made one for
    the first packet after each answer (every ping, on its way out)."""

    __slots__ = ("_at", "_block", "_rng")

    def __init__(self, rng: Callable[[int], bytes]) -> None:
        self._rng = rng
        self._block = b""
        self._at = 0

    def __call__(self) -> int:
        at, block = self._at, self._block
        if at + 2 > len(block):
            self._block = block = self._rng(JITTER_DRAW)
            at = 0
        self._at = at + 2
        return block[at] | block[at + 1] << 8


class PeerTimers:
    """The five timers of a peer, the events that move them, and ``send_staged``: what a
    configuration staged, sent at the next timer pass."""

    __slots__ = (
        "_owner",
        "_random",
        "_wake",
        "need_another_keepalive",
        "new_handshake",
        "persistent_keepalive",
        "persistent_keepalive_interval",
        "retransmit_handshake",
        "send_keepalive",
        "send_staged",
        "zero_key_material",
    )

    def __init__(self, random: Callable[[], int], wake: Callable[[bytes, float], None],
                 owner: bytes) -> None:
        self._random = random  # 16-bit numbers (a ``Jitter``)
        # wake(owner, deadline) for every deadline armed, so the device can sleep till
        # then. The owner is the peer's key, not the peer: no cycle of peer, timers and a
        # bound method, which a frozen heap would never free (``uspan.daemon.slices``),
        # and one object fewer per peer for the collector.
        self._wake = wake
        self._owner = owner
        self.retransmit_handshake: float | None = None
        self.send_keepalive: float | None = None
        self.new_handshake: float | None = None
        self.zero_key_material: float | None = None
        self.persistent_keepalive: float | None = None
        self.send_staged: float | None = None
        self.persistent_keepalive_interval = 0
        self.need_another_keepalive = False

    def jitter(self) -> float:
        """A uniformly random 0-333 ms, added to handshake timeouts."""
        millis = int(REKEY_TIMEOUT_JITTER_MAX * 1000)
        return self._random() % millis / 1000.0

    # Events ------------------------------------------------------------------------------

    def data_sent(self, now: float) -> None:
        """Data sent: expect an answer within KEEPALIVE + REKEY_TIMEOUT, else rehandshake."""
        if self.new_handshake is None:
            self.new_handshake = deadline = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self.jitter()
            self._wake(self._owner, deadline)

    def data_received(self, now: float) -> None:
        """Data received: send a keepalive if we have nothing to say within KEEPALIVE."""
        if self.send_keepalive is None:
            self.send_keepalive = deadline = now + KEEPALIVE_TIMEOUT
            self._wake(self._owner, deadline)
        else:
            self.need_another_keepalive = True

    def keepalive_sent(self, now: float) -> None:
        """The keepalive timer fired; re-arm it if more data came meanwhile."""
        if self.need_another_keepalive:
            self.need_another_keepalive = False
            self.send_keepalive = deadline = now + KEEPALIVE_TIMEOUT
            self._wake(self._owner, deadline)

    def any_authenticated_sent(self) -> None:
        self.send_keepalive = None

    def any_authenticated_received(self) -> None:
        self.new_handshake = None

    def handshake_initiated(self, now: float) -> None:
        self.retransmit_handshake = deadline = now + REKEY_TIMEOUT + self.jitter()
        self._wake(self._owner, deadline)

    def handshake_complete(self) -> None:
        self.retransmit_handshake = None

    def session_derived(self, now: float) -> None:
        self.zero_key_material = deadline = now + ZERO_KEYS_AFTER
        self._wake(self._owner, deadline)

    def any_authenticated_traversal(self, now: float) -> None:
        if self.persistent_keepalive_interval:
            self.persistent_keepalive = deadline = now + self.persistent_keepalive_interval
            self._wake(self._owner, deadline)

    def staged_by_configuration(self, now: float) -> None:
        """A configuration staged a packet: send it (or start a handshake for it) at the
        next timer pass, not inside the configuration. Without a session that costs a
        handshake, ~0.1 ms: a set of 20,000 new peers must neither take 20,000 times as
        long nor hold the tunnel while they run (the kernel queues these too)."""
        if self.send_staged is None:
            self.send_staged = now
            self._wake(self._owner, now)

    def gave_up(self, now: float) -> None:
        """Handshake attempts exhausted: stop keepalives, zero keys later if nothing comes."""
        self.send_keepalive = None
        if self.zero_key_material is None:
            self.zero_key_material = deadline = now + ZERO_KEYS_AFTER
            self._wake(self._owner, deadline)

    def stop_all(self) -> None:
        """The peer is gone: disarm every timer."""
        for name in TIMERS:
            setattr(self, name, None)
        self.need_another_keepalive = False
        self._wake = _gone  # a stray event must not arm the timers of a peer re-added

    # Queries -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [
            d
            for d in (
                self.retransmit_handshake,
                self.send_keepalive,
                self.new_handshake,
                self.zero_key_material,
                self.persistent_keepalive,
                self.send_staged,
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def due(self, now: float) -> list[str]:
        """Names of expired timers, in whitepaper order; each is disarmed."""
        fired = []
        for name in TIMERS:
            deadline = getattr(self, name)
            if deadline is not None and deadline <= now:
                setattr(self, name, None)
                fired.append(name)
        return fired


def _gone(owner: bytes, deadline: float) -> None:
    """The wake of a removed peer's timers: nothing to arm."""
