"""``uspan run``: one trio program holding the WireGuard device, the discovery client, the
peer controller and the local API, all in one nursery.

The mesh logic is pure (``uspan.mesh``); this shell only moves facts to it and carries
out what it returns:

- discovery events -> ``PeerController.set_affiliates`` -> a ``DeviceChange`` (the same
  call the UAPI makes: one way to configure a peer), routes, observed endpoints;
- the core's per-peer facts (woken by its peer events, or at the controller's deadline)
  -> ``set_facts`` -> the same outputs;
- the affiliate is published at start, every TTL/2 and at once on any change, and
  deleted on ``uspan leave`` (or SIGTERM with ``--leave-on-exit``);
- ``uspan apply-config`` / SIGHUP -> the config diff's actions, then ``set_config``.

Losing every discovery service never touches the device: tunnels keep their peers, and
the client re-syncs from a fresh snapshot when a service answers again.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import logging
import math
import secrets
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import trio

from uspan import metrics, privilege
from uspan import signals as stop_signals
from uspan.daemon import uapi_server
from uspan.daemon.daemon import Daemon
from uspan.discovery import client as dclient
from uspan.discovery.proof import MemberKey
from uspan.discovery.reflect import ANSWER_TAG
from uspan.mesh import address as mesh_address
from uspan.mesh.affiliate import (
    Affiliate,
    AffiliateDecodeError,
    decode_affiliate,
    encode_affiliate,
    local_affiliate,
)
from uspan.mesh.config import (
    Action,
    ConfigError,
    HostPort,
    KubeSpanConfig,
    NodeConfig,
    diff_configs,
    parse_config,
)
from uspan.mesh.controller import Output, PeerController
from uspan.mesh.cycling import ObservedEndpoint
from uspan.mesh.identity import Identity, IdentityError, load_or_create
from uspan.mesh.punch import Puncher
from uspan.mesh.reflexive import INTERVAL as PROBE_INTERVAL
from uspan.mesh.reflexive import ReflexiveProber
from uspan.mesh.resources import (
    DISCOVERY_STATUS,
    DISCOVERY_STATUS_ID,
    KUBESPAN_IDENTITY,
    KUBESPAN_IDENTITY_ID,
    Store,
    discovery_status_spec,
    identity_spec,
)
from uspan.mesh.status import LinkFacts, PeerState
from uspan.node import api
from uspan.node.links import read_links
from uspan.node.metrics import registry_for
from uspan.node.relaylink import RelayLink
from uspan.node.routing import DEFAULT_FWMARK, DEFAULT_TABLE, MeshRouting, RoutingError
from uspan.wg.config import ConfigError as DeviceConfigError
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.endpoint import Endpoint
from uspan.wg.facts import PeerFacts
from uspan.wg.peer import Peer

log = logging.getLogger("uspan.node")

AFFILIATE_TTL = 30 * 60.0  # seconds, as Talos
REFRESH_INTERVAL = AFFILIATE_TTL / 2
RETRY_MIN, RETRY_MAX = 0.5, 10.0  # publishing backoff while no service answers
DEFAULT_UAPI = "default"
HANDSHAKE_DEFER = 1.0  # seconds; see Node._defer_handshakes
SNAPSHOT_GRACE = 60.0  # seconds an affiliate missing from a reconnect's snapshot is kept


class NodeError(RuntimeError):
    """The node cannot start: the message names what is wrong, in one line."""


@dataclass(frozen=True)
class NodeOptions:
    config_path: Path
    state_dir: Path
    hostname: str
    uapi_path: str | None = DEFAULT_UAPI  # DEFAULT_UAPI: userpaths.uapi_dir()/IFACE.sock
    leave_on_exit: bool = False
    metrics: tuple[str, int] | None = None
    routing_table: int = DEFAULT_TABLE
    fwmark: int = DEFAULT_FWMARK


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def still_wanted(changes: list[PeerChange], before: dict[bytes, int],
                 now: dict[bytes, PeerFacts]) -> list[PeerChange]:
    """The deferred changes to apply now: a handshake only if none completed meanwhile.

    A peer missing from ``now`` is still in the change queue (applied in order, so its
    addition comes first): its handshake is kept, not lost to the queue's lag.
    """
    return [c for c in changes if not c.handshake or c.public_key not in now
            or now[c.public_key].handshakes == before.get(c.public_key, 0)]


def kept_elsewhere(change: DeviceChange, peers: Mapping[bytes, Peer],
                   ) -> list[tuple[bytes, Endpoint, Endpoint]]:
    """The endpoints of ``change`` the device did not take, as (key, pushed, kept): the
    peer roamed after the change was decided, and the roam stands."""
    found = []
    for change_peer in change.peers:
        pushed, peer = change_peer.endpoint, peers.get(change_peer.public_key)
        if pushed is None or peer is None or peer.endpoint is None:
            continue
        if peer.endpoint.address != pushed.address:
            found.append((change_peer.public_key, pushed, peer.endpoint))
    return found


class _KubeSpan:
    """The device, its routing and its address while KubeSpan is enabled."""

    def __init__(self, daemon: Daemon, routing: MeshRouting, address: ipaddress.IPv6Address,
                 subnet: ipaddress.IPv6Network,
                 on_kept: Callable[[bytes, Endpoint, Endpoint], None]) -> None:
        self.daemon = daemon
        self.routing = routing
        self.address = address
        self.subnet = subnet
        self.done = trio.Event()
        self.relay: RelayLink | None = None
        self.prober: ReflexiveProber | None = None  # once the services are resolved
        self.reflexive: tuple[Endpoint, ...] = ()  # what we publish of the prober's
        self.probe_wake = trio.Event()
        # Peer changes for the device, applied in order by _apply_changes, in slices: a
        # change for a thousand peers never stalls the tunnels to the others.
        self._changes, self._pending = trio.open_memory_channel[DeviceChange](math.inf)
        # Called with (key, endpoint pushed, endpoint the device kept) for each endpoint
        # the device did not take (the peer roamed after the decision).
        self.on_kept = on_kept

    def submit(self, change: DeviceChange) -> None:
        """Queue a change for apply_changes (dropped if the device has stopped)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._changes.send_nowait(change)

    async def apply_changes(self) -> None:
        async with self._pending:
            async for change in self._pending:
                try:
                    await self.daemon.configure(change)
                except DeviceConfigError as exc:
                    log.error("peer configuration refused by the device: %s", exc)
                    continue
                for key, pushed, kept in kept_elsewhere(change, self.daemon.device.peers):
                    self.on_kept(key, pushed, kept)


