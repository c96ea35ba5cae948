"""The peer controller: affiliates and link facts in, device changes and resources out.

One pure object ties the mesh modules together, so the node shell only moves facts in and
carries out what comes back. Every call returns an ``Output``: the ``DeviceChange`` to
apply to the core (empty when nothing changed), warnings and state transitions to log,
observed endpoints to report to discovery, the prefixes to route into the mesh, and the
deadline at which to call ``tick`` even if nothing else happens. Resources for ``uspan
get`` are kept up to date in the ``Store`` as a side effect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from uspan.mesh.affiliate import Affiliate, Network
from uspan.mesh.config import NodeConfig
from uspan.mesh.cycling import ObservedEndpoint, cycle, observed_endpoints
from uspan.mesh.peerspec import AppliedPeer, PeerSpec, build_peer_specs, plan_device_change
from uspan.mesh.punch import Puncher, PunchRequest, PunchStep
from uspan.mesh.resources import (
    AFFILIATE,
    KUBESPAN_ENDPOINT,
    KUBESPAN_PEER_SPEC,
    KUBESPAN_PEER_STATUS,
    MEMBER,
    Store,
    affiliate_spec,
    endpoint_spec,
    member_spec,
    peer_spec_spec,
    peer_status_spec,
)
from uspan.mesh.routing import routed_prefixes
from uspan.mesh.status import (
    ATTEMPT_TIMEOUT,
    LinkFacts,
    PeerState,
    PeerStatus,
    next_deadline,
    probe_time,
    update_status,
)
from uspan.relay.addressing import RelayAddresses, is_relayed, pseudo_endpoint
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.constants import REKEY_TIMEOUT
from uspan.wg.endpoint import Endpoint

DIRECT_RETRY = 30.0  # seconds between looks for a direct path to a peer on the relay


@dataclass(frozen=True, slots=True)
class Transition:
    """A peer changed state: log it."""

    peer_id: str
    label: str
    old: PeerState
    new: PeerState
    endpoint: Endpoint | None


@dataclass(frozen=True, slots=True)
class Output:
    device_change: DeviceChange  # apply when ``device_change.peers`` is not empty
    warnings: list[str]
    transitions: list[Transition]
    observed: list[ObservedEndpoint]  # report each under its affiliate ID
    routes: tuple[Network, ...]  # the full set to route into the mesh
    deadline: float | None  # call ``tick`` then
    republish: bool = False  # our affiliate changed (punch requests): publish it
    punched: list[tuple[str, Endpoint]] = field(default_factory=list)  # (label, at): log
    # (a peer that is up for us gets its handshake where it is, not ``at``)


class PeerController:
    """The mesh's state between calls; every method takes ``now`` (monotonic)."""

    def __init__(self, node_id: str, public_key: bytes, config: NodeConfig, store: Store,
                 puncher: Puncher | None = None) -> None:
        self.node_id = node_id
        self.public_key = public_key
        self.config = config
        self.store = store
        self.affiliates: list[Affiliate] = []
        self.observed: dict[str, tuple[Endpoint, ...]] = {}
        self.specs: list[PeerSpec] = []
        self.statuses: dict[bytes, PeerStatus] = {}
        self.facts: dict[bytes, LinkFacts] = {}
        self.applied: dict[bytes, AppliedPeer] = {}
        self.probed: dict[bytes, float] = {}  # when we last asked a silent peer to answer
        self.relay_addresses = RelayAddresses(config.cluster.secret_bytes, config.cluster.id)
        self.sought: dict[bytes, float] = {}  # relayed peers: when to look for a direct path
        self.puncher = Puncher() if puncher is None else puncher
        self.reflexive: tuple[Endpoint, ...] = ()  # where discovery sees us (our NAT)

    def device_replaced(self) -> None:
        """The WireGuard device was created anew (config change, restart of the link): it
        holds no peer, so nothing counts as applied and what we knew of links is void."""
        self.applied, self.facts, self.statuses = {}, {}, {}
        self.probed, self.sought = {}, {}

    def set_affiliates(
        self,
        affiliates: Iterable[Affiliate],
        observed: Mapping[str, Sequence[Endpoint]],
        now: float,
    ) -> Output:
        """Discovery's view changed: every affiliate (ours too) and endpoints seen per ID."""
        self.affiliates = list(affiliates)
        self.observed = {key: tuple(value) for key, value in observed.items()}
        store = self.store
        store.replace_all(AFFILIATE, {a.node_id: affiliate_spec(a) for a in self.affiliates}, now)
        members = {(a.nodename or a.node_id): member_spec(a) for a in self.affiliates}
        store.replace_all(MEMBER, members, now)
        return self._reconcile(now, self._rebuild_specs())

    def set_facts(self, facts: Mapping[bytes, LinkFacts], now: float) -> Output:
        """New facts from the core, per peer public key (after a handshake, on a read...)."""
        self.facts.update(facts)
        return self._reconcile(now, [])

    def set_reflexive(self, endpoints: Sequence[Endpoint], now: float) -> Output:
        """Our reflexive endpoints changed (``uspan.mesh.reflexive``): those that are not
        our own addresses, the mappings of a NAT in front of us (none: no punching)."""
        self.reflexive = tuple(endpoints)
        return self._reconcile(now, [])

    def endpoint_kept(self, key: bytes, pushed: Endpoint, kept: Endpoint) -> None:
        """The device kept ``kept`` for a peer instead of ``pushed``: the peer roamed
        there after we decided (``PeerChange.unless_roamed_after``). Unless another
        endpoint was pushed since, where it really is becomes the endpoint pushed and
        last used: cycling goes on from there, and ``pushed`` picked again is pushed
        again rather than taken for applied."""
        applied = self.applied.get(key)
        if applied is None or applied.endpoint != pushed.without_source():
            return
        kept = kept.without_source()
        self.applied[key] = replace(applied, endpoint=kept)
        status = self.statuses.get(key)
        if status is not None:
            self.statuses[key] = replace(status, last_used_endpoint=kept)

    def punch_requests(self) -> tuple[PunchRequest, ...]:
        """Our hole-punching requests, for our affiliate."""
        return self.puncher.requests()

    def tick(self, now: float) -> Output:
        """The deadline passed: re-evaluate with the facts we have."""
        return self._reconcile(now, [])

    def set_config(self, config: NodeConfig, now: float) -> Output:
        """A new config was applied (KubeSpan on/off, secret, harvest, bypass...)."""
        self.config = config
        self.relay_addresses = RelayAddresses(config.cluster.secret_bytes, config.cluster.id)
        return self._reconcile(now, self._rebuild_specs())

    def _rebuild_specs(self) -> list[str]:
        if not self.config.kubespan.enabled:
            self.specs = []
            return []
        self.specs, warnings = build_peer_specs(
            self.affiliates, self.node_id, self.public_key, self.observed
        )
        return warnings

    def _reconcile(self, now: float, warnings: list[str]) -> Output:
        statuses: dict[bytes, PeerStatus] = {}
        transitions: list[Transition] = []
        deadlines: list[float] = []
        down: list[bytes] = []
        for spec in self.specs:
            key = spec.public_key
            old = self.statuses.get(key, PeerStatus(label=spec.label))
            judged, status, deadline = self._evaluate(spec, old, self.facts.get(key), now)
            for before, after in ((old, judged), (judged, status)):
                if after.state is not before.state:
                    transitions.append(
                        Transition(spec.id, spec.label, before.state, after.state, after.endpoint)
                    )
            if status is not judged:  # a new endpoint: facts about the old one are stale
                self.facts.pop(key, None)
            if judged.state is PeerState.DOWN:
                down.append(key)
            if deadline is not None:
                deadlines.append(deadline)
            statuses[key] = status
        punched = self._punch(statuses, down, now)
        if punched.deadline is not None:
            deadlines.append(punched.deadline)
        if punched.punch:
            deadlines.append(now + ATTEMPT_TIMEOUT)  # read the answer (or retries) then
        self.statuses = statuses
        self.facts = {key: facts for key, facts in self.facts.items() if key in statuses}
        kubespan = self.config.kubespan
        chosen = {key: status.last_used_endpoint for key, status in statuses.items()}
        change, self.applied = plan_device_change(
            self.specs, chosen, self.applied, self.config.cluster.secret_bytes
        )
        for key, _ in punched.punch:  # even on the endpoint in use: both must send now
            _ask_handshake(change, key)
        deadlines += self._probe_silent(statuses, change, now)
        deadlines += self._seek_direct(statuses, change, now)
        observed = observed_endpoints(self.specs, statuses, kubespan.harvest_extra_endpoints)
        self._publish(now, observed)
        return Output(
            device_change=change,
            warnings=warnings,
            transitions=transitions,
            observed=observed,
            routes=routed_prefixes(self.specs, statuses, kubespan.allow_down_peer_bypass),
            deadline=min(deadlines, default=None),
            republish=punched.republish,
            punched=[(self.statuses[key].label, endpoint) for key, endpoint in punched.punch],
        )

    def _punch(self, statuses: dict[bytes, PeerStatus], down: list[bytes], now: float,
               ) -> PunchStep:
        """Hole punching (``uspan.mesh.punch``): a peer that asked us is aimed at the
        endpoint it gave, as cycling would pick one, unless it is up for us: then it gets
        a handshake where it is (it lost us, we did not lose it: our NAT may have
        forgotten the mapping, and our handshake opens it again). So does a peer that
        reached us through the relay and is not down there: our UDP may be blocked, and
        the shell sends that handshake to its direct endpoints too."""
        offers = {}
        for affiliate in self.affiliates:
            info = affiliate.kubespan
            if info is None or info.public_key not in statuses:
                continue
            for request in info.punch:
                if request.peer_key == self.public_key:
                    offers[info.public_key] = request
        up = [key for key, status in statuses.items() if status.state is PeerState.UP]
        step = self.puncher.step(now, self.reflexive, down, offers, up)
        aims = dict(step.punch)
        for affiliate in self.affiliates:
            info = affiliate.kubespan
            if info is None or info.public_key not in step.requested:
                continue
            own = {str(address) for address in affiliate.addresses}
            mapped = next((e for e in info.endpoints if e.host not in own), None)
            if mapped is not None:
                aims.setdefault(info.public_key, mapped)
        step = replace(step, punch=list(aims.items()))
        for key, endpoint in step.punch:
            status = statuses[key]
            if status.state is PeerState.UP or (
                    status.state is PeerState.UNKNOWN and status.endpoint is not None
                    and is_relayed(status.endpoint)):
                continue
            self.facts.pop(key, None)
            statuses[key] = replace(statuses[key], state=PeerState.UNKNOWN, endpoint=endpoint,
                                    last_used_endpoint=endpoint, last_endpoint_change=now)
        return step

    def _probe_silent(
        self, statuses: Mapping[bytes, PeerStatus], change: DeviceChange, now: float
    ) -> list[float]:
        """Ask peers silent for too long to answer a handshake; their probe deadlines."""
        deadlines = []
        self.probed = {key: t for key, t in self.probed.items() if key in statuses}
        for key, status in statuses.items():
            due = probe_time(status, self.facts.get(key) or _no_news(status))
            if due is None:
                continue
            if due > now:
                deadlines.append(due)
            elif now - self.probed.get(key, -REKEY_TIMEOUT) >= REKEY_TIMEOUT:
                self.probed[key] = now
                deadlines.append(now + ATTEMPT_TIMEOUT)  # read the answer (or retries) then
                _ask_handshake(change, key)
        return deadlines

    def _seek_direct(
        self, statuses: Mapping[bytes, PeerStatus], change: DeviceChange, now: float
    ) -> list[float]:
        """Every DIRECT_RETRY, start a handshake with each peer that is up through the
        relay: the shell sends its initiation to the peer's direct endpoints too, so a
        direct path that works again takes over (the cores roam to it)."""
        deadlines = []
        self.sought = {key: t for key, t in self.sought.items() if key in statuses}
        for key, status in statuses.items():
            if status.state is not PeerState.UP or status.endpoint is None or not is_relayed(
                    status.endpoint):
                self.sought.pop(key, None)
                continue
            due = self.sought.setdefault(key, now + DIRECT_RETRY)
            if due <= now:
                _ask_handshake(change, key)
                due = self.sought[key] = now + DIRECT_RETRY
            deadlines.append(due)
        return deadlines

    def candidates(self, spec: PeerSpec) -> tuple[Endpoint, ...]:
        """The endpoints cycling tries for a peer: its own, then (when the cluster has a
        relay) the relay's pseudo-endpoint for it, so the relay is tried once every
        direct endpoint has failed, and direct ones again if the relay fails too."""
        relay = self.config.kubespan.relay
        if relay is None:
            return spec.endpoints
        address = self.relay_addresses.of(spec.public_key)
        return (*spec.endpoints, pseudo_endpoint(address, relay))

    def _evaluate(
        self, spec: PeerSpec, old: PeerStatus, facts: LinkFacts | None, now: float
    ) -> tuple[PeerStatus, PeerStatus, float | None]:
        """One peer: the status the facts give, then after cycling, and the next deadline.

        Until the core reports on a peer, it is taken to know nothing new: no handshake
        and no attempts on the endpoint we gave it.
        """
        if facts is None:
            facts = _no_news(old)
        update = update_status(old, facts, now, label=spec.label)
        picked = cycle(update.status, self.candidates(spec), now)
        if picked is None:
            return update.status, update.status, update.deadline
        # the shell restarts the attempt count on the new endpoint when it applies it
        fresh = replace(_no_news(picked), last_handshake=facts.last_handshake)
        return update.status, picked, next_deadline(picked, fresh, now)

    def _publish(self, now: float, observed: list[ObservedEndpoint]) -> None:
        store, offset = self.store, self.store.wall_offset
        store.replace_all(KUBESPAN_PEER_SPEC, {s.id: peer_spec_spec(s) for s in self.specs}, now)
        relay = self.config.kubespan.relay
        statuses = {
            spec.id: peer_status_spec(self.statuses[spec.public_key], offset, relay)
            for spec in self.specs
        }
        store.replace_all(KUBESPAN_PEER_STATUS, statuses, now)
        store.replace_all(KUBESPAN_ENDPOINT, {o.peer_id: endpoint_spec(o) for o in observed}, now)


def _ask_handshake(change: DeviceChange, key: bytes) -> None:
    peer = next((p for p in change.peers if p.public_key == key), None)
    if peer is None:
        change.peers.append(PeerChange(key, update_only=True, handshake=True))
    else:
        peer.handshake = True


def _no_news(status: PeerStatus) -> LinkFacts:
    return LinkFacts(
        status.endpoint, status.last_handshake, 0, None, status.rx_bytes, status.tx_bytes
    )
