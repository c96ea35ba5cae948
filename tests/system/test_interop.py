"""Interoperability on a real network: uspan-wg and wireguard-go in every combination.

Namespace a runs the initiator (it knows b's endpoint), namespace b the responder (it
learns a's endpoint from a's packets). Every tunnel uses a preshared key. Ids: the
combination ``wgo-wgo`` is the harness's own control (``pytest -k wgo``); ``nooff`` is
uspan with its kernel offloads off (ping and TCP only).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.system.conftest import COMBINATIONS, NO_OFFLOAD_COMBINATIONS
from uspan.testbed import Lab, Namespace, PeerConfig, PeerStatus, WireGuard, genkey, genpsk, poll

if TYPE_CHECKING:
    from tests.system.conftest import Combination, Pair

pytestmark = pytest.mark.system

PORT_A, PORT_B = 51001, 51002
INNER = {4: ("10.7.0.1", "10.7.0.2"), 6: ("fd00:7::1", "fd00:7::2")}
PREFIX = {4: 24, 6: 64}
OUTER = pytest.mark.parametrize("outer", [4, 6], ids=["outer4", "outer6"])


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def inner_routes(side: int) -> list[str]:
    """The /32 and /128 of side 0 (a) or 1 (b)."""
    return [f"{INNER[4][side]}/32", f"{INNER[6][side]}/128"]


def configure(wa: WireGuard, wb: WireGuard, b_outer: str) -> None:
    """Peer a with b (a initiates to b_outer) with a fresh PSK, then address and up both."""
    psk = genpsk()
    wa.configure(
        listen_port=PORT_A,
        peers=[PeerConfig(wb.keys.public, inner_routes(1), endpoint(b_outer, PORT_B), psk)],
    )
    wb.configure(listen_port=PORT_B, peers=[PeerConfig(wa.keys.public, inner_routes(0), None, psk)])
    for side, wg in enumerate((wa, wb)):
        wg.add_address(*(f"{INNER[f][side]}/{PREFIX[f]}" for f in (4, 6)))
        wg.up()


def tunnel(pair: Pair, combo: Combination, outer: int = 4) -> tuple[WireGuard, WireGuard]:
    wa = pair.lab.start_wireguard(pair.a, combo.initiator, env=combo.initiator_env)
    wb = pair.lab.start_wireguard(pair.b, combo.responder, env=combo.responder_env)
    configure(wa, wb, pair.outer(outer)[1])
    return wa, wb


def ping(ns: Namespace, addr: str, *, source: str | None = None, count: int = 2,
         wait: int = 3) -> bool:
    """Whether a reply came. The first ping of a tunnel waits for its handshake: ``wait``
    (ping's -W, how long it waits when no reply came yet) leaves a loaded machine room for
    it and costs nothing once the replies are in; a ping meant to fail may pass 1."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", str(wait), addr]
    return ns.run(*argv, *(["-I", source] if source else []), check=False).returncode == 0


def assert_ping(ns: Namespace, addr: str, *, source: str | None = None) -> None:
    assert ping(ns, addr, source=source), f"ping {addr} from {ns.name} (source {source}) failed"


def settled(wa: WireGuard, wb: WireGuard) -> tuple[PeerStatus, PeerStatus]:
    """Both peers' status once each side's tx equals the other's rx (or after 10 s: a
    keepalive may be in flight, and a loaded machine may hold it a while)."""

    def balanced() -> tuple[PeerStatus, PeerStatus] | None:
        a, b = wa.peer(wb.keys.public), wb.peer(wa.keys.public)
        return (a, b) if (a.tx_bytes, a.rx_bytes) == (b.rx_bytes, b.tx_bytes) else None

    with contextlib.suppress(TimeoutError):
        return poll(balanced, what="equal counters", timeout=10.0)
    return wa.peer(wb.keys.public), wb.peer(wa.keys.public)


