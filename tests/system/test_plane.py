"""The plane (uspan/plane/_plane.c) on a real TUN against current wireguard-go: the
handshake in the core, keys handed to the plane through ``install``, then the plane's
thread carries pings both ways, IPv4 and IPv6 inside, and wireguard-go's ``wg show``
counts the bytes; with offloads (vnet-header TUN with TSO, UDP_SEGMENT, UDP_GRO) it
carries iperf3 TCP both ways."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from uspan.testbed import Lab, Namespace, PeerConfig, WireGuard, genkey

pytestmark = pytest.mark.system

WGO = "/work/anchors/wireguard-go-current"
ROOT = Path(__file__).resolve().parents[2]
OUTER = ("192.0.2.1", "192.0.2.2")
INNER = {4: ("10.78.0.1", "10.78.0.2"), 6: ("fd78::1", "fd78::2")}
PORTS = (51831, 51832)
PINGS = 10
IPERF_PORT = 5201
IPERF_SECONDS = 3


def _line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"planeside said nothing in {timeout} s (exit {proc.poll()})"
    return proc.stdout.readline().decode().strip()


class Ends(NamedTuple):
    a: Namespace
    b: Namespace
    wgo: WireGuard  # B
    public: str  # A's
    counters: dict[str, Any]  # A's plane's, filled in when the block ends


@contextmanager
def _plane_and_wgo(*extra: str) -> Iterator[Ends]:
    """Namespace A's plane (tests/system/planeside.py, ``extra`` arguments) and B's
    wireguard-go with a session, addresses up."""
    counters: dict[str, Any] = {}
    with Lab("upl") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.veth(a, b, [f"{OUTER[0]}/24"], [f"{OUTER[1]}/24"])
        ka = genkey()
        wb = lab.start_wireguard(b, WGO)
        wb.configure(listen_port=PORTS[1], peers=[PeerConfig(
            ka.public, [f"{INNER[4][0]}/32", f"{INNER[6][0]}/128"], f"{OUTER[0]}:{PORTS[0]}")])
        wb.add_address(f"{INNER[4][1]}/24", f"{INNER[6][1]}/64")
        wb.up()
        tun = lab.interface_name()
        side = a.spawn(
            sys.executable, "-m", "tests.system.planeside", "--tun", tun,
            "--port", str(PORTS[0]), "--private-key-file", str(lab.secret_file(ka.private)),
            "--peer-public", wb.keys.public, "--peer-endpoint", f"{OUTER[1]}:{PORTS[1]}",
            "--peer-allowed", f"{INNER[4][1]}/32", f"{INNER[6][1]}/128", *extra,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        assert _line(side, 30) == "ready"
        a.ip("addr", "add", f"{INNER[4][0]}/24", "dev", tun)
        a.ip("addr", "add", f"{INNER[6][0]}/64", "dev", tun, "nodad")
        a.ip("link", "set", tun, "up")
        yield Ends(a, b, wb, ka.public, counters)
        assert side.stdin is not None
        side.stdin.close()
        counters.update(json.loads(_line(side, 10)))


@pytest.mark.skipif(not os.access(WGO, os.X_OK), reason=f"no {WGO}")
def test_the_plane_carries_pings_to_and_from_wireguard_go() -> None:
    with _plane_and_wgo() as (a, b, wb, public, counters):
        for f in (4, 6):
            for ns, there in ((a, INNER[f][1]), (b, INNER[f][0])):
                done = ns.run("ping", "-n", "-c", str(PINGS), "-i", "0.02", "-W", "2", there,
                              check=False)
                assert f"{PINGS} received" in done.stdout, done.stdout
        status = wb.peer(public)
    # each ping is one packet out and one back through the plane; the plane's keepalive
    assert counters["sealed"] >= 4 * PINGS + 1 and counters["opened"] >= 4 * PINGS
    assert counters["decrypt_failed"] == counters["replay"] == counters["send_errors"] == 0
    assert status.rx_bytes >= 4 * PINGS * 32 and status.tx_bytes >= 4 * PINGS * 32


def _iperf3(ns: Namespace, *argv: str) -> int:
    """Bytes an ``iperf3`` TCP client run delivered (its receiver's count)."""
    done = ns.run("iperf3", "-J", "-c", INNER[4][1], "-p", str(IPERF_PORT),
                  "-t", str(IPERF_SECONDS), *argv, timeout=IPERF_SECONDS + 30, check=False)
    report = json.loads(done.stdout)
    assert "error" not in report, report["error"]
    return int(report["end"]["sum_received"]["bytes"])


@pytest.mark.skipif(not os.access(WGO, os.X_OK), reason=f"no {WGO}")
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="no iperf3")
def test_the_plane_with_offloads_carries_tcp_to_and_from_wireguard_go() -> None:
    """TSO reads cut and sent with UDP_SEGMENT one way, wireguard-go's GSO sends received
    with UDP_GRO and merged into TUN writes the other; ``wg show`` agrees."""
    with _plane_and_wgo("--offloads") as (a, b, wb, public, counters):
        b.spawn("iperf3", "-s", "-p", str(IPERF_PORT))
        b.wait_listening(IPERF_PORT)
        sent = _iperf3(a)
        received = _iperf3(a, "-R")
        status = wb.peer(public)
    assert sent > 20_000_000 and received > 20_000_000, (sent, received)
    assert status.rx_bytes > sent and status.tx_bytes > received
    assert counters["offloads"] & 1  # OFFLOAD_TUN_VNET
    assert counters["tso_reads"] > 0 and counters["gso_sends"] > 0
    assert counters["gro_receives"] > 0 and counters["merged_writes"] > 0
    assert counters["decrypt_failed"] == counters["replay"] == counters["send_errors"] == 0
    assert counters["bad_inner_packet"] == 0

