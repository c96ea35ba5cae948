"""Endpoint cycling while a peer is down, and observed endpoints to report to discovery.

Cycling follows Talos: a peer that is down (uspan's faster rule included) or has no
endpoint gets the next one of its spec's endpoints: ``endpoints[0]`` first, then the one
after the endpoint last used, wrapping around, and ``endpoints[0]`` again if that one has
vanished from the spec. A single endpoint already in use is not re-picked. Picking makes
the peer ``unknown`` and restarts T0, so it gets a fresh 15 s (or two handshake attempts)
to prove itself. Endpoints are compared by address and port (a sticky source is not part
of the choice).

Observed endpoints: for every peer that is up, the endpoint its packets really come from
is reported to discovery under that peer's affiliate ID, so members that cannot reach its
announced addresses can try it. Talos leaves this off because the load grows with the
square of the cluster; uspan reports by default while the cluster has at most 50 peers,
and ``kubespan.harvestExtraEndpoints`` forces it on or off. A relay's pseudo-endpoint
(``uspan.relay.addressing``) is never reported: it means nothing to anyone else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from uspan.mesh.peerspec import PeerSpec
from uspan.mesh.status import PeerState, PeerStatus
from uspan.relay.addressing import is_relayed
from uspan.wg.endpoint import Endpoint

HARVEST_PEER_LIMIT = 50


def pick_endpoint(endpoints: Sequence[Endpoint], last_used: Endpoint | None) -> Endpoint | None:
    """The endpoint to try next, or None to keep the current one."""
    if not endpoints:
        return None
    if last_used is None:
        return endpoints[0]
    addresses = [endpoint.address for endpoint in endpoints]
    try:
        index = addresses.index(last_used.address)
    except ValueError:
        return endpoints[0]
    if len(endpoints) == 1:
        return None
    return endpoints[(index + 1) % len(endpoints)]


def cycle(status: PeerStatus, endpoints: Sequence[Endpoint], now: float) -> PeerStatus | None:
    """A status with a newly picked endpoint when the peer needs one, else None."""
    if status.state is not PeerState.DOWN and status.endpoint is not None:
        return None
    picked = pick_endpoint(endpoints, status.last_used_endpoint)
    if picked is None:
        return None
    picked = picked.without_source()
    return replace(
        status,
        state=PeerState.UNKNOWN,
        endpoint=picked,
        last_used_endpoint=picked,
        last_endpoint_change=now,
    )


@dataclass(frozen=True, slots=True)
class ObservedEndpoint:
    """The ``KubeSpanEndpoint`` resource: a peer's endpoint as we see it in use."""

    peer_id: str
    affiliate_id: str
    endpoint: Endpoint


def observed_endpoints(
    specs: Sequence[PeerSpec], statuses: Mapping[bytes, PeerStatus], harvest: bool | None
) -> list[ObservedEndpoint]:
    """What to report back to discovery (``harvest`` None = automatic, by cluster size)."""
    if not (harvest if harvest is not None else len(specs) <= HARVEST_PEER_LIMIT):
        return []
    reports = []
    for spec in specs:
        status = statuses.get(spec.public_key)
        if (status is not None and status.state is PeerState.UP and status.endpoint is not None
                and not is_relayed(status.endpoint)):
            reports.append(
                ObservedEndpoint(spec.id, spec.affiliate_id, status.endpoint.without_source())
            )
    return reports