def transfer(src: Namespace, dst: Namespace, addr: str, workdir: Path, size: int) -> None:
    """Send ``size`` random bytes over TCP with ncat; assert they arrive intact."""
    sent, received = workdir / f"sent-{addr}", workdir / f"received-{addr}"
    sent.write_bytes(os.urandom(size))
    with received.open("wb") as out:
        server = dst.spawn("ncat", "-l", "--recv-only", "-p", "5201", stdout=out.fileno())
    dst.wait_listening(5201)
    with sent.open("rb") as data:
        client = src.spawn("ncat", "--send-only", addr, "5201", stdin=data.fileno())
    assert client.wait(60) == 0, f"ncat to {addr} failed"
    assert server.wait(10) == 0, f"ncat listener on {addr} failed"
    digest = hashlib.sha256
    assert digest(received.read_bytes()).hexdigest() == digest(sent.read_bytes()).hexdigest()


def udp_delivered(src: Namespace, dst: Namespace, addr: str, source: str, wait: float) -> bool:
    """Whether one UDP datagram from ``source`` reaches ``addr`` within ``wait`` seconds."""
    got = dst.lab.secret_file("")
    with got.open("wb") as out:
        listener = dst.spawn("ncat", "-l", "-u", "--recv-only", "-p", "1111", stdout=out.fileno())
    try:
        dst.wait_listening(1111, udp=True)
        src.run("ncat", "-u", "--send-only", "-s", source, addr, "1111", input="X\n", timeout=5)
        with contextlib.suppress(TimeoutError):
            return poll(lambda: got.read_text() == "X\n", what="datagram", timeout=wait)
        return False
    finally:
        listener.terminate()
        listener.wait(5)


@pytest.mark.parametrize("combo", [*COMBINATIONS, *NO_OFFLOAD_COMBINATIONS], indirect=True)
@OUTER
def test_ping_transfer_and_counters(
    pair: Pair, combo: Combination, outer: int, tmp_path: Path
) -> None:
    wa, wb = tunnel(pair, combo, outer)
    for family in (4, 6):
        assert_ping(pair.a, INNER[family][1])
        assert_ping(pair.b, INNER[family][0])

    assert wa.wait_handshake(wb.keys.public).latest_handshake > 0
    assert wb.wait_handshake(wa.keys.public).latest_handshake > 0
    a, b = settled(wa, wb)
    assert a.tx_bytes > 0
    assert a.rx_bytes > 0
    assert (a.tx_bytes, a.rx_bytes) == (b.rx_bytes, b.tx_bytes)
    assert b.endpoint == endpoint(pair.outer(outer)[0], PORT_A)

    transfer(pair.a, pair.b, INNER[4][1], tmp_path, 4 << 20)
    transfer(pair.b, pair.a, INNER[6][0], tmp_path, 4 << 20)


@OUTER
def test_roaming(pair: Pair, combo: Combination, outer: int) -> None:
    wa, wb = tunnel(pair, combo, outer)
    old = pair.outer(outer)[0]
    assert_ping(pair.a, INNER[4][1])
    assert wb.peer(wa.keys.public).endpoint == endpoint(old, PORT_A)

    new = "192.0.2.11" if outer == 4 else "fd00:2::11"
    # Keep the new address when the old (primary) one of the same subnet goes.
    pair.a.run("sysctl", "-qw", f"net.ipv4.conf.{pair.link.a_dev}.promote_secondaries=1")
    pair.a.add_address(pair.link.a_dev, f"{new}/{PREFIX[outer]}")
    pair.a.ip("addr", "del", f"{old}/{PREFIX[outer]}", "dev", pair.link.a_dev)
    wa.set("listen-port", str(PORT_A + 10))
    assert_ping(pair.a, INNER[6][1])
    moved = endpoint(new, PORT_A + 10)
    with contextlib.suppress(TimeoutError):
        poll(lambda: wb.peer(wa.keys.public).endpoint == moved, what="b's endpoint for a",
             timeout=20)
    assert wb.peer(wa.keys.public).endpoint == moved
    assert_ping(pair.b, INNER[4][0])


