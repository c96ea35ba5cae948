"""A WireGuard peer: its sessions, handshake state, staged packets and timers (sans-IO).

Every method that may emit datagrams takes an ``out`` list and appends
``(datagram, Endpoint)`` pairs to it; nothing here does I/O.
"""

from __future__ import annotations

from collections import deque
from itertools import repeat
from typing import TYPE_CHECKING

from uspan.wg import crypto, tai64n, timers, timersync
from uspan.wg.constants import (
    HANDSHAKE_INITIATION_RATE,
    KEY_SIZE,
    MAX_STAGED_PACKETS,
    MAX_TIMER_HANDSHAKES,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    ZERO_KEY,
)
from uspan.wg.cookie import CookieGenerator
from uspan.wg.drops import Drop
from uspan.wg.facts import PeerFacts
from uspan.wg.handshake import InitiatorState, create_initiation
from uspan.wg.plane import (
    WANTS_RECEIVE,
    WANTS_SEND,
    PeerRecord,
    endpoint_of,
    mirror_endpoint,
    seconds,
)
from uspan.wg.timers import PeerTimers

if TYPE_CHECKING:
    from uspan.wg.device import Device
    from uspan.wg.endpoint import Endpoint
    from uspan.wg.keypair import AnyKeypair

Out = list[tuple[bytes, "Endpoint"]]


