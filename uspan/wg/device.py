"""The WireGuard device: peers, the index table, cryptokey routing and counters (sans-IO).

Surface (all times are monotonic seconds passed in by the caller):

- ``apply(change, now) -> [(datagram, Endpoint)]``: configure atomically (UAPI ``set=1``,
  the mesh); raises ConfigError and then changes nothing. ``apply_steps`` is the same in
  slices, for a shell that must not stop everything else during a huge change.
- ``get_steps(parts)``: the reply to ``get=1``, rendered in slices.
- ``send(packets, now) -> [(datagram, Endpoint)]``: IP packets read from the TUN.
- ``receive(datagrams, now) -> ([ip packet for the TUN], [(datagram, Endpoint)])``:
  datagrams read from UDP, each as ``(bytes, Endpoint)`` with the sticky source filled in.
- ``tick(now) -> [(datagram, Endpoint)]``: fire due timers (a bounded number per call).
- ``next_deadline() -> float | None``: when ``tick`` may next have work (never later;
  O(1), so the shell can ask after every batch).
- ``forget_source(endpoint)``: the shell could not send from a sticky source address.
- ``admission.kernel_filter(now)``: what the shell's kernel filter should drop under a
  flood (``uspan.wg.admission``; the peers' endpoints, ``known_endpoints(now)``, pass).
- ``peer_facts() -> {public key: PeerFacts}``: what the mesh needs to know of each peer;
  ``peer_events`` grows when a handshake completes, attempts are given up, a peer
  roams, or data went unanswered long enough to rehandshake, so the shell can wake
  whoever waits for facts to change.
- ``counters``: drops by reason (``drops.Drop``; a ``collections.Counter``).
- With a C data plane (``Device(plane=...)``, ``uspan.wg.plane``): the core mirrors its
  peers, routes, endpoints and keypair roles into it, and learns of the thread's traffic
  from ``collect()``: ``sync(records, now)``, ``plane_events(events, now)`` and
  ``punted(punts, now)``, in that order, each returning datagrams to send.

``wall_offset`` turns monotonic into Unix time (``wall = now + wall_offset``); the shell
sets it, tests set it to anything. Nothing malformed raises out of ``receive`` or ``send``:
it is dropped and counted.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator

from uspan.wg import messages, transport_crypto, uapi
from uspan.wg.admission import MAX_TRUSTED, Admission, Verdict
from uspan.wg.allowedips import AllowedIPs
from uspan.wg.config import (
    ConfigError,
    DeviceChange,
    PeerChange,
    Prefix,
)
from uspan.wg.constants import (
    DEFAULT_MTU,
    INITIATION_SIZE,
    KEY_SIZE,
    MAC_SIZE,
    MAX_STAGED_PACKETS,
    MSG_COOKIE_REPLY,
    MSG_INITIATION,
    MSG_RESPONSE,
    REJECT_AFTER_TIME,
    RESPONSE_SIZE,
    UNDER_LOAD_AFTER,
    UNDER_LOAD_RATE,
    ZERO_KEY,
)
from uspan.wg.cookie import MAC2, CookieChecker
from uspan.wg.crypto import clamp, public_key
from uspan.wg.drops import Drop, ProtocolError
from uspan.wg.endpoint import Endpoint
from uspan.wg.facts import PeerFacts
from uspan.wg.handshake import (
    TransportKeys,
    consume_initiation,
    consume_response,
    create_response,
)
from uspan.wg.keypair import AnyKeypair, Keypair, PlaneKeypair
from uspan.wg.peer import Peer
from uspan.wg.plane import (
    NO_KEYPAIR,
    Event,
    EventKind,
    PeerRecord,
    Plane,
    Punt,
    PuntKind,
    endpoint_of,
)
from uspan.wg.timers import Jitter
from uspan.wg.verdict import Counts, Plan, lane_records

Out = list[tuple[bytes, Endpoint]]
Datagram = tuple[bytes, Endpoint]
_NO_MAC = bytes(MAC_SIZE)  # mac2 of a sender that holds no cookie
HAND_UP_PER_READ = 64
APPLY_STEP = 256  # allowed IPs per step of apply_steps
CHECK_STEP = 1 << 13  # allowed IPs per step of their type check (~0.2 ms)
INFO_STEP = 16  # peers per step of get_steps
LANE_IDLE = REJECT_AFTER_TIME  # a peer heard from more recently is alive for the lane
TICK_BUDGET = 8  # timer queue entries per tick
TICK_HANDSHAKES = 1  # initiations per tick (0.2-0.3 ms each): a loop pass stays under 1 ms
HANDSHAKE_RATE = 500  # initiations a second the timers start for peers without a session
HANDSHAKE_BURST = 32  # and how many they may start at once after a quiet spell
_TICKING = 0  # Peer.timer_seq while its own timers run: it queues its next deadline after
_WAITING = -2  # Peer.timer_seq while it waits in the handshake line
# A whole handshake of budget, give or take float rounding: the refill multiplies a
# difference of two clock readings (~1e5 s on trio's clock) by the rate.
_TOKEN = 1.0 - 1e-6

class Device:
    """A WireGuard interface's protocol state."""

    def __init__(self, rng: Callable[[int], bytes] = os.urandom, *,
                 plane: Plane | None = None) -> None:
        self.rng = rng
        self.plane = plane
        self._plane_peers: dict[int, Peer] = {}  # by plane id
        self._dropped: list[int] = []  # keypairs discarded, dropped from the plane once
        # their peer's roles no longer name them (mirror_roles)
        self.jitter = Jitter(rng)
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.mtu = DEFAULT_MTU
        self.wall_offset = 0.0
        self.peers: dict[bytes, Peer] = {}
        self.allowed_ips: AllowedIPs[Peer] = AllowedIPs()
        self.keypairs: dict[int, AnyKeypair] = {}
        self.handshakes: dict[int, Peer] = {}
        self.cookie_checker = CookieChecker(rng=rng)
        self.admission = Admission(known=self.known_endpoints)
        self._lane, self._lane_version = b"", -1  # the admission's lane, for reads in C
        self._calm_plan: Plan | None = None  # gate_plan's answer while not under load
        self.counters: Counter[Drop] = Counter()
        # Reads in C: how many (counted in ``gate_plan``), and what they did beside what
        # they returned (``gate_done``, told only of the reads that judged something).
        self.gate_totals = dict.fromkeys(("reads", "handed_up", "cookies", "dropped"), 0)
        self.under_load_rate = UNDER_LOAD_RATE  # handshake messages per second
        self._under_load_until = float("-inf")
        self._load_window_start = float("-inf")  # one-second windows of handshake counts
        self._load_count = 0
        # Peer timers: a heap of (deadline, sequence, public key); see schedule(). Keys,
        # not peers, so that its tuples hold no container the cycle collector must walk.
        self._timer_queue: list[tuple[float, int, bytes]] = []
        self._timer_count = 0
        self.timer_armed = self._timer_armed  # every peer's PeerTimers share this one
        # Due peers whose timers would start a handshake, waiting for the budget: see tick.
        self.handshake_rate = HANDSHAKE_RATE
        # Two first-come-first-served lines: peers heard from lately, then the others.
        self._heard_line: deque[Peer] = deque()
        self._silent_line: deque[Peer] = deque()
        self._tokens = float(HANDSHAKE_BURST)
        self._tokens_at = 0.0
        self._initiations = 0  # sent so far, whatever started them
        self.peer_events = 0  # see peer_facts

    @property
    def initiations_sent(self) -> int:
        """Handshake initiations made so far, whatever started them (for tracers)."""
        return self._initiations

    def known_endpoints(self, now: float) -> list[Endpoint]:
        """The admission's priority lane: the endpoints (configured or learned; not
        relayed ones, which never reach the socket) of MAX_TRUSTED peers. Those heard
        from within LANE_IDLE come first, in config order, not by recency: with more
        than MAX_TRUSTED of them every keepalive would change the lane, and each change
        rebuilds the kernel filter; then the others, most recently heard first."""
        alive = now - LANE_IDLE

        def rank(peer: Peer) -> tuple[bool, float]:
            heard = peer.last_received
            if heard is None:
                return (False, float("-inf"))
            return (True, 0.0) if heard >= alive else (False, heard)

        reachable = [peer for peer in self.peers.values()
                     if peer.endpoint is not None and not peer.endpoint.discard_only]
        best = heapq.nlargest(MAX_TRUSTED, reachable, key=rank)
        return [peer.endpoint for peer in best if peer.endpoint is not None]

    # Index table -------------------------------------------------------------------------

    def _new_index(self) -> int:
        while True:
            index = int.from_bytes(self.rng(4), "little")
            if index not in self.keypairs and index not in self.handshakes:
                return index

    def register_handshake(self, peer: Peer) -> int:
        """A fresh local index for ``peer``'s new handshake (the old one is forgotten)."""
        self.forget_handshake(peer)
        index = self._new_index()
        self.handshakes[index] = peer
        peer.handshake_index = index
        self._initiations += 1
        return index

    def forget_handshake(self, peer: Peer) -> None:
        if peer.handshake_index is not None:
            self.handshakes.pop(peer.handshake_index, None)
        peer.handshake_index = None
        peer.handshake = None

    def discard_keypair(self, keypair: AnyKeypair | None) -> None:
        """Forget a keypair; every caller then changes the roles (``mirror_roles``)."""
        if keypair is not None and self.keypairs.get(keypair.local_index) is keypair:
            del self.keypairs[keypair.local_index]
            if self.plane is not None:
                self._dropped.append(keypair.local_index)

    def mirror_roles(self, peer: Peer) -> None:
        """The plane's roles of ``peer`` become the core's, then the keypairs discarded
        meanwhile are dropped: the thread never finds a role empty between the two."""
        plane = self.plane
        if plane is None:
            return
        plane.assign(peer.plane_id, *[NO_KEYPAIR if keypair is None else keypair.local_index
                                      for keypair in (peer.previous, peer.current, peer.next)])
        for index in self._dropped:
            plane.drop(index)
        self._dropped.clear()

    def _new_keypair(self, keys: TransportKeys, *, initiator: bool, local_index: int,
                     remote_index: int, peer: Peer, now: float) -> AnyKeypair:
        """A handshake's session, in the plane if there is one, and in the index table."""
        keypair: AnyKeypair
        if self.plane is None:
            keypair = Keypair(keys, initiator=initiator, local_index=local_index,
                              remote_index=remote_index, peer=peer, now=now)
        else:
            keypair = PlaneKeypair(self.plane, keys, initiator=initiator,
                                   local_index=local_index, remote_index=remote_index,
                                   peer=peer, now=now)
        self.keypairs[local_index] = keypair
        return keypair

    # Configuration -----------------------------------------------------------------------

    def apply(self, change: DeviceChange, now: float) -> Out:
        """Apply a whole change, or raise ConfigError and change nothing."""
        out: Out = []
        for _ in self.apply_steps(change, now, out):
            pass
        if self.plane is not None:  # its routes carry traffic when this returns
            self.plane.sync_routes()
        return out

    def apply_steps(self, change: DeviceChange, now: float, out: Out) -> Iterator[None]:
        """``apply`` as a generator that yields after each peer and each APPLY_STEP allowed
        IPs, so a shell can run other work between slices of a huge change (it times them).

        The whole change is validated before anything changes (its first steps raise
        ConfigError, with nothing applied); after that nothing can fail. Between slices the
        device holds part of the change: the shell keeps other configuration requests out
        until the generator is exhausted. Datagrams to send go to ``out``.
        """
        yield from self._validate(change)
        if change.private_key is not None:
            self._set_private_key(change.private_key)
        if change.listen_port is not None:
            self.listen_port = change.listen_port
        if change.fwmark is not None:
            self.fwmark = change.fwmark
        if change.replace_peers:
            for peer in list(self.peers.values()):
                yield from self._remove_peer_steps(peer)
        for peer_change in change.peers:
            yield from self._apply_peer(peer_change, now, out)

    @staticmethod
    def _validate(change: DeviceChange) -> Iterator[None]:
        """Raise ConfigError if ``change`` is not valid; yields between checks of big lists."""
        if change.private_key is not None and len(change.private_key) != KEY_SIZE:
            raise ConfigError("private_key", f"must be {KEY_SIZE} bytes")
        if change.listen_port is not None and not 0 <= change.listen_port <= 65535:
            raise ConfigError("listen_port", f"{change.listen_port} is not in 0-65535")
        if change.fwmark is not None and not 0 <= change.fwmark < 1 << 32:
            raise ConfigError("fwmark", f"{change.fwmark} is not a 32-bit value")
        for peer in change.peers:
            if len(peer.public_key) != KEY_SIZE:
                raise ConfigError("public_key", f"must be {KEY_SIZE} bytes")
            if peer.preshared_key is not None and len(peer.preshared_key) != KEY_SIZE:
                raise ConfigError("preshared_key", f"must be {KEY_SIZE} bytes")
            keepalive = peer.persistent_keepalive
            if keepalive is not None and not 0 <= keepalive <= 65535:
                raise ConfigError(
                    "persistent_keepalive_interval", f"{keepalive} is not in 0-65535"
                )
            if peer.protocol_version not in (None, 1):
                raise ConfigError("protocol_version", f"{peer.protocol_version} is not 1")
            for name, prefixes in (("allowed_ips", peer.allowed_ips),
                                   ("remove_allowed_ips", peer.remove_allowed_ips)):
                # Else a bad one fails halfway through applying. The types in C, a step of
                # CHECK_STEP at a time: ~15 ms for a million prefixes (65,536 a step were
                # 1-2 ms, which a slice then overran).
                for start in range(0, len(prefixes) if isinstance(prefixes, list) else 1,
                                   CHECK_STEP):
                    if not (isinstance(prefixes, list)
                            and {*map(type, prefixes[start:start + CHECK_STEP])} <= {int}):
                        raise ConfigError(
                            name, "must be a list of prefixes (uspan.wg.prefix ints)")
                    yield

    def _set_private_key(self, key: bytes) -> None:
        if key == ZERO_KEY:
            private, public = None, None
        else:
            private = clamp(key)
            public = public_key(private)
        if private == self.private_key:
            return
        self.private_key, self.public_key = private, public
        self.cookie_checker.set_local_public(public)
        if public is not None and public in self.peers:
            self._remove_peer(self.peers[public])
        for peer in self.peers.values():
            peer.expire_sessions()

    def _apply_peer(self, change: PeerChange, now: float, out: Out) -> Iterator[None]:
        peer = self.peers.get(change.public_key)
        if change.remove:
            if peer is not None:
                yield from self._remove_peer_steps(peer)
            yield
            return
        if peer is None:
            if change.update_only or change.public_key == self.public_key:
                yield
                return
            peer = self._add_peer(change.public_key)
        # Its kept get text goes before anything changes: a change stopped between its
        # slices (cancelled, or a bug raised) leaves the next get to render what it holds.
        peer.get_head = None
        if change.preshared_key is not None:
            peer.preshared_key = change.preshared_key
        after = change.unless_roamed_after
        roamed = after is not None and peer.roamed > after
        if change.endpoint is not None and not roamed:
            peer.set_endpoint(change.endpoint)
        # Replacing inserts first and then removes only the old prefixes not kept, so one
        # routed before and after is routed to the peer between every slice.
        old = self.allowed_ips.prefixes(peer) if change.replace_allowed_ips else []
        kept: set[Prefix] = set()  # the new ones, if old ones go: made in steps too

        def insert(chunk: list[Prefix]) -> None:
            self._route(peer, chunk)
            if old:
                kept.update(chunk)

        yield from _steps(change.allowed_ips, insert)
        if old:
            yield from _steps(old, lambda chunk: self._unroute(
                peer, [prefix for prefix in chunk if prefix not in kept]))
        yield from _steps(change.remove_allowed_ips, lambda chunk: self._unroute(peer, chunk))
        if change.persistent_keepalive is not None:
            peer.set_persistent_keepalive(change.persistent_keepalive, now)
        if change.handshake and not roamed:
            peer.initiate_now(now, out)
        # Last, so nothing the steps changed is missing: rendered here, the text costs a
        # set ~5 us a peer, and the get that follows a set of 20,000 peers ~100 ms less.
        self._render_get_lines(peer)
        yield

    def _add_peer(self, public_key: bytes) -> Peer:
        peer = self.peers[public_key] = Peer(self, public_key)
        if self.plane is not None:
            peer.plane_id = self.plane.add_peer()
            self._plane_peers[peer.plane_id] = peer
        return peer

    def _route(self, peer: Peer, prefixes: list[Prefix]) -> None:
        """Route ``prefixes`` to ``peer`` (taken over from any other), in the plane too."""
        self.allowed_ips.insert(prefixes, peer)
        if self.plane is not None:
            self.plane.add_routes(peer.plane_id, prefixes)

    def _unroute(self, peer: Peer, prefixes: list[Prefix]) -> None:
        """Remove those of ``prefixes`` that ``peer`` owns, in the plane too."""
        self.allowed_ips.remove(prefixes, peer)
        if self.plane is not None:
            self.plane.remove_routes(peer.plane_id, prefixes)

    def _remove_peer_steps(self, peer: Peer) -> Iterator[None]:
        """``_remove_peer`` with its allowed IPs removed a step at a time first."""
        allowed = self.allowed_ips
        while True:
            removed = allowed.remove_oldest(peer, APPLY_STEP)
            if self.plane is not None:
                self.plane.remove_routes(peer.plane_id, removed)
            if not allowed.owns(peer):
                break
            yield
        self._remove_peer(peer)
        yield

    def _remove_peer(self, peer: Peer) -> None:
        peer.zero_keys()
        peer.timers.stop_all()
        peer.timer_seq = -1  # its queue entry is stale now: pruned with the superseded ones
        self.allowed_ips.remove_value(peer)
        del self.peers[peer.public_key]
        if self.plane is not None:  # its routes, endpoint and keypairs go with it
            self.plane.remove_peer(peer.plane_id)
            del self._plane_peers[peer.plane_id]

    def get_steps(self, parts: uapi.GetParts) -> Iterator[None]:
        """The reply to ``get=1`` appended to ``parts`` (``uapi.get_pieces`` sends them),
        yielding after every INFO_STEP peers, for a shell to run between other work
        (keeping configurations out until it is done, as for ``apply_steps``).

        A peer's lines that only a set or a roam changes are rendered by the set and kept
        (``Peer.get_head``: again after a roam, or once its allowed IPs' stamp changed,
        as when another peer took one over), and its counters rendered at each get:
        20,000 peers rendered whole took ~150 ms of CPU a get, most of it the same text
        again. A peer of many allowed IPs gives them as a snapshot rendered as it is
        sent (``allowedips.PrefixTexts``)."""
        wall_offset, allowed = self.wall_offset, self.allowed_ips
        stamp, counter_lines = allowed.stamp, uapi.counter_lines
        parts.append(uapi.device_lines(self.private_key, self.listen_port, self.fwmark))
        text: list[bytes] = []
        every = list(self.peers.values())
        for start in range(0, len(every), INFO_STEP):
            for peer in every[start:start + INFO_STEP]:
                head = peer.get_head
                if head is None or peer.get_stamp != stamp(peer):
                    head = self._render_get_lines(peer)
                last = peer.last_handshake
                text += (head, counter_lines(None if last is None else last + wall_offset,
                                             peer.tx_bytes, peer.rx_bytes), peer.get_tail)
                if peer.get_many:
                    parts += (b"".join(text), allowed.text_snapshot(peer))
                    text.clear()
            parts.append(b"".join(text))  # a step's text as one part: few to free
            text.clear()
            yield

    def _render_get_lines(self, peer: Peer) -> bytes:
        """Render and keep what ``get_steps`` keeps of a peer (``Peer.get_head`` and the
        rest); return its head."""
        allowed = self.allowed_ips
        few = allowed.few_texts(peer)
        peer.get_head, peer.get_tail = uapi.peer_lines(
            peer.public_key, peer.preshared_key, peer.endpoint, peer.persistent_keepalive,
            few or ())
        peer.get_stamp, peer.get_many = allowed.stamp(peer), few is None
        return peer.get_head

    def peer_facts(self) -> dict[bytes, PeerFacts]:
        """Each peer's handshake, attempt, byte and endpoint facts (O(peers))."""
        return {key: peer.facts() for key, peer in self.peers.items()}

    # Data path: TUN -> network -----------------------------------------------------------

    def send(self, packets: Iterable[bytes], now: float) -> Out:
        """Encrypt IP packets from the TUN to the peers cryptokey routing picks.

        Routed a run of consecutive packets to one destination at a time
        (``transport_crypto.inner_runs``): a batch is mostly one flow, and the Python here
        runs per run, not per packet."""
        out: Out = []
        lookup = self.allowed_ips.lookup
        counters = self.counters
        touched: dict[Peer, None] = {}  # peers with new packets, in order of first packet
        if type(packets) is not list:  # inner_runs takes an exact list (not a subclass)
            packets = list(packets)
        end = 0
        for destination, count in transport_crypto.inner_runs(packets):
            start, end = end, end + count
            if not destination:
                counters[Drop.BAD_INNER_PACKET] += count
                continue
            peer = lookup(destination)
            if peer is None:
                counters[Drop.NO_ROUTE] += count
                continue
            staged = peer.staged
            room = MAX_STAGED_PACKETS - len(staged)
            if count <= room:
                staged.extend(packets[start:end])  # Peer.stage without the call
            else:
                staged.extend(packets[start:start + room])
                for packet in packets[start + room:end]:
                    peer.stage(packet, now, out)
            touched[peer] = None
        for peer in touched:
            peer.send_staged(now, out)
        self.admission.sent += len(out)
        return out

    # Data path: network -> TUN -----------------------------------------------------------

    def receive(self, datagrams: Iterable[Datagram], now: float) -> tuple[list[bytes], Out]:
        """Handle datagrams from UDP: decrypted packets for the TUN, and replies.

        Transport messages are handled inline (the hot path), in runs of consecutive
        messages to one receiver index: a batch is mostly one session from one endpoint
        carrying one inner source. Each run's keypair is looked up when the run comes up,
        the run is opened at once (one call to the batch AEAD) and checked in order
        (``_receive_run``); one pass in C sorts the batch into runs
        (``transport_crypto.transport_runs``). A run keeps its keypair even if one of its
        messages confirmed a session that discarded it.
        """
        to_tun: list[bytes] = []
        out: Out = []
        received: dict[Peer, list[int]] = {}  # per peer: [bytes, data messages] this batch
        counters = self.counters
        if type(datagrams) is not list:  # transport_runs takes an exact list
            datagrams = list(datagrams)
        runs, handshakes, bad_length, bad_type = transport_crypto.transport_runs(datagrams)
        if bad_length:
            counters[Drop.BAD_LENGTH] += bad_length
        if bad_type:
            counters[Drop.BAD_TYPE] += bad_type
        for run in runs:
            self._receive_run(*run, now, received, to_tun, out)
        for peer, (length, data_messages) in received.items():
            peer.received_transport(length, data_messages > 0, now, out)
        if handshakes:
            self._count_handshakes(len(handshakes), now)
            for data, source in handshakes:
                self._receive_handshake(data, source, now, out)
        return to_tun, out

    def _count_handshakes(self, count: int, now: float) -> None:
        """Handshake messages received: too many in a second put the device under load."""
        if now - self._load_window_start >= 1.0:
            self._load_window_start, self._load_count = now, 0
        self._load_count += count
        if self._load_count >= self.under_load_rate:
            self._under_load_until = now + UNDER_LOAD_AFTER

    def gate_plan(self, now: float) -> Plan | None:
        """What a read in C (``uspan.daemon.gate``) may do now; None without a key (the
        shell then reads as before and ``receive`` judges every datagram). Under load,
        the unproven initiations it hands up are at most HAND_UP_PER_READ (each costs
        ``receive`` a Python judgement: a read's worth must not hold the loop)."""
        keys = self.cookie_checker.keys()
        if keys is None or self.private_key is None:
            return None
        self.gate_totals["reads"] += 1  # here: gate_done is told only of reads that judged
        admission = self.admission
        if now >= self._under_load_until and now >= admission.busy_until:
            plan = self._calm_plan  # the same every read until the key changes
            if plan is None or plan.mac1_key is not keys[0] or plan.cookie_key is not keys[1]:
                plan = self._calm_plan = Plan(*keys, secret=None, under_load=False,
                                              hand_up=0, cookies=0)
            return plan
        hand_up, cookies = admission.plan(now)
        if admission.flag_version != self._lane_version:  # the lane changes with it
            self._lane_version = admission.flag_version
            self._lane = lane_records(e.source_key() for e in admission.lane())
        return Plan(*keys, secret=self.cookie_checker.fresh_secret(now), under_load=True,
                    hand_up=min(hand_up, HAND_UP_PER_READ), cookies=cookies, lane=self._lane)

    def gate_done(self, counts: Counts, now: float) -> None:
        """Count what a read in C judged and did not hand up (its handshake messages
        count towards the load as ``receive``'s do)."""
        counters = self.counters
        totals = self.gate_totals
        totals["handed_up"] += counts.handed_up
        totals["cookies"] += counts.cookies
        totals["dropped"] += counts.dropped
        counters[Drop.BAD_MAC1] += counts.bad_mac1
        counters[Drop.COOKIE_SENT] += counts.cookies
        counters[Drop.COOKIE_LIMITED] += counts.dropped
        self.admission.planned(counts.cookies, counts.dropped)
        judged = counts.bad_mac1 + counts.cookies + counts.dropped + counts.overflowed
        if judged:
            self._count_handshakes(judged, now)

    def _receive_run(self, index: int, messages_: list[bytes], sources: list[Endpoint],
                     first: int, in_order: bool, now: float, received: dict[Peer, list[int]],
                     to_tun: list[bytes], out: Out) -> None:
        """``receive`` for consecutive transport messages to ``index`` (from ``sources``,
        counters from ``first``; ``in_order``: consecutive, from one source): open them at
        once, then authenticity, replay and roaming, then the inner packets. In-order
        messages of one endpoint, the common case, pass at once; any other run is checked
        message by message."""
        counters = self.counters
        keypair = self.keypairs.get(index)
        if keypair is None:
            counters[Drop.UNKNOWN_INDEX] += len(messages_)
            return
        if not keypair.can_receive(now):
            counters[Drop.EXPIRED_KEY] += len(messages_)
            return
        plaintexts = keypair.open(messages_)
        peer, last = keypair.peer, sources[-1]
        if (in_order and None not in plaintexts and keypair is not peer.next
                and keypair.replay.accept_run(first, len(messages_))):
            if last is not peer.endpoint and last != peer.endpoint:
                peer.roam(last)
            accepted: list[bytes] = plaintexts  # type: ignore[assignment]  # no None in it
            length = sum(map(len, messages_))
        else:
            numbers = [int.from_bytes(data[8:16], "little") for data in messages_]
            accepted, length = self._accept_each(
                keypair, messages_, sources, numbers, plaintexts, now, out)
        if not accepted:
            return
        self.admission.others += len(accepted)  # authentic and fresh: junk moves no budget
        tally = received.get(peer)
        if tally is None:
            tally = received[peer] = [0, 0]
        tally[0] += length
        if b"" in accepted:
            accepted = [plaintext for plaintext in accepted if plaintext]  # keepalives
            if not accepted:
                return
        tally[1] += len(accepted)
        self._deliver(peer, accepted, to_tun)

    def _accept_each(self, keypair: AnyKeypair, messages_: list[bytes], sources: list[Endpoint],
                     numbers: list[int], plaintexts: list[bytes | None], now: float,
                     out: Out) -> tuple[list[bytes], int]:
        """The authentic, fresh plaintexts of a run and their messages' bytes, one by one:
        a new source roams the peer, the first message of ``next`` confirms it."""
        counters = self.counters
        accept, peer = keypair.replay.accept, keypair.peer
        accepted: list[bytes] = []
        length = 0
        for data, source, counter, plaintext in zip(
                messages_, sources, numbers, plaintexts, strict=True):
            if plaintext is None:
                counters[Drop.DECRYPT_FAILED] += 1
                continue
            if not accept(counter):
                counters[Drop.REPLAY] += 1
                continue
            if source is not peer.endpoint and source != peer.endpoint:
                peer.roam(source)
            if keypair is peer.next:
                peer.confirm_next(now, out)  # discards `previous`, never the keypair in hand
            accepted.append(plaintext)
            length += len(data)
        return accepted, length

    def _deliver(self, peer: Peer, plaintexts: list[bytes], to_tun: list[bytes]) -> None:
        """The IP packets in ``peer``'s plaintexts (no keepalives) to the TUN, padding
        stripped, if the inner source is one of its allowed IPs."""
        counters, lookup = self.counters, self.allowed_ips.lookup
        stripped = transport_crypto.strip(plaintexts)
        if stripped is not None:  # all well formed, one inner source
            packets, source = stripped
            if lookup(source) is peer:
                to_tun.extend(packets)
            else:
                counters[Drop.NOT_ALLOWED_SOURCE] += len(packets)
            return
        last_source, owner = b"", None  # mostly one inner source
        for plaintext in plaintexts:
            size = len(plaintext)
            version = plaintext[0] >> 4
            if version == 4 and size >= 20:
                total = (plaintext[2] << 8) | plaintext[3]
                inner, minimum = plaintext[12:16], 20
            elif version == 6 and size >= 40:
                total = 40 + ((plaintext[4] << 8) | plaintext[5])
                inner, minimum = plaintext[8:24], 40
            else:
                counters[Drop.BAD_INNER_PACKET] += 1
                continue
            if total > size or total < minimum:
                counters[Drop.BAD_INNER_PACKET] += 1
                continue
            if inner != last_source:
                last_source, owner = inner, lookup(inner)
            if owner is not peer:
                counters[Drop.NOT_ALLOWED_SOURCE] += 1
                continue
            to_tun.append(plaintext if total == size else plaintext[:total])

    def _receive_handshake(self, data: bytes, source: Endpoint, now: float, out: Out) -> None:
        counters = self.counters
        kind = data[0]
        if kind == MSG_COOKIE_REPLY:
            self._receive_cookie_reply(data, now)
            return
        if len(data) != (INITIATION_SIZE if kind == MSG_INITIATION else RESPONSE_SIZE):
            counters[Drop.BAD_LENGTH] += 1
            return
        if self.private_key is None or self.public_key is None:
            counters[Drop.NO_PRIVATE_KEY] += 1
            return
        if not self.cookie_checker.check_mac1(data):
            counters[Drop.BAD_MAC1] += 1
            return
        admission = self.admission
        if now < self._under_load_until or now < admission.busy_until:
            if kind == MSG_RESPONSE:  # only to our own initiation: see uspan.wg.admission
                if int.from_bytes(data[8:12], "little") not in self.handshakes:
                    counters[Drop.UNKNOWN_INDEX] += 1
                    admission.stray(source, now)
                    return
            elif data[MAC2] != _NO_MAC and self.cookie_checker.check_mac2(
                    data, source.source_key(), now):
                if not admission.proven_allowed(source.ip_key(), now):
                    counters[Drop.RATELIMITED] += 1
                    return
            else:
                verdict = admission.unproven(source, now)
                if verdict is Verdict.DROP:
                    counters[admission.drop] += 1
                    return
                if verdict is Verdict.COOKIE:
                    sender = int.from_bytes(data[4:8], "little")
                    reply = self.cookie_checker.create_reply(
                        data, sender, source.source_key(), now)
                    out.append((reply, source))
                    counters[Drop.COOKIE_SENT] += 1
                    return
        if kind == MSG_INITIATION:
            self._receive_initiation(data, source, now, out)
        else:
            self._receive_response(data, source, now, out)

    def _receive_initiation(self, data: bytes, source: Endpoint, now: float, out: Out) -> None:
        assert self.private_key is not None and self.public_key is not None
        try:
            consumed = consume_initiation(
                self.private_key, self.public_key, messages.parse_initiation(data),
                self._static_static,
            )
        except ProtocolError as exc:
            self.counters[exc.drop] += 1
            return
        peer = self.peers[consumed.remote_static]
        if not peer.initiation_is_fresh(consumed.timestamp, now):
            self.counters[Drop.STALE_INITIATION] += 1
            return
        peer.latest_timestamp = consumed.timestamp
        peer.last_initiation_consumed = now
        peer.roam(source)
        peer.rx_bytes += len(data)
        peer.timers.any_authenticated_traversal(now)
        peer.authenticated_received(now)
        # Respond: a new session that waits as ``next`` until the initiator confirms it.
        self.forget_handshake(peer)
        index = self._new_index()
        try:
            response, keys = create_response(
                consumed, peer.preshared_key, index, self.rng(KEY_SIZE)
            )
        except ProtocolError:
            self.counters[Drop.HANDSHAKE_FAILED] += 1
            return
        keypair = self._new_keypair(
            keys, initiator=False, local_index=index, remote_index=consumed.sender,
            peer=peer, now=now,
        )
        peer.begin_session(keypair, now)
        peer.cookies.add_macs(response, now)
        peer.timers.any_authenticated_traversal(now)
        peer.timers.any_authenticated_sent()
        out.append((bytes(response), source))
        peer.tx_bytes += len(response)
        peer.last_sent_handshake = now  # no initiation of our own for REKEY_TIMEOUT

    def _static_static(self, remote_static: bytes) -> bytes | None:
        """The kept DH with a peer's static key, or None if it is not a peer."""
        peer = self.peers.get(remote_static)
        return None if peer is None else peer.static_static()

    def _receive_response(self, data: bytes, source: Endpoint, now: float, out: Out) -> None:
        response = messages.parse_response(data)
        peer = self.handshakes.get(response.receiver)
        if peer is None or peer.handshake is None:
            self.counters[Drop.UNKNOWN_INDEX] += 1
            return
        try:
            keys = consume_response(peer.handshake, peer.preshared_key, response)
        except ProtocolError:
            self.counters[Drop.HANDSHAKE_FAILED] += 1
            return
        index = response.receiver
        del self.handshakes[index]
        peer.handshake = None
        peer.handshake_index = None
        keypair = self._new_keypair(
            keys, initiator=True, local_index=index, remote_index=response.sender,
            peer=peer, now=now,
        )
        peer.begin_session(keypair, now)
        peer.roam(source)
        peer.handshake_complete(now)
        peer.rx_bytes += len(data)
        peer.timers.any_authenticated_traversal(now)
        peer.authenticated_received(now)
        peer.send_keepalive(now, out)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        try:
            reply = messages.parse_cookie_reply(data)
        except ProtocolError:
            self.counters[Drop.BAD_LENGTH] += 1
            return
        peer = self.handshakes.get(reply.receiver)
        if peer is None:
            keypair = self.keypairs.get(reply.receiver)
            peer = keypair.peer if keypair is not None else None
        if peer is None:
            self.counters[Drop.UNKNOWN_INDEX] += 1
            return
        if not peer.cookies.consume_reply(reply, now):
            self.counters[Drop.BAD_COOKIE_REPLY] += 1

    # The plane's news (docs/dataplane.md) ------------------------------------------------

    def sync(self, records: Iterable[PeerRecord], now: float) -> Out:
        """The thread's traffic since the last collect, peer by peer (``Peer.sync``): the
        shell syncs before every ``tick`` and before ``get`` or ``peer_facts``, so the
        timers and facts are the packets' own by then. A removed peer's record is stale."""
        out: Out = []
        peers = self._plane_peers
        for record in records:
            peer = peers.get(record[0])
            if peer is not None:
                peer.sync(record, now, out)
        return out

    def plane_events(self, events: Iterable[Event], now: float) -> Out:
        """What the thread decided itself. CONFIRMED: it rotated ``next`` to current on
        the first packet under it, as ``Peer.confirm_next`` does, which then does the
        bookkeeping (the handshake is complete, staged packets go). An event about a
        keypair the core has replaced since is stale: the roles already say otherwise."""
        out: Out = []
        for kind, peer_id, local_index in events:
            peer = self._plane_peers.get(peer_id)
            if (kind == EventKind.CONFIRMED and peer is not None and peer.next is not None
                    and peer.next.local_index == local_index):
                peer.confirm_next(now, out)
        return out

    def punted(self, punts: Iterable[Punt], now: float) -> Out:
        """What the thread handed up. TUN: an IP packet for a peer without a usable
        session, staged as ``send`` stages it (its handshake starts); UDP: a handshake
        message, through ``receive`` (the shell's demux took its own first); EGRESS: a
        datagram the thread sealed for a relayed peer, for the owner's relay hook.
        Staged packets go after the handshake messages of the same collect, which may
        have completed their session."""
        out: Out = []
        touched: dict[Peer, None] = {}
        datagrams: list[Datagram] = []
        peers = self._plane_peers
        for kind, peer_id, data, source in punts:
            if kind == PuntKind.UDP:
                if source is not None:
                    datagrams.append((data, endpoint_of(*source[:4])))
                continue
            peer = None if peer_id is None else peers.get(peer_id)
            if peer is None:
                self.counters[Drop.NO_ROUTE] += 1  # removed since it was routed
            elif kind == PuntKind.TUN:
                peer.stage(data, now, out)
                touched[peer] = None
            elif peer.endpoint is None:  # EGRESS, and the endpoint is gone since
                self.counters[Drop.NO_ENDPOINT] += 1
            else:
                out.append((data, peer.endpoint))
        if datagrams:
            _, replies = self.receive(datagrams, now)  # no transport: nothing for the TUN
            out += replies
        for peer in touched:
            peer.send_staged(now, out)
        return out

    # Timers ------------------------------------------------------------------------------

    def tick(self, now: float) -> Out:
        """Fire expired peer timers, at most TICK_BUDGET peers and TICK_HANDSHAKES
        initiations from the lines per call: with thousands of peers due at once,
        ``next_deadline()`` then stays in the past and the shell calls again after
        letting other work run (a pass of 8 initiations took 2-30 ms on a busy machine:
        tunnel pings waited; one of 2 still put ~0.5 ms into each loop pass of a mesh
        set's 1,000 first handshakes). A pass that has started its initiation still runs
        the timers of peers with a session; due ones without go to the line.

        Handshakes are what costs (0.1-0.3 ms each; 20,000 silent peers retrying every
        5 s would want more than a core), so the timers start at most ``handshake_rate``
        a second on average: a due peer without a usable session waits in a line, first
        come first served, those heard from lately before the others, until the budget
        allows. Peers with a session never wait, so established tunnels keep their
        keepalives and rekeys on time (what their timers send is still taken from the
        budget, down to one burst of debt); the data path sends its own initiations at
        once and outside the budget."""
        out: Out = []
        queue, peers = self._timer_queue, self.peers
        heard_line, silent_line = self._heard_line, self._silent_line
        self._refill(now)
        budget = TICK_BUDGET
        enough = self._initiations + TICK_HANDSHAKES
        while (budget and self._initiations < enough and (heard_line or silent_line)
               and self._tokens >= _TOKEN):
            waited = (heard_line or silent_line).popleft()
            if waited.timer_seq == _WAITING and peers.get(waited.public_key) is waited:
                self._tick_peer(waited, now, out)
                budget -= 1
        while budget and queue and queue[0][0] <= now:
            _, seq, key = heapq.heappop(queue)
            peer = peers.get(key)
            if peer is None or peer.timer_seq != seq:
                continue  # superseded by an earlier deadline, or the peer was removed
            budget -= 1
            keypair = peer.current
            if (self._tokens < _TOKEN or heard_line or silent_line
                    or self._initiations >= enough) and (
                    keypair is None or not keypair.can_send(now)):
                # Whatever it arms meanwhile (it answered, its own packets started a
                # handshake) is queued as usual and takes it out of the line.
                peer.timer_seq, peer.timer_at = _WAITING, float("inf")
                heard = peer.last_received
                if heard is not None and now - heard < LANE_IDLE:
                    heard_line.append(peer)
                else:
                    silent_line.append(peer)
                continue
            self._tick_peer(peer, now, out)
        return out

    def _refill(self, now: float) -> None:
        elapsed = now - self._tokens_at
        if elapsed > 0:
            self._tokens = min(float(HANDSHAKE_BURST), self._tokens + elapsed * self.handshake_rate)
            self._tokens_at = now

    def _tick_peer(self, peer: Peer, now: float, out: Out) -> None:
        """Run a peer's due timers, then queue its earliest deadline once: what they arm
        meanwhile is not queued (one entry per pass, not one per timer armed)."""
        peer.timer_seq, peer.timer_at = _TICKING, float("-inf")
        sent = self._initiations
        peer.tick(now, out)
        spent = self._initiations - sent
        if spent:
            self._tokens = max(self._tokens - spent, -float(HANDSHAKE_BURST))
        peer.timer_seq = -1
        deadline = peer.next_deadline()
        if deadline is not None:
            self.schedule(peer, deadline)

    def _timer_armed(self, key: bytes, deadline: float) -> None:
        """A peer's timers armed ``deadline`` (a removed peer's: nothing to do)."""
        peer = self.peers.get(key)
        if peer is not None:
            self.schedule(peer, deadline)

    def schedule(self, peer: Peer, deadline: float) -> None:
        """A peer armed a timer. Each peer has one live queue entry, for its earliest
        deadline as far as the queue knows; a deadline that moved later is found when
        that entry comes due, so rearming a timer on every packet costs nothing here."""
        if peer.timer_seq == _WAITING:
            # It leaves the line with this entry: its timers that were due while it
            # waited must not wait for the new, later deadline.
            due = peer.next_deadline()
            if due is not None and due < deadline:
                deadline = due
        elif peer.timer_seq != -1 and peer.timer_at <= deadline:
            return
        self._timer_count += 1
        peer.timer_seq, peer.timer_at = self._timer_count, deadline
        queue = self._timer_queue
        heapq.heappush(queue, (deadline, self._timer_count, peer.public_key))
        if len(queue) > 2 * len(self.peers) + 64:  # superseded entries pile up: drop them
            peers = self.peers
            queue[:] = [entry for entry in queue
                        if (owner := peers.get(entry[2])) is not None
                        and owner.timer_seq == entry[1]]
            heapq.heapify(queue)

    def next_deadline(self) -> float | None:
        """The earliest queued deadline, or when the handshake budget lets the line move
        (never later than the real next one; O(1))."""
        queue = self._timer_queue
        first = queue[0][0] if queue else None
        if self._heard_line or self._silent_line:
            ready = self._tokens_at + max(0.0, 1.0 - self._tokens) / self.handshake_rate
            if first is None or ready < first:
                return ready
        return first

    def forget_source(self, endpoint: Endpoint) -> None:
        """Sending from ``endpoint.local`` failed: fall back to the routing table's choice."""
        for peer in self.peers.values():
            if peer.endpoint == endpoint:
                peer.set_endpoint(endpoint.without_source())


def _steps(prefixes: list[Prefix], action: Callable[[list[Prefix]], object]) -> Iterator[None]:
    """``action`` on the prefixes, APPLY_STEP at a time, yielding after each."""
    for start in range(0, len(prefixes), APPLY_STEP):
        action(prefixes[start:start + APPLY_STEP])
        yield