def test_crypto_routing_filter(pair: Pair, combo: Combination) -> None:
    wa, wb = tunnel(pair, combo)
    a_in, b_in = INNER[4]
    stranger = "10.7.0.3"  # an address of b that a does not allow for b
    wb.add_address(f"{stranger}/24")
    assert_ping(pair.a, b_in)  # b, the responder, learns a's endpoint

    rx_before = wa.peer(wb.keys.public).rx_bytes
    assert not ping(pair.b, a_in, source=stranger, count=1, wait=1)
    with contextlib.suppress(TimeoutError):  # it arrived (the count may lag the ping)...
        poll(lambda: wa.peer(wb.keys.public).rx_bytes > rx_before, what="a's rx", timeout=10)
    assert wa.peer(wb.keys.public).rx_bytes > rx_before  # ...and was dropped

    wa.set("peer", wb.keys.public, "allowed-ips", "10.7.0.0/24,fd00:7::2/128")
    assert_ping(pair.b, a_in, source=stranger)
    assert udp_delivered(pair.b, pair.a, a_in, b_in, wait=10.0)

    more_specific = genkey().public  # a third peer, without endpoint
    wa.set_peer(PeerConfig(more_specific, [f"{b_in}/32"]))
    assert not udp_delivered(pair.b, pair.a, a_in, b_in, wait=0.5)
    assert_ping(pair.b, a_in, source=stranger)  # the rest of the /24 still maps to b

    wa.set("peer", more_specific, "remove")
    assert udp_delivered(pair.b, pair.a, a_in, b_in, wait=10.0)


def test_interface_moved_to_another_namespace(lab: Lab, combo: Combination) -> None:
    a0, b0, a1, b1 = (lab.namespace(role) for role in ("a0", "b0", "a1", "b1"))
    lab.veth(a0, b0, ["192.0.2.1/24"], ["192.0.2.2/24"])
    wa = lab.start_wireguard(a0, combo.initiator)
    wb = lab.start_wireguard(b0, combo.responder)
    wa.move_to(a1)
    wb.move_to(b1)
    configure(wa, wb, "192.0.2.2")

    assert_ping(a1, INNER[4][1])
    assert_ping(b1, INNER[4][0])
    assert_ping(a1, INNER[6][1])
    assert a0.ip("link", "show", wa.name, check=False).returncode != 0


def wg_quick(ns: Namespace, action: str, name: str, program: str, log: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    env["WG_QUICK_USERSPACE_IMPLEMENTATION"] = program
    with log.open("ab") as out:
        proc = ns.spawn(
            "wg-quick", action, name, stdout=out.fileno(), stderr=subprocess.STDOUT, env=env
        )
    assert proc.wait(30) == 0, f"wg-quick {action} {name} failed:\n{log.read_text()}"


def test_wg_quick_up_down(pair: Pair, impl: str, tmp_path: Path) -> None:
    lab = pair.lab
    name, keys, psk = lab.interface_name(), genkey(), genpsk()
    wb = lab.start_wireguard(pair.b, impl)
    wb.configure(listen_port=PORT_B, peers=[PeerConfig(keys.public, inner_routes(0), None, psk)])
    wb.add_address(f"{INNER[4][1]}/24", f"{INNER[6][1]}/64")
    wb.up()

    conf = Path("/etc/wireguard") / f"{name}.conf"
    lab.remove_on_close(conf)
    text = (
        f"[Interface]\nPrivateKey = {keys.private}\nListenPort = {PORT_A}\n"
        f"Address = {INNER[4][0]}/24, {INNER[6][0]}/64\n\n"
        f"[Peer]\nPublicKey = {wb.keys.public}\nPresharedKey = {psk}\n"
        f"AllowedIPs = {', '.join(inner_routes(1))}\nEndpoint = {pair.b4}:{PORT_B}\n"
    )
    with os.fdopen(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)

    log = tmp_path / "wg-quick.log"
    wg_quick(pair.a, "up", name, impl, log)
    wa = lab.adopt_wireguard(pair.a, name, impl, keys)
    assert_ping(pair.a, INNER[4][1])
    assert_ping(pair.a, INNER[6][1])
    assert wb.wait_handshake(keys.public).latest_handshake > 0

    wg_quick(pair.a, "down", name, impl, log)
    with contextlib.suppress(TimeoutError):
        poll(lambda: not wa.alive() and not wa.socket.exists(), what="daemon exit", timeout=20)
    assert not wa.alive(), "daemon still running after wg-quick down"
    assert not wa.socket.exists(), f"{wa.socket} left behind"
