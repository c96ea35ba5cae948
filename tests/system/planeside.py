"""One end of a plane tunnel for tests/system/test_plane.py, run inside a namespace
(``ip netns exec NS python -m tests.system.planeside ...``).

The core (``uspan.wg.Device``) completes the handshake over the UDP socket; the session's
keys go to ``uspan.plane._plane.Plane`` through its public ``install`` (they are caught
as the core makes its Sealer and Opener: the core keeps no raw key). The core's own
confirming keepalive is not sent: the plane seals it, so counter 0 is used once. Prints
``ready``, then collects until stdin closes, and prints the plane's counters as JSON.
The private key comes from a file (mode 0600, the lab's), never argv. With
``--offloads`` the TUN and socket are set up as the daemon would (``uspan.daemon.offload``:
IFF_VNET_HDR and TUNSETOFFLOAD, UDP_GRO, UDP_SEGMENT if known) and the plane is told what
the kernel accepted; the counters then carry ``offloads``, the flags passed. With
``--respond`` it waits for the peer's initiation instead (two planesides make a pair):
the responder's session goes to the plane as ``next``, and the initiator's keepalive,
sealed by its plane, confirms it in the responder's thread.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import pytun

from uspan.daemon import offload, udp
from uspan.plane import _plane
from uspan.wg import prefix, transport_crypto
from uspan.wg.config import DeviceChange, PeerChange
from uspan.wg.device import Device
from uspan.wg.endpoint import Endpoint

_keys: dict[int, bytes] = {}  # id(Sealer or Opener) -> its key
SYNC_INTERVAL = 1.0
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33


def _kept(make: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def made(key: bytes) -> Any:
        instance = make(key)
        _keys[id(instance)] = key
        return instance
    return made


def _offloads(tun_fd: int, sock: socket.socket) -> int:
    """Enable the kernel's offloads on the TUN and socket; the plane's flags for them."""
    features = offload.enable_tun_offload(tun_fd)
    if not {"csum", "tso4", "tso6"} <= features:
        raise SystemExit(f"the TUN refused TSO: {sorted(features)}")
    flags = _plane.OFFLOAD_TUN_VNET
    if {"uso4", "uso6"} <= features:
        flags |= _plane.OFFLOAD_TUN_USO
    if offload.probe_udp_gso(sock):
        flags |= _plane.OFFLOAD_UDP_GSO
    offload.enable_gro(sock)
    return flags


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tun", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--private-key-file", required=True)
    parser.add_argument("--peer-public", required=True)
    parser.add_argument("--peer-endpoint", required=True)
    parser.add_argument("--peer-allowed", nargs="+", required=True)
    parser.add_argument("--offloads", action="store_true")
    parser.add_argument("--respond", action="store_true")
    args = parser.parse_args()
    transport_crypto.Sealer = _kept(transport_crypto.Sealer)  # type: ignore[misc]
    transport_crypto.Opener = _kept(transport_crypto.Opener)  # type: ignore[misc]
    with open(args.private_key_file) as f:
        private = base64.b64decode(f.read().strip())
    public = base64.b64decode(args.peer_public)
    endpoint = Endpoint.parse(args.peer_endpoint)
    vnet = pytun.IFF_VNET_HDR if args.offloads else 0
    tun = pytun.TunTapDevice(name=args.tun, flags=pytun.IFF_TUN | pytun.IFF_NO_PI | vnet)
    tun.mtu = 1420
    os.set_blocking(tun.fileno(), False)
    sock = socket.socket(endpoint.family, socket.SOCK_DGRAM)
    sock.bind(("::" if endpoint.family == socket.AF_INET6 else "0.0.0.0", args.port))
    for force in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):  # the daemon's buffers (root here)
        sock.setsockopt(socket.SOL_SOCKET, force, udp.SOCKET_BUFFER)
    offloads = _offloads(tun.fileno(), sock) if args.offloads else 0
    allowed = [prefix.parse(text) for text in args.peer_allowed]

    device = Device()
    now = time.monotonic()
    pending = device.apply(DeviceChange(private_key=private, listen_port=args.port, peers=[
        PeerChange(public, endpoint=endpoint, allowed_ips=allowed,
                   handshake=not args.respond)]), now)
    peer = device.peers[public]
    pending += device.tick(now)
    sock.settimeout(0.05)
    deadline = now + 20
    # the initiator's session is current on the response, the responder's next
    while peer.current is None and peer.next is None:
        for datagram, where in pending:
            sock.sendto(datagram, where.address)
        if time.monotonic() > deadline:
            raise SystemExit("no handshake")
        try:
            data, source = sock.recvfrom(65536)
        except TimeoutError:
            pending = device.tick(time.monotonic())
            continue
        _, pending = device.receive([(data, Endpoint(*source[:2]))], time.monotonic())
    keypair = peer.current or peer.next
    assert keypair is not None
    for datagram, where in pending if args.respond else []:  # the response
        sock.sendto(datagram, where.address)
    sock.setblocking(False)

    plane = _plane.Plane(tun.fileno(), [sock.fileno()], 1420, offloads=offloads)
    me = plane.add_peer()
    plane.install(me, keypair.local_index, keypair.remote_index, _keys[id(keypair._sealer)],
                  _keys[id(keypair._opener)], int(keypair.created * 1e9), keypair.initiator)
    _keys.clear()
    if args.respond:
        plane.assign(me, -1, -1, keypair.local_index)
    else:
        plane.assign(me, -1, keypair.local_index, -1)
    plane.set_endpoint(me, socket.inet_pton(endpoint.family, endpoint.host), endpoint.port)
    plane.add_routes(me, allowed)
    plane.start()
    if not args.respond:
        (keepalive,) = plane.seal(keypair.local_index, [b""])
        sock.sendto(keepalive, endpoint.address)
    print("ready", flush=True)
    punts, collected = 0, 0.0
    while True:  # one collect a second at most, as the shell syncs (docs/dataplane.md)
        wait = collected + SYNC_INTERVAL - time.monotonic()
        watched = [sys.stdin] if wait > 0 else [sys.stdin, plane.fileno()]
        readable, _, _ = select.select(watched, [], [], wait if wait > 0 else None)
        if plane.fileno() in readable:
            punts += len(plane.collect()[1])  # counted, not handled: no core behind
            collected = time.monotonic()
        if sys.stdin in readable and not sys.stdin.readline():
            break
    counters = plane.counters()
    plane.close()
    counters["punts_taken"] = punts
    counters["offloads"] = offloads
    print(json.dumps(counters), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