class Node:
    """See the module docstring."""

    def __init__(self, config: NodeConfig, options: NodeOptions) -> None:
        self.config = config
        self.options = options
        self.identity: Identity | None = None
        self.changes = api.Changes()
        self.store = Store(time.time() - trio.current_time(), on_change=self.changes.notify)
        self.controller: PeerController | None = None
        self.kubespan: _KubeSpan | None = None
        self.client: dclient.DiscoveryClient | None = None
        self.exit_code = 0
        self.affiliates: dict[str, dclient.Affiliate] = {}
        self.undecodable = 0  # affiliate data that opened but did not parse
        self._roamed: dict[bytes, int] = {}  # per peer, PeerFacts.roamed the controller saw
        self._nursery: trio.Nursery | None = None
        self._discovery_scope: trio.CancelScope | None = None
        self._republish = trio.Event()
        self._control_wake = trio.Event()
        self._observed_sent: dict[tuple[str, Endpoint], float] = {}
        self._missing: dict[str, float] = {}  # affiliate ID -> when to forget it
        self._addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
        self._leaving = False

    # Lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> int:
        """Start everything, serve until stopped; the exit code (0 = clean)."""
        state_dir = self.options.state_dir
        try:
            self.identity = load_or_create(state_dir)
        except OSError as exc:
            hint = privilege.dir_hint(exc.errno, state_dir, "--state-dir")
            raise NodeError(privilege.with_hint(f"state directory {state_dir}: "
                                                f"{exc.strerror or exc}", hint)) from None
        except IdentityError as exc:  # a damaged or foreign identity file: one line
            raise NodeError(str(exc)) from None
        listener = api.open_listener(str(state_dir / api.SOCKET_NAME))
        self.controller = PeerController(self.identity.node_id, self.identity.public_key,
                                         self.config, self.store,
                                         Puncher(seq=secrets.randbits(32)))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.config.kubespan.enabled:
                    await self._start_kubespan()
                self._put_identity()
                nursery.start_soon(api.ApiServer(self.store, self.changes, self,
                                                 self.options.hostname).serve,
                                   listener)
                nursery.start_soon(self._signals)
                nursery.start_soon(self._control_loop)
                if self.config.discovery.enabled:
                    nursery.start_soon(self._discovery)
                if self.options.metrics is not None:
                    host, port = self.options.metrics
                    await nursery.start(metrics.serve, host, port,
                                        registry_for(self.store, self._relay_stats))
                log.info("node %s started (%s)", self.identity.node_id,
                         "KubeSpan on" if self.kubespan else "KubeSpan off")
                task_status.started()
        finally:
            self._nursery = None
            listener.close()
            _unlink(state_dir / api.SOCKET_NAME)
            await self._stop_kubespan()
        return self.exit_code

    def _relay_stats(self) -> dict[str, int]:
        """The relay link's counters for the metrics; none without one."""
        ks = self.kubespan
        return {} if ks is None or ks.relay is None else ks.relay.stats()

    def stop(self, code: int = 0) -> None:
        """Cancel everything; ``run`` cleans up and returns ``code``."""
        if self._nursery is not None:
            self.exit_code = code
            self._nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as hangups:
            async with trio.open_nursery() as nursery:
                async def reload() -> None:
                    async for _ in hangups:
                        try:
                            text = self.options.config_path.read_text()
                            log.info("SIGHUP: %s", await self.apply_config(text))
                        except (OSError, ValueError) as exc:
                            log.error("SIGHUP: config not applied: %s", exc)
                nursery.start_soon(reload)
                signum = await stop_signals.first()
                log.info("received %s, shutting down", signum.name)
                if self.options.leave_on_exit:
                    await self._delete_affiliate()
                self.stop()

    # KubeSpan: the device and its routing -----------------------------------------------

    async def _start_kubespan(self) -> None:
        assert self._nursery is not None and self.identity is not None
        kubespan = self.config.kubespan
        uapi = self.options.uapi_path
        if uapi == DEFAULT_UAPI:
            uapi = uapi_server.socket_path(kubespan.interface)
        links = read_links(exclude=kubespan.interface)
        subnet = mesh_address.cluster_subnet(self.config.cluster.id)
        address = mesh_address.node_address(
            subnet, mesh_address.first_physical_mac(links.links), self.identity.public_key)
        self._addresses = links.addresses
        try:
            daemon = Daemon.open(kubespan.interface, uapi_path=uapi)
        except OSError as exc:
            raise NodeError(f"cannot create interface {kubespan.interface}: "
                            f"{exc.strerror or exc}") from None
        routing = MeshRouting(kubespan.interface, table=self.options.routing_table,
                              fwmark=self.options.fwmark)
        ks = _KubeSpan(daemon, routing, address, subnet, self._endpoint_kept)
        try:
            daemon.set(DeviceChange(private_key=self.identity.private_key,
                                    listen_port=kubespan.port, fwmark=self.options.fwmark))
            routing.bring_up(ipaddress.IPv6Interface(f"{address}/64"), kubespan.mtu)
        except (DeviceConfigError, RoutingError) as exc:
            routing.close()
            daemon.close()
            raise NodeError(str(exc)) from None
        self.kubespan = ks
        assert self.controller is not None
        self.controller.device_replaced()
        self._roamed = {}  # the new device counts its roams from 0
        if kubespan.relay is not None:
            ks.relay = RelayLink(
                daemon, kubespan.relay,
                MemberKey(self.config.cluster.secret_bytes, self.config.cluster.id),
                self.controller.relay_addresses.of(self.identity.public_key), self.options.fwmark)
            ks.relay.install()
        await self._nursery.start(self._run_device, ks)
        daemon.start_soon(self._pump_peer_events, daemon)
        if ks.relay is not None:
            daemon.start_soon(ks.relay.run)
        daemon.start_soon(self._reflexive_loop, ks)
        daemon.start_soon(ks.apply_changes)
        self._kick()

    async def _run_device(self, ks: _KubeSpan, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            code = await ks.daemon.run(task_status=task_status)
        finally:
            ks.done.set()
        if self.kubespan is ks and not self._leaving:  # not stopped by us: the link is gone
            log.error("device stopped: %s", ks.daemon.exit_reason)
            self.stop(code or 1)

    async def _stop_kubespan(self) -> None:
        ks, self.kubespan = self.kubespan, None
        if ks is None:
            return
        ks.routing.close()
        ks.daemon.stop("KubeSpan stopped")
        if self._nursery is not None:
            await ks.done.wait()
        else:
            ks.daemon.close()

    async def _reflexive_loop(self, ks: _KubeSpan) -> None:
        """Probe the discovery services from the WireGuard socket; publish what they see
        (``uspan.mesh.reflexive``). Answers come through the device's demux."""
        services: list[Endpoint] = []
        while not services:
            services = await _resolve(self.config.discovery.service_endpoints)
            if not services:
                await trio.sleep(PROBE_INTERVAL)
        prober = ks.prober = ReflexiveProber(services)

        def on_answer(data: bytes, source: Endpoint) -> None:
            prober.answer(data, trio.current_time())
            ks.probe_wake.set()

        ks.daemon.demux.register(ANSWER_TAG, on_answer)
        while True:
            ks.probe_wake = trio.Event()
            now = trio.current_time()
            probes = prober.poll(now)
            if probes:
                await ks.daemon.send_datagrams(probes)
            reflexive = prober.endpoints(now)
            if reflexive != ks.reflexive:
                log.info("reflexive endpoints: %s", ", ".join(map(str, reflexive)) or "none")
                ks.reflexive = reflexive
                self._republish.set()
                if self.controller is not None:
                    own = {str(address) for address in self._addresses}
                    mapped = [e for e in reflexive if e.host not in own]  # behind NAT
                    self._carry_out(self.controller.set_reflexive(mapped, now))
            with trio.move_on_at(prober.next_deadline()):
                await ks.probe_wake.wait()

    def _put_identity(self) -> None:
        assert self.identity is not None
        ks = self.kubespan
        if ks is None:
            self.store.delete(KUBESPAN_IDENTITY, KUBESPAN_IDENTITY_ID)
            return
        self.store.put(KUBESPAN_IDENTITY, KUBESPAN_IDENTITY_ID,
                       identity_spec(self.identity, ks.address, ks.subnet), trio.current_time())

    # The controller ----------------------------------------------------------------------

    def _kick(self) -> None:
        self._control_wake.set()

    async def _control_loop(self) -> None:
        """Facts in, changes out: when kicked (peer events, discovery) or at the deadline."""
        deadline = math.inf
        while True:
            with trio.move_on_at(deadline):
                await self._control_wake.wait()
            self._control_wake = trio.Event()
            output = self._refresh_facts()
            deadline = math.inf if output is None or output.deadline is None else output.deadline

    async def _pump_peer_events(self, daemon: Daemon) -> None:
        """The core's peer events (handshakes, roaming, giving up) kick the controller."""
        seen = -1
        while True:
            seen = await daemon.wait_peer_events(seen)
            self._kick()

    def _refresh_facts(self) -> Output | None:
        """Hand the controller the core's facts now; carry out what it says."""
        if self.controller is None:
            return None
        ks = self.kubespan
        raw = {} if ks is None else ks.daemon.peer_facts()
        self._roamed = {key: value.roamed for key, value in raw.items()}
        facts = {key: _link_facts(value) for key, value in raw.items()}
        output = self.controller.set_facts(facts, trio.current_time())
        self._carry_out(output)
        return output

    def _endpoint_kept(self, key: bytes, pushed: Endpoint, kept: Endpoint) -> None:
        if self.controller is not None:
            log.debug("peer %s roamed to %s before %s was applied: kept",
                      _b64(key), kept, pushed)
            self.controller.endpoint_kept(key, pushed, kept)
            self._kick()

    def _carry_out(self, output: Output) -> None:
        for warning in output.warnings:
            log.warning("%s", warning)
        ks = self.kubespan
        for t in output.transitions:
            log.info("peer %s (%s): %s -> %s (endpoint %s)", t.label, t.peer_id,
                     t.old.value, t.new.value, t.endpoint)
            if t.new is PeerState.DOWN and ks is not None and ks.prober is not None:
                ks.prober.refresh(trio.current_time())  # our NAT's mapping may have changed
                ks.probe_wake.set()
        if ks is not None:
            for peer in output.device_change.peers:
                # Applied after a queue: a roam meanwhile (say the peer's initiation came
                # through the relay while we aimed it at a direct endpoint) must stand.
                peer.unless_roamed_after = self._roamed.get(peer.public_key, 0)
            if output.device_change.peers:
                deferred = self._defer_handshakes(ks, output.device_change)
                ks.submit(output.device_change)
                if deferred and self._nursery is not None:
                    self._nursery.start_soon(self._apply_later, ks, deferred)
            if ks.relay is not None and self.controller is not None:
                addresses = self.controller.relay_addresses
                ks.relay.direct = {addresses.of(spec.public_key): spec.endpoints
                                   for spec in self.controller.specs}
            try:
                ks.routing.sync_routes(output.routes)
            except RoutingError as exc:
                log.error("routing: %s", exc)
        for label, endpoint in output.punched:
            log.info("peer %s: punching, handshake toward %s", label, endpoint)
        if output.republish:
            self._republish.set()
        if output.observed and self.client is not None and self._nursery is not None:
            self._nursery.start_soon(self._report_observed, output.observed)

    def _defer_handshakes(self, ks: _KubeSpan, change: DeviceChange) -> list[PeerChange]:
        """Of two nodes that start a handshake with each other at once, only one does.

        A new peer's persistent keepalive starts a handshake at once, and so does a new
        endpoint picked by cycling; both sides of a pair often do either at the same
        moment (they learn of each other, or find the path dead, together). Crossed
        initiations fail: each side consumes the other's and forgets its own, so both
        responses are dropped and WireGuard retries only after REKEY_TIMEOUT (5 s). So
        the side with the larger public key acts HANDSHAKE_DEFER later, and then only if
        no handshake completed meanwhile; if the other side did not act, ours still
        starts within that delay.
        """
        assert self.identity is not None
        ours = self.identity.public_key
        device = ks.daemon.device
        deferred = []
        for peer in change.peers:
            if peer.remove or ours < peer.public_key:
                continue
            if peer.persistent_keepalive and peer.public_key not in device.peers:
                deferred.append(PeerChange(peer.public_key, update_only=True,
                                           persistent_keepalive=peer.persistent_keepalive))
                peer.persistent_keepalive = None
            if peer.handshake:
                deferred.append(PeerChange(peer.public_key, update_only=True, handshake=True,
                                           unless_roamed_after=peer.unless_roamed_after))
                peer.handshake = False
        return deferred

    async def _apply_later(self, ks: _KubeSpan, changes: list[PeerChange]) -> None:
        before = {key: facts.handshakes for key, facts in ks.daemon.peer_facts().items()}
        await trio.sleep(HANDSHAKE_DEFER)
        if self.kubespan is not ks:
            return
        wanted = still_wanted(changes, before, ks.daemon.peer_facts())
        if wanted:
            ks.submit(DeviceChange(peers=wanted))  # update_only: gone ones skip

    # Discovery ---------------------------------------------------------------------------

    def local_affiliate(self) -> Affiliate:
        assert self.identity is not None
        ks = self.kubespan
        subnet = ks.subnet if ks else mesh_address.cluster_subnet(self.config.cluster.id)
        address = ks.address if ks else mesh_address.node_address(
            subnet, None, self.identity.public_key)
        if not self._addresses:
            self._addresses = read_links(exclude=self.config.kubespan.interface).addresses
        return local_affiliate(
            node_id=self.identity.node_id, hostname=self.options.hostname,
            nodename=self.options.hostname, addresses=self._addresses,
            kubespan=self.config.kubespan if ks else _disabled(self.config),
            public_key=self.identity.public_key, kubespan_address=address,
            reflexive=ks.reflexive if ks else (),
            punch=self.controller.punch_requests() if ks and self.controller else ())

    async def _discovery(self) -> None:
        """The client, its publisher and its watcher; restarted on a registry change."""
        while True:
            endpoints = [str(e) for e in self.config.discovery.service_endpoints]
            with trio.CancelScope() as scope:
                self._discovery_scope = scope
                async with dclient.DiscoveryClient(endpoints, self.config.cluster.id,
                                                   self.config.cluster.secret_bytes) as client:
                    self.client = client
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._publish_loop, client)
                            nursery.start_soon(self._watch_loop, client)
                            nursery.start_soon(self._status_loop, client)
                    finally:
                        self.client = None
            if not scope.cancelled_caught or not self.config.discovery.enabled:
                return

    async def _publish_loop(self, client: dclient.DiscoveryClient) -> None:
        delay = RETRY_MIN
        while True:
            self._republish = trio.Event()
            affiliate = self.local_affiliate()
            endpoints = affiliate.kubespan.endpoints if affiliate.kubespan else ()
            try:
                await client.update(affiliate.node_id, encode_affiliate(affiliate),
                                    [e.address for e in endpoints], AFFILIATE_TTL)
            except dclient.DiscoveryError as exc:
                log.warning("publishing the affiliate failed (retry in %.1fs): %s", delay, exc)
                with trio.move_on_after(delay):
                    await self._republish.wait()
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            with trio.move_on_after(REFRESH_INTERVAL):
                await self._republish.wait()

    async def _watch_loop(self, client: dclient.DiscoveryClient) -> None:
        async with trio.open_nursery() as nursery:
            async with client.watch() as events:
                async for event in events:
                    now = trio.current_time()
                    if isinstance(event, dclient.Snapshot):
                        # A (re)connection: the service may have lost us (a restart without
                        # state), so publish again, and re-report what we observe. Who is
                        # missing from it is kept for SNAPSHOT_GRACE, not dropped: a service
                        # that restarted empty must not take the tunnels down while every
                        # member republishes.
                        fresh = {a.id: self._with_known_data(a) for a in event.affiliates}
                        for gone in self.affiliates.keys() - fresh.keys():
                            self._missing.setdefault(gone, now + SNAPSHOT_GRACE)
                            fresh[gone] = self.affiliates[gone]
                        if self._missing:
                            nursery.start_soon(self._expire_missing, now + SNAPSHOT_GRACE)
                        self._missing = {k: t for k, t in self._missing.items()
                                         if k not in {a.id for a in event.affiliates}}
                        self.affiliates = fresh
                        self._observed_sent.clear()
                        self._republish.set()
                    elif isinstance(event, dclient.Updated):
                        affiliate = self._with_known_data(event.affiliate)
                        self.affiliates[affiliate.id] = affiliate
                        self._missing.pop(event.affiliate.id, None)
                    else:
                        self.affiliates.pop(event.affiliate_id, None)
                        self._missing.pop(event.affiliate_id, None)
                    self._affiliates_changed()
                    self._put_discovery_status(client)
            nursery.cancel_scope.cancel()

    def _with_known_data(self, record: dclient.Affiliate) -> dclient.Affiliate:
        """A record without data keeps the data we had: the service stores data only when
        its owner sends it, so an entry others created first (observed endpoints, after
        a restart without state) has none yet, and that is no news about the owner."""
        known = self.affiliates.get(record.id)
        if record.data is None and known is not None and known.data is not None:
            return replace(record, data=known.data)
        return record

    async def _expire_missing(self, when: float) -> None:
        """Drop the affiliates a snapshot lacked whose grace is over by ``when``."""
        await trio.sleep_until(when)
        expired = [key for key, until in self._missing.items() if until <= when]
        for key in expired:
            del self._missing[key]
            self.affiliates.pop(key, None)
        if expired:
            self._affiliates_changed()

    def _affiliates_changed(self) -> None:
        assert self.controller is not None
        affiliates: list[Affiliate] = []
        observed: dict[str, list[Endpoint]] = {}
        for record in self.affiliates.values():
            observed[record.id] = [Endpoint(host, port) for host, port in record.endpoints]
            if record.data is None:
                continue
            try:
                affiliates.append(decode_affiliate(record.data, record.id))
            except AffiliateDecodeError as exc:
                self.undecodable += 1
                log.warning("affiliate %s ignored: %s", record.id, exc)
        output = self.controller.set_affiliates(affiliates, observed, trio.current_time())
        self._carry_out(output)
        self._kick()

    async def _status_loop(self, client: dclient.DiscoveryClient) -> None:
        while True:
            self._put_discovery_status(client)
            await trio.sleep(1.0)

    def _put_discovery_status(self, client: dclient.DiscoveryClient) -> None:
        status = client.status
        link = status.watch if status.watch.connected else status.requests
        offset = self.store.wall_offset
        since = None if link.connected_since is None else link.connected_since - offset
        ks = self.kubespan
        prober = ks.prober if ks else None
        spec = discovery_status_spec(link.endpoint if link.connected else None, since,
                                     link.last_error, offset,
                                     status.undecryptable + self.undecodable,
                                     ks.reflexive if ks else (),
                                     prober.counts if prober else None)
        self.store.put(DISCOVERY_STATUS, DISCOVERY_STATUS_ID, spec, trio.current_time())

    async def _report_observed(self, observed: Sequence[ObservedEndpoint]) -> None:
        """Tell discovery which endpoint we see each up peer use (under its ID)."""
        client = self.client
        if client is None:
            return
        now = trio.current_time()
        for item in observed:
            affiliate_id, endpoint = item.affiliate_id, item.endpoint
            key = (affiliate_id, endpoint.without_source())
            if now - self._observed_sent.get(key, -math.inf) < REFRESH_INTERVAL:
                continue
            self._observed_sent[key] = now
            try:
                await client.update(affiliate_id, None, [endpoint.address], AFFILIATE_TTL)
            except dclient.DiscoveryError as exc:
                self._observed_sent.pop(key, None)
                log.debug("reporting %s for %s failed: %s", endpoint, affiliate_id, exc)

    async def _delete_affiliate(self) -> None:
        client = self.client
        if client is None or self.identity is None:
            return
        with trio.move_on_after(5):
            try:
                await client.delete(self.identity.node_id)
                log.info("affiliate %s deleted from discovery", self.identity.node_id)
            except dclient.DiscoveryError as exc:
                log.warning("could not delete our affiliate: %s", exc)

    # The local API (api.NodeControl) -----------------------------------------------------

    async def apply_config(self, text: str) -> str:
        """Validate, then change the running node in place; a one-line summary."""
        new = parse_config(text)  # ConfigError (a ValueError) names the field
        if new.cluster != self.config.cluster and self.kubespan is not None and (
                new.cluster.id != self.config.cluster.id):
            raise ConfigError("cluster.id", "changing the cluster needs a restart")
        diff = diff_configs(self.config, new)
        if not diff.changed:
            return "no change"
        old, self.config = self.config, new
        actions = diff.actions
        ks = self.kubespan
        if Action.REMOVE_INTERFACE in actions or Action.RECREATE_INTERFACE in actions:
            await self._stop_kubespan()
            ks = None
        if (Action.CREATE_INTERFACE in actions or Action.RECREATE_INTERFACE in actions) and (
                new.kubespan.enabled):
            await self._start_kubespan()
            ks = self.kubespan
        elif ks is not None:
            if Action.SET_MTU in actions:
                ks.routing.set_mtu(new.kubespan.mtu)
            if Action.REBIND_PORT in actions:
                try:
                    await ks.daemon.configure(DeviceChange(listen_port=new.kubespan.port))
                except DeviceConfigError as exc:
                    self.config = old
                    raise ConfigError("kubespan.port", str(exc)) from None
                if ks.relay is not None:
                    ks.relay.rebound()
                if ks.prober is not None:  # the new port has a NAT mapping of its own
                    ks.prober.refresh(trio.current_time())
                    ks.probe_wake.set()
        self._put_identity()
        assert self.controller is not None
        self._carry_out(self.controller.set_config(new, trio.current_time()))
        if Action.RESTART_DISCOVERY in actions:
            if self._discovery_scope is not None:
                self._discovery_scope.cancel()
            elif new.discovery.enabled and self._nursery is not None:
                self._nursery.start_soon(self._discovery)
        self._republish.set()
        self._kick()
        return "applied: " + ", ".join(diff.changed)

    async def leave(self) -> str:
        self._leaving = True
        await self._delete_affiliate()
        return "left the cluster; the node is stopping"