class Peer:
    """One remote public key and everything we know about talking to it.

    Slots, so a peer is one object for the cycle collector, not two (its ``__dict__``
    too): with 20,000 peers every object a peer holds is 20,000 for each full collection.
    """

    __slots__ = (
        "__weakref__", "_attempts_address", "_attempts_on_address", "_static_static",
        "attempts", "cookies", "current", "device", "endpoint", "gave_up_at", "get_head",
        "get_many", "get_stamp", "get_tail", "handshake", "handshake_attempts",
        "handshake_index", "handshakes", "last_attempt",
        "last_handshake", "last_initiation_consumed", "last_received", "last_sent_handshake",
        "latest_timestamp", "next", "plane_id", "preshared_key", "previous", "public_key",
        "roamed", "rx_bytes", "sent_last_minute_handshake", "staged", "timer_at",
        "timer_seq", "timers", "tx_bytes", "unanswered_data_since",
    )

    def __init__(self, device: Device, public_key: bytes) -> None:
        self.device = device
        self.public_key = public_key
        self.preshared_key = ZERO_KEY
        self.endpoint: Endpoint | None = None  # set through set_endpoint (the plane's too)
        self.plane_id = -1  # its id in the device's plane, if it has one
        self.roamed = 0  # device.peer_events at the latest roam to a new address (facts)
        # Its get=1 text that only a set or a roam changes (Device.get_steps): the lines
        # before its counters (None: to render again) and after them, the stamp of the
        # allowed IPs in those, or whether they are too many to be. Slots, not a tuple:
        # nothing more for the cycle collector to walk.
        self.get_head: bytes | None = None
        self.get_tail = b""
        self.get_stamp = 0
        self.get_many = False
        self.cookies = CookieGenerator(public_key, rng=device.rng)
        self.timers = PeerTimers(device.jitter, device.timer_armed, public_key)
        self.timer_seq = -1  # the device's timer queue entry for this peer (-1: none)
        self.timer_at = 0.0  # and its deadline
        # Sessions.
        self.current: AnyKeypair | None = None
        self.previous: AnyKeypair | None = None
        self.next: AnyKeypair | None = None
        # Handshake in flight (as initiator).
        self.handshake: InitiatorState | None = None
        self._static_static: bytes | None = None  # DH(our static, theirs), kept
        self.handshake_index: int | None = None
        self.last_sent_handshake: float | None = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        # Responder replay protection.
        self.latest_timestamp = bytes(12)
        self.last_initiation_consumed: float | None = None
        # Facts for the mesh (facts.PeerFacts).
        self.handshakes = 0
        self.attempts = 0  # initiations sent since the last completed handshake
        self.last_attempt: float | None = None
        self.gave_up_at: float | None = None
        self.last_received: float | None = None  # any authenticated message
        self.unanswered_data_since: float | None = None  # first data sent since then
        self._attempts_address: tuple[str, int] | None = None
        self._attempts_on_address = 0
        # Counters.
        self.last_handshake: float | None = None  # monotonic
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.staged: deque[bytes] = deque()

    # Configuration -----------------------------------------------------------------------

    @property
    def persistent_keepalive(self) -> int:
        return self.timers.persistent_keepalive_interval

    def set_persistent_keepalive(self, seconds: int, now: float) -> None:
        """Set the interval; turning it on sends a keepalive right away (like wireguard-go),
        at the next timer pass."""
        was = self.timers.persistent_keepalive_interval
        self.timers.persistent_keepalive_interval = seconds
        if not seconds:
            self.timers.persistent_keepalive = None
        elif not was:
            if not self.staged:
                self.staged.append(b"")
            self.timers.staged_by_configuration(now)

    # Sending -----------------------------------------------------------------------------

    def _transmit(self, datagram: bytes, out: Out) -> bool:
        endpoint = self.endpoint
        if endpoint is None:
            self.device.counters[Drop.NO_ENDPOINT] += 1
            return False
        out.append((datagram, endpoint))
        self.tx_bytes += len(datagram)
        return True

    def stage(self, packet: bytes, now: float, out: Out) -> None:
        """Queue an IP packet from the TUN; ``send_staged`` sends the queue.

        A full queue is flushed first; without a session the oldest packet is dropped.
        """
        staged = self.staged
        if len(staged) >= MAX_STAGED_PACKETS:
            self.send_staged(now, out)
            if len(staged) >= MAX_STAGED_PACKETS:
                staged.popleft()
                self.device.counters[Drop.STAGED_OVERFLOW] += 1
        staged.append(packet)

    def send_keepalive(self, now: float, out: Out) -> None:
        if not self.staged:
            self.staged.append(b"")
        self.send_staged(now, out)

    def send_staged(self, now: float, out: Out) -> None:
        """Encrypt and send staged packets with the current session, or start a handshake."""
        keypair = self.current
        if keypair is None or not keypair.can_send(now):
            self.send_initiation(now, out, retry=False)
            return
        endpoint = self.endpoint
        if endpoint is None:
            self.device.counters[Drop.NO_ENDPOINT] += len(self.staged)
            self.staged.clear()
            return
        # Seal no further than the counter allows; what is left waits for a new session.
        staged = self.staged
        room = REJECT_AFTER_MESSAGES - keypair.send_counter
        if len(staged) <= room:
            packets = list(staged)
            staged.clear()
        else:
            packets = [staged.popleft() for _ in range(room)]
        datagrams = keypair.seal(packets, self.device.mtu)
        out.extend(zip(datagrams, repeat(endpoint)))
        self.tx_bytes += sum(map(len, datagrams))
        sent_data = any(packets)  # not only keepalives
        timers_ = self.timers
        if sent_data:
            timers_.data_sent(now)
            if self.unanswered_data_since is None:
                self.unanswered_data_since = now
        timers_.any_authenticated_traversal(now)
        timers_.any_authenticated_sent()
        self._keep_key_fresh_sending(now, out)

    def _keep_key_fresh_sending(self, now: float, out: Out) -> None:
        keypair = self.current
        if keypair is None:
            return
        if keypair.send_counter > REKEY_AFTER_MESSAGES or (
            keypair.initiator and now - keypair.created > REKEY_AFTER_TIME
        ):
            self.send_initiation(now, out, retry=False)

    def initiate_now(self, now: float, out: Out) -> None:
        """A handshake at once, past the once-per-REKEY_TIMEOUT limit (asked by the owner)."""
        self.last_sent_handshake = None
        self.send_initiation(now, out, retry=False)

    def send_initiation(self, now: float, out: Out, *, retry: bool) -> None:
        """Start (or retransmit) a handshake, at most once per REKEY_TIMEOUT."""
        if not retry:
            self.handshake_attempts = 0
        if self.last_sent_handshake is not None and now - self.last_sent_handshake < REKEY_TIMEOUT:
            return
        device = self.device
        if device.private_key is None or device.public_key is None:
            device.counters[Drop.NO_PRIVATE_KEY] += 1
            return
        self.last_sent_handshake = now
        static_static = self.static_static()
        if static_static is None:
            device.counters[Drop.BAD_PEER_KEY] += 1
            return
        index = device.register_handshake(self)
        message, state = create_initiation(
            device.private_key,
            device.public_key,
            self.public_key,
            index,
            device.rng(KEY_SIZE),
            tai64n.encode(now + device.wall_offset),
            static_static,
        )
        self.handshake = state
        self.cookies.add_macs(message, now)
        self.timers.any_authenticated_traversal(now)
        self.timers.any_authenticated_sent()
        if self._transmit(bytes(message), out):
            self._count_attempt(now)
        self.timers.handshake_initiated(now)

    def _count_attempt(self, now: float) -> None:
        assert self.endpoint is not None
        address = self.endpoint.address
        if address != self._attempts_address:
            self._attempts_address, self._attempts_on_address = address, 0
        self._attempts_on_address += 1
        self.attempts += 1
        self.last_attempt = now

    def facts(self) -> PeerFacts:
        endpoint = self.endpoint
        on_endpoint = (self._attempts_on_address
                       if endpoint is not None and endpoint.address == self._attempts_address
                       else 0)
        return PeerFacts(
            endpoint=endpoint, last_handshake=self.last_handshake, handshakes=self.handshakes,
            attempts=self.attempts, attempts_on_endpoint=on_endpoint,
            last_attempt=self.last_attempt, gave_up=self.gave_up_at,
            last_received=self.last_received, unanswered_data_since=self.unanswered_data_since,
            rx_bytes=self.rx_bytes, tx_bytes=self.tx_bytes, roamed=self.roamed)

    def set_endpoint(self, endpoint: Endpoint | None, *, mirror: bool = True) -> None:
        """Send to ``endpoint`` from now on; the plane too, unless it told us (``mirror``
        False: it roamed there itself)."""
        self.endpoint = endpoint
        plane = self.device.plane
        if plane is not None and mirror:
            mirror_endpoint(plane, self.plane_id, endpoint)

    def roam(self, source: Endpoint, *, mirror: bool = True) -> None:
        """An authenticated message came from ``source``: reply there from now on."""
        old = self.endpoint
        self.set_endpoint(source, mirror=mirror)
        if old is None or old.address != source.address:
            self.get_head = None
            self.device.peer_events += 1
            self.roamed = self.device.peer_events

    # Receiving ---------------------------------------------------------------------------

    def confirm_next(self, now: float, out: Out) -> None:
        """The first packet under ``next`` arrived: it becomes current (responder)."""
        self.device.discard_keypair(self.previous)
        self.previous = self.current
        self.current = self.next
        self.next = None
        self.device.mirror_roles(self)
        self.handshake_complete(now)
        if self.staged:
            self.send_staged(now, out)

    def received_transport(self, length: int, data: bool, now: float, out: Out) -> None:
        """Bookkeeping for one batch's authenticated, fresh transport messages: ``length``
        bytes in all; ``data``: not all of them were keepalives."""
        self._keep_key_fresh_receiving(now, out)
        timers_ = self.timers
        timers_.any_authenticated_traversal(now)
        self.authenticated_received(now)
        self.rx_bytes += length
        if data:
            timers_.data_received(now)

    def authenticated_received(self, now: float) -> None:
        """Any authenticated message came from the peer: it answered."""
        self.last_received = now
        self.unanswered_data_since = None
        self.timers.any_authenticated_received()

    def _keep_key_fresh_receiving(self, now: float, out: Out) -> None:
        if self.sent_last_minute_handshake:
            return
        keypair = self.current
        if (
            keypair is not None
            and keypair.initiator
            and now - keypair.created > REKEY_ON_RECEIVE_AGE
        ):
            self.sent_last_minute_handshake = True
            self.send_initiation(now, out, retry=False)

    def sync(self, record: PeerRecord, now: float, out: Out) -> None:
        """The plane thread's traffic since the last collect: its timer events at the times
        they happened, then the facts it moved, then its wish for a new handshake, which
        the rules here grant (once per REKEY_TIMEOUT, once near the key's end)."""
        timersync.replay(self.timers, record)
        _, _, received, data_sent, _, _, _, rx_bytes, tx_bytes, roamed, wants = record
        if received:
            heard = seconds(received)
            if self.last_received is None or heard > self.last_received:
                self.last_received = heard
            self.unanswered_data_since = None
        if data_sent and self.unanswered_data_since is None:
            self.unanswered_data_since = seconds(data_sent)
        self.rx_bytes += rx_bytes
        self.tx_bytes += tx_bytes
        if roamed is not None:
            self.roam(endpoint_of(*roamed), mirror=False)
        if wants & WANTS_SEND:
            self._keep_key_fresh_sending(now, out)
        if wants & WANTS_RECEIVE:
            self._keep_key_fresh_receiving(now, out)

    def handshake_complete(self, now: float) -> None:
        self.timers.handshake_complete()
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake = now
        self.handshakes += 1
        self.attempts = self._attempts_on_address = 0
        self.gave_up_at = None
        self.device.peer_events += 1

    def initiation_is_fresh(self, timestamp: bytes, now: float) -> bool:
        """Replay and flood rules for a responder: newer timestamp, >= 20 ms apart."""
        if not tai64n.after(timestamp, self.latest_timestamp):
            return False
        last = self.last_initiation_consumed
        return last is None or now - last >= HANDSHAKE_INITIATION_RATE

    def begin_session(self, keypair: AnyKeypair, now: float) -> None:
        """Install a new session: current for an initiator, next for a responder."""
        device = self.device
        if keypair.initiator:
            if self.next is not None:
                device.discard_keypair(self.previous)
                self.previous = self.next
                self.next = None
                device.discard_keypair(self.current)
            else:
                device.discard_keypair(self.previous)
                self.previous = self.current
            self.current = keypair
        else:
            device.discard_keypair(self.next)
            self.next = keypair
            device.discard_keypair(self.previous)
            self.previous = None
        device.mirror_roles(self)
        self.timers.session_derived(now)

    # Timers ------------------------------------------------------------------------------

    def tick(self, now: float, out: Out) -> None:
        """Run expired timers."""
        for name in self.timers.due(now):
            if name == timers.RETRANSMIT:
                self._retransmit(now, out)
            elif name == timers.SEND_KEEPALIVE:
                self.send_keepalive(now, out)
                self.timers.keepalive_sent(now)
            elif name == timers.NEW_HANDSHAKE:
                # Data went unanswered for KEEPALIVE + REKEY_TIMEOUT: the path may be gone,
                # which an owner judging the link wants to hear at once.
                self.device.peer_events += 1
                self._forget_source()
                self.send_initiation(now, out, retry=False)
            elif name == timers.ZERO_KEYS:
                self.zero_keys()
            elif name == timers.PERSISTENT_KEEPALIVE and self.timers.persistent_keepalive_interval:
                self.send_keepalive(now, out)
            elif name == timers.SEND_STAGED and self.staged:
                self.send_staged(now, out)

    def _retransmit(self, now: float, out: Out) -> None:
        if self.handshake_attempts > MAX_TIMER_HANDSHAKES:
            self.timers.gave_up(now)
            self.gave_up_at = now
            self.device.peer_events += 1
            self.device.counters[Drop.STAGED_DROPPED] += len(self.staged)
            self.staged.clear()
            return
        self.handshake_attempts += 1
        self._forget_source()
        self.send_initiation(now, out, retry=True)

    def _forget_source(self) -> None:
        """Send from any local address again. The plane forgets the source of the endpoint
        it has, which may be a roam the core has not heard of yet."""
        if self.endpoint is not None:
            self.set_endpoint(self.endpoint.without_source(), mirror=False)
            plane = self.device.plane
            if plane is not None:
                plane.clear_source(self.plane_id)

    def zero_keys(self) -> None:
        """Forget every session and handshake, and drop staged packets."""
        device = self.device
        for keypair in (self.previous, self.current, self.next):
            device.discard_keypair(keypair)
        self.previous = self.current = self.next = None
        device.mirror_roles(self)
        device.forget_handshake(self)
        self.device.counters[Drop.STAGED_DROPPED] += len(self.staged)
        self.staged.clear()
        self.timers.zero_key_material = None

    def static_static(self) -> bytes | None:
        """DH(our static, this peer's static), computed once per private key; None if
        the peer's key is a low-order point (no handshake can succeed)."""
        if self._static_static is None and self.device.private_key is not None:
            try:
                self._static_static = crypto.dh(self.device.private_key, self.public_key)
            except crypto.DHError:
                return None
        return self._static_static

    def expire_sessions(self) -> None:
        """After our private key changed: forget the handshake and what was derived from
        the old key; the next packet starts a new handshake at once."""
        self.device.forget_handshake(self)
        self._static_static = None
        self.last_sent_handshake = None
        for keypair in (self.current, self.next):
            if keypair is not None:
                keypair.expire_for_sending()

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()
