"""The data path with kernel offloads on and off: every byte arrives, over TCP and UDP.

Through a tunnel between two daemons (uspan with offloads on, uspan with
``USPAN_OFFLOAD=off``, wireguard-go), with IPv4 and IPv6 inside: a few MB of random data
each way over TCP (sha256 compared), then UDP datagrams of many sizes each way — plain
sends, sends with UDP_SEGMENT (so the TUN gets USO super-segments) and datagrams the
kernel must fragment — compared as multisets of sha256. Again with a 9000-byte outer and
an 8920-byte tunnel MTU (wireguard-go's netns.sh "big MTU" runs), also with the
interfaces moved to other namespaces first, so the daemons never learn that MTU. After
the traffic the daemons are alive and their counters moved by more than the TCP data
sent. uspan runs with LOG_LEVEL=verbose, and its ``Offloads:`` line says what each side
really had (checked against ``uspan-wg --features``), also when started by wg-quick.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.system.conftest import program
from tests.system.test_interop import INNER, PORT_A, PORT_B, configure, endpoint, transfer
from uspan.daemon import dataplane
from uspan.testbed import Namespace, WireGuard, genkey, poll

if TYPE_CHECKING:
    from tests.system.conftest import Combination, Pair

pytestmark = pytest.mark.system

TCP_BYTES = 3 << 20
DATAGRAMS = 2000
UDP_PORT = 5301
TUNNEL_MTU = 1420  # the default of uspan-wg and wireguard-go
BIG_MTU = 8920
IP_HEADER = {4: 20, 6: 40}
OFFLOAD_NAMES = ("csum", "tso4", "tso6", "uso4", "uso6")
ALL_OFF = "tun=off udp_gso4=off udp_gro4=off udp_gso6=off udp_gro6=off"

# Receives datagrams until EXPECTED arrived or none came for IDLE seconds; prints the
# sha256 of each, as a JSON list. argv: family address port expected idle
RECEIVER = r"""
import hashlib, json, socket, sys
family, address, port, expected, idle = sys.argv[1:]
sock = socket.socket(int(family), socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE: past rmem_max (root)
sock.bind((address, int(port)))
sock.settimeout(float(idle))
hashes = []
try:
    while len(hashes) < int(expected):
        hashes.append(hashlib.sha256(sock.recv(65535)).hexdigest())
except TimeoutError:
    pass
print(json.dumps(hashes))
"""

# Sends about COUNT random datagrams to ADDRESS:PORT in rounds of ten, cycling through
# SIZES; every twentieth round is one UDP_SEGMENT send of GSO_SIZE datagrams (fewer
# than ten if they would pass 64 KiB). Pauses 3 ms after each round, so that on a busy
# 2-core machine no daemon's socket or TUN queue overflows (loss is not what is tested). Prints
# the sha256 of each datagram sent, as a JSON list.
# argv: family address port count gso_size sizes(comma-separated)
SENDER = r"""
import hashlib, json, os, socket, struct, sys, time
family, address, port, count, gso_size, sizes = sys.argv[1:]
count, gso_size, sizes = int(count), int(gso_size), [int(s) for s in sizes.split(",")]
segments = min(10, 65000 // gso_size)
sock = socket.socket(int(family), socket.SOCK_DGRAM)  # unconnected: no ICMP errors
to = (address, int(port))
sent, round = [], 0
while len(sent) < count:
    gso = round % 20 == 10
    if gso:  # full datagrams and a shorter last one, in one send
        data = [os.urandom(gso_size) for _ in range(segments - 1)]
        data.append(os.urandom(gso_size // 3))
    else:
        data = [os.urandom(sizes[(len(sent) + i) % len(sizes)]) for i in range(10)]
    data = data[: count - len(sent)]
    if gso and len(data) > 1:
        cmsg = [(socket.SOL_UDP, 103, struct.pack("=H", gso_size))]  # UDP_SEGMENT
        sock.sendmsg([b"".join(data)], cmsg, 0, to)
    else:
        for datagram in data:
            sock.sendto(datagram, to)
    sent += [hashlib.sha256(d).hexdigest() for d in data]
    round += 1
    time.sleep(0.003)
print(json.dumps(sent))
"""


def start(pair: Pair, combo: Combination, outer: int, *, mtu: int | None = None,
          move_to: tuple[Namespace, Namespace] | None = None) -> tuple[WireGuard, WireGuard]:
    """A configured tunnel; uspan logs verbosely. The interfaces move to ``move_to``
    (the daemons stay), then get MTU ``mtu``."""
    sides = []
    for ns, executable, env in ((pair.a, combo.initiator, combo.initiator_env),
                                (pair.b, combo.responder, combo.responder_env)):
        level = "verbose" if is_uspan(executable) else "error"
        sides.append(pair.lab.start_wireguard(ns, executable, env=env, log_level=level))
    wa, wb = sides
    for wg, ns in zip(sides, move_to or (), strict=False):
        wg.move_to(ns)
    if mtu is not None:
        for wg in sides:
            wg.link_ns.ip("link", "set", wg.name, "mtu", str(mtu))
    configure(wa, wb, pair.outer(outer)[1])
    return wa, wb


def is_uspan(executable: str) -> bool:
    return Path(executable).name == "uspan-wg"


def offload_line(log: Path) -> str:
    """What follows ``Offloads: `` in a daemon's verbose log."""

    def line() -> str | None:
        for text in log.read_text(errors="replace").splitlines():
            if "Offloads: " in text:
                return text.split("Offloads: ", 1)[1].strip()
        return None

    with contextlib.suppress(TimeoutError):
        return poll(line, what=f"an Offloads line in {log}", timeout=20.0)
    pytest.fail(f"no 'Offloads:' line in {log}:\n{log.read_text(errors='replace')}")


def expected_offloads(ns: Namespace, executable: str) -> str:
    """The ``Offloads:`` line a daemon with offloads on should log, from ``--features``."""
    lines = ns.run(executable, "--features").stdout.splitlines()
    features = dict(line.split(": ", 1) for line in lines if ": " in line)
    if features["tun_vnet_hdr"] != "on":
        tun = "off"
    else:
        tun = ",".join(n for n in sorted(OFFLOAD_NAMES) if features[f"tun_{n}"] == "on")
    udp = " ".join(f"{k}={features[k]}" for k in ("udp_gso4", "udp_gro4", "udp_gso6",
                                                   "udp_gro6"))
    return f"tun={tun or 'none'} {udp}"


def check_offloads(wg: WireGuard, env: Mapping[str, str]) -> None:
    """A uspan daemon's logged offloads match its launch: all off, or all the kernel has,
    in the data plane's thread as in the trio path; the line says which carries them."""
    if not is_uspan(wg.program):
        return
    plane = dataplane.wanted({**os.environ, **env})
    off = env.get("USPAN_OFFLOAD") == "off"
    want = ALL_OFF if off else expected_offloads(wg.ns, wg.program)
    assert wg.log_path is not None
    assert offload_line(wg.log_path) == f"{want} plane={'on' if plane else 'off'}"


def udp_sizes(family: int, mtu: int) -> tuple[int, list[int]]:
    """(UDP_SEGMENT size, sizes of plain datagrams): tiny to the largest unfragmented
    payload, and a few that must be fragmented."""
    largest = mtu - IP_HEADER[family] - 8
    sizes = [1, 15, 16, 17, 64, 200, 512, 999, 1200, largest - 17, largest - 1, largest,
             largest + 1, 2 * largest + 100]
    return largest - 5, sizes


def socket_drops(ns: Namespace, port: int) -> int:
    """What the kernel dropped at the full receive queues of the UDP sockets bound to
    ``port`` in ``ns`` (the last column of /proc/net/udp and udp6)."""
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in ns.run("cat", table).stdout.splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                drops += int(fields[-1])
    return drops


def udp_exchange(src: Namespace, dst: Namespace, family: int, addr: str, tmp_path: Path,
                 count: int, mtu: int = TUNNEL_MTU, *,
                 receiving: tuple[WireGuard, int]) -> None:
    """Send ``count`` datagrams ``src`` -> ``dst``; every one arrives, intact, once.
    Debian's wireguard-go keeps the kernel's default receive buffer (about 90 datagrams),
    so on a loaded machine its socket may overflow while it is not scheduled: when the
    ``receiving`` daemon (and its listen port) is wireguard-go, the datagrams its socket's
    own drop counter accounts for are not held against the sender."""
    daemon, port = receiving
    dropped_before = socket_drops(daemon.ns, port)
    out = tmp_path / f"udp-{src.name}-{family}.json"
    af = "2" if family == 4 else "10"
    with out.open("wb") as sink:
        receiver = dst.spawn(sys.executable, "-c", RECEIVER, af, addr, str(UDP_PORT),
                             str(count), "5", stdout=sink.fileno())
    dst.wait_listening(UDP_PORT, udp=True)
    gso_size, sizes = udp_sizes(family, mtu)
    sent_out = src.run(sys.executable, "-c", SENDER, af, addr, str(UDP_PORT), str(count),
                       str(gso_size), ",".join(map(str, sizes)), timeout=60).stdout
    try:
        assert receiver.wait(30) == 0, f"UDP receiver in {dst.name} failed"
    except subprocess.TimeoutExpired:
        pytest.fail(f"UDP receiver in {dst.name} did not finish")
    order = json.loads(sent_out)
    sent, received = Counter(order), Counter(json.loads(out.read_text()))
    assert sum(sent.values()) == count
    corrupt = received - sent
    assert not corrupt, f"{sum(corrupt.values())} datagrams arrived altered or duplicated"
    unclaimed, missing = received.copy(), []
    for i, digest in enumerate(order):  # in order: which ones, not how many
        if unclaimed[digest]:
            unclaimed[digest] -= 1
        else:
            missing.append(i)
    dropped = socket_drops(daemon.ns, port) - dropped_before
    excused = 0 if is_uspan(daemon.program) else dropped
    assert len(missing) <= excused, (
        f"{len(missing)} of {count} datagrams to {addr} were lost, the first #{missing[0]}, "
        f"the last #{missing[-1]}; {daemon!r}'s socket dropped {dropped}")
    if missing:
        print(f"{len(missing)} datagrams lost to {daemon!r}'s full socket ({dropped} drops)")


def traffic(wa: WireGuard, wb: WireGuard, family: int, tmp_path: Path,
            count: int = DATAGRAMS, mtu: int = TUNNEL_MTU) -> None:
    """TCP and UDP both ways between the interfaces' namespaces with inner IP ``family``;
    then the daemons are alive and their counters grew by more than the TCP data."""
    (a, a_in), (b, b_in) = (wa.link_ns, INNER[family][0]), (wb.link_ns, INNER[family][1])
    before = wa.peer(wb.keys.public), wb.peer(wa.keys.public)
    transfer(a, b, b_in, tmp_path, TCP_BYTES)
    transfer(b, a, a_in, tmp_path, TCP_BYTES)
    udp_exchange(a, b, family, b_in, tmp_path, count, mtu, receiving=(wb, PORT_B))
    udp_exchange(b, a, family, a_in, tmp_path, count, mtu, receiving=(wa, PORT_A))
    for wg in (wa, wb):
        assert wg.alive(), f"{wg!r} died:\n{wg.log_tail()}"
    after = wa.peer(wb.keys.public), wb.peer(wa.keys.public)
    for start_, end in zip(before, after, strict=True):
        assert end.tx_bytes - start_.tx_bytes > TCP_BYTES
        assert end.rx_bytes - start_.rx_bytes > TCP_BYTES


@pytest.mark.parametrize(
    "combo", ["uspan-uspan", "uspan-wireguardgo", "nooff-uspan"], indirect=True
)
@pytest.mark.parametrize("inner, outer", [(4, 6), (6, 4)], ids=["inner4-outer6",
                                                               "inner6-outer4"])
def test_tcp_and_udp_arrive_intact(pair: Pair, combo: Combination, inner: int, outer: int,
                                   tmp_path: Path) -> None:
    wa, wb = start(pair, combo, outer)
    check_offloads(wa, combo.initiator_env)
    check_offloads(wb, combo.responder_env)
    traffic(wa, wb, inner, tmp_path)
    assert wb.peer(wa.keys.public).endpoint == endpoint(pair.outer(outer)[0], PORT_A)
    assert wa.peer(wb.keys.public).endpoint == endpoint(pair.outer(outer)[1], PORT_B)


@pytest.mark.parametrize("combo", ["uspan-uspan", "uspan-wireguardgo"], indirect=True)
def test_big_mtu(pair: Pair, combo: Combination, tmp_path: Path) -> None:
    """Once the daemons have seen the new MTU, super-segments are as big as it allows."""
    big_outer_mtu(pair)
    wa, wb = start(pair, combo, 4, mtu=BIG_MTU)
    for wg in (wa, wb):
        if is_uspan(wg.program):
            poll(lambda wg=wg: f"MTU updated: {BIG_MTU}" in wg.log_path.read_text(),
                 what=f"{wg.name}: MTU update", timeout=20.0)
    for family in (4, 6):
        traffic(wa, wb, family, tmp_path, count=200, mtu=BIG_MTU)


@pytest.mark.parametrize("combo", ["uspan-uspan"], indirect=True)
def test_big_mtu_unseen_by_moved_daemons(pair: Pair, combo: Combination,
                                         tmp_path: Path) -> None:
    """Interfaces moved away and then given a big MTU: the daemons never see it, so the
    kernel's super-segments exceed the MTU they know, and must still arrive intact."""
    big_outer_mtu(pair)
    elsewhere = pair.lab.namespace("a1"), pair.lab.namespace("b1")
    wa, wb = start(pair, combo, 6, mtu=BIG_MTU, move_to=elsewhere)
    for family in (4, 6):
        traffic(wa, wb, family, tmp_path, count=200, mtu=BIG_MTU)


def big_outer_mtu(pair: Pair) -> None:
    for ns, dev in ((pair.a, pair.link.a_dev), (pair.b, pair.link.b_dev)):
        ns.ip("link", "set", dev, "mtu", "9000")


@pytest.mark.parametrize(
    "env", [{}, {"USPAN_OFFLOAD": "off"}, {"USPAN_OFFLOAD": "on"}], ids=["default", "off", "on"]
)
def test_verbose_log_names_offloads(pair: Pair, env: dict[str, str]) -> None:
    wg = pair.lab.start_wireguard(pair.a, program("uspan"), env=env, log_level="verbose")
    check_offloads(wg, env)
    assert wg.alive()


def test_offloads_off_through_wg_quick(pair: Pair, tmp_path: Path) -> None:
    """wg-quick passes its environment on: USPAN_OFFLOAD=off reaches the daemon."""
    lab, uspan = pair.lab, program("uspan")
    name, keys = lab.interface_name(), genkey()
    conf = Path("/etc/wireguard") / f"{name}.conf"
    lab.remove_on_close(conf)
    text = f"[Interface]\nPrivateKey = {keys.private}\nAddress = {INNER[4][0]}/24\n"
    with os.fdopen(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(text)
    env = {**os.environ, "WG_QUICK_USERSPACE_IMPLEMENTATION": uspan, "LOG_LEVEL": "verbose",
           "USPAN_OFFLOAD": "off"}
    log = tmp_path / "wg-quick.log"
    with log.open("ab") as out:
        up = pair.a.spawn("wg-quick", "up", name, stdout=out.fileno(),
                          stderr=subprocess.STDOUT, env=env)
    assert up.wait(30) == 0, f"wg-quick up {name} failed:\n{log.read_text()}"
    wg = lab.adopt_wireguard(pair.a, name, uspan, keys)
    assert offload_line(log) == f"{ALL_OFF} plane={'on' if dataplane.wanted(env) else 'off'}"
    assert wg.alive()
