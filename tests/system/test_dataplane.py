"""uspan-wg with the C data plane (the default where it was built) and without it
(``USPAN_PLANE=0``): which one carries the packets, what a ping costs the trio shell,
and the sticky source of the plane's replies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.system.conftest import IMPLS, Combination, Pair, launch
from tests.system.test_interop import INNER, PORT_B, assert_ping, configure, tunnel
from uspan.daemon import dataplane
from uspan.testbed import WireGuard

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(not dataplane.wanted(), reason="the plane is off here "
                                 "(USPAN_PLANE=0 or uspan/plane not built)")]


def stats(wg: WireGuard) -> dict[str, int]:
    done = subprocess.run([str(Path(sys.executable).parent / "uspan"), "stats", wg.name],
                          capture_output=True, text=True, check=True)
    return {name: int(value) for name, value in (line.split() for line in done.stdout.splitlines())}


def test_a_ping_costs_the_shell_no_trio_wake_per_packet(pair: Pair) -> None:
    """100 pings through a pair of planes: every packet read in the threads, and each
    shell's plane loop woken a few times a second at most (records wait for the sync)."""
    program, _ = launch("uspan")
    wa, wb = tunnel(pair, Combination(program, program))
    assert_ping(pair.a, INNER[4][1])  # the handshake: punts, handled at once
    before = stats(wa), stats(wb)
    pair.a.run("ping", "-n", "-q", "-c", "100", "-i", "0.01", "-W", "1", INNER[4][1])
    after = stats(wa), stats(wb)
    for old, new in zip(before, after, strict=True):
        packets = (new["plane_tun_reads"] - old["plane_tun_reads"]
                   + new["plane_udp_reads"] - old["plane_udp_reads"])
        wakes = new["plane_loop_wakes"] - old["plane_loop_wakes"]
        assert packets >= 200, (packets, new)  # 100 requests and 100 replies in each
        assert wakes <= 6, (wakes, packets)  # ~1.5 s of pings: a wake or two a second


def test_the_plane_is_the_default_and_off_with_the_environment(pair: Pair) -> None:
    """a runs with the plane (the default), b with USPAN_PLANE=0: the tunnel works
    between them, a's thread carries its packets, b's trio loops carry its own."""
    program, _ = launch("uspan")
    verbose = {"LOG_LEVEL": "verbose"}
    wa, wb = tunnel(pair, Combination(program, program, verbose,
                                      {**verbose, dataplane.ENV: "0"}))
    for family in (4, 6):
        assert_ping(pair.a, INNER[family][1])
        assert_ping(pair.b, INNER[family][0])
    on, off = stats(wa), stats(wb)
    assert on["plane_udp_reads"] > 0 and on["plane_tun_reads"] > 0
    assert not [name for name in off if name.startswith("plane_")]
    assert off["tunnel_messages"] > 0  # b's core read the transport messages itself
    assert "Data plane: C thread" in wa.log_path.read_text()
    assert "Data plane: trio" in wb.log_path.read_text()
    assert "plane=on" in wa.log_path.read_text() and "plane=off" in wb.log_path.read_text()


def test_the_planes_replies_leave_from_the_address_the_peer_wrote_to(pair: Pair) -> None:
    """b has a second address on its link and wireguard-go in a writes to that one: b's
    plane replies from it (IP_PKTINFO), or a would roam to b's primary address."""
    second = "192.0.2.22"
    pair.b.add_address(pair.link.b_dev, f"{second}/24")
    wa = pair.lab.start_wireguard(pair.a, str(IMPLS["wgo"]))
    wb = pair.lab.start_wireguard(pair.b, launch("uspan")[0])
    configure(wa, wb, second)
    for _ in range(3):
        assert_ping(pair.a, INNER[4][1])
    assert wa.peer(wb.keys.public).endpoint == f"{second}:{PORT_B}"
    assert stats(wb)["plane_sealed"] >= 6  # the replies came from b's thread