def _disabled(config: NodeConfig) -> KubeSpanConfig:
    return replace(config.kubespan, enabled=False)


def _link_facts(facts: PeerFacts) -> LinkFacts:
    return LinkFacts(
        endpoint=facts.endpoint,
        last_handshake=facts.last_handshake,
        unanswered_attempts=facts.attempts_on_endpoint,
        last_attempt=facts.last_attempt,
        rx_bytes=facts.rx_bytes,
        tx_bytes=facts.tx_bytes,
        last_received=facts.last_received,
        unanswered_data_since=facts.unanswered_data_since,
    )


async def _resolve(services: Sequence[HostPort]) -> list[Endpoint]:
    """The discovery services' addresses (their probe port is their port's number)."""
    found: dict[Endpoint, None] = {}
    for service in services:
        try:
            infos = await trio.socket.getaddrinfo(service.host, service.port,
                                                  type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("discovery service %s not resolved: %s", service.host, exc)
            continue
        for info in infos[:1]:
            found.setdefault(Endpoint(str(info[4][0]), service.port), None)
    return list(found)


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


def load_config(path: Path) -> NodeConfig:
    """The config file, or NodeError naming the file and the field."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise NodeError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # found by fuzz/config.py
        raise NodeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        return parse_config(text)
    except ConfigError as exc:
        raise NodeError(f"{path}: {exc}") from None


