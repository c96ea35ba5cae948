"""The relay between real ``uspan run`` nodes behind real NAT routers, in namespaces.

The world: a switch with the discovery service and its relay (192.0.2.254, TCP 3000 for
discovery, UDP and TCP 3001 for the relay); routers r1..r3 on the switch (192.0.2.1i),
each masquerading a node's LAN (10.i.0.0/24) with ``--random-fully`` (a new port per
destination: hole punching cannot work); r3 also drops all forwarded UDP. The nodes
announce only their LAN addresses, which nobody else can reach, so every pair can meet
only through the relay: n1-n2 over UDP, anything with n3 over the TCP fallback.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from tests.system.conftest import FAILED
from tests.system.meshnet import USPAN, MeshNode
from uspan.mesh.controller import DIRECT_RETRY
from uspan.testbed import Lab, Namespace, poll

pytestmark = pytest.mark.system

SWITCH = "192.0.2.254"
DISCOVERY, RELAY, METRICS = 3000, 3001, 9101
RELAY_TEXT = f"relay:{SWITCH}:{RELAY}"


class RelayNet:
    """The switch, routers and nodes of the module docstring."""

    def __init__(self, lab: Lab, tmp: Path, count: int, udp_blocked: frozenset[int]) -> None:
        self.lab, self.tmp = lab, tmp
        self.switch = lab.namespace("sw")
        self.routers = [lab.namespace(f"r{i}") for i in range(1, count + 1)]
        wans = lab.bridge([self.switch, *self.routers],
                          [[f"{SWITCH}/24"], *[[f"192.0.2.1{i}/24"] for i in range(1, count + 1)]])
        self.namespaces: list[Namespace] = []
        for i, (router, wan) in enumerate(zip(self.routers, wans[1:], strict=True), start=1):
            ns = lab.namespace(f"n{i}")
            lab.veth(router, ns, [f"10.{i}.0.1/24"], [f"10.{i}.0.2/24"])
            ns.ip("route", "add", "default", "via", f"10.{i}.0.1")
            router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            router.run("iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan.b_dev,
                       "-j", "MASQUERADE", "--random-fully")
            if i in udp_blocked:
                router.run("iptables", "-A", "FORWARD", "-p", "udp", "-j", "DROP")
            self.namespaces.append(ns)
        self.service_log = tmp / "discovery.log"
        self.start_service()
        self.config: dict[str, Any] = yaml.safe_load(subprocess.run(
            [USPAN, "gen", "config", "--with-kubespan", "--discovery-endpoint",
             f"{SWITCH}:{DISCOVERY}"], check=True, capture_output=True, text=True).stdout)
        self.config["kubespan"]["relay"] = f"{SWITCH}:{RELAY}"
        self.nodes = [self._node(i, ns) for i, ns in enumerate(self.namespaces, start=1)]

    def start_service(self) -> None:
        with self.service_log.open("ab") as log:
            self.service = self.switch.spawn(
                USPAN, "discovery-service", "--listen", f"{SWITCH}:{DISCOVERY}",
                "--relay", f"{SWITCH}:{RELAY}", "--metrics", f"{SWITCH}:{METRICS}",
                "--log-level", "debug", stdout=log.fileno(), stderr=subprocess.STDOUT)
        self.switch.wait_listening(RELAY, timeout=20)
        self.switch.wait_listening(DISCOVERY, timeout=20)

    def _node(self, index: int, ns: Namespace) -> MeshNode:
        name = f"n{index}"
        state = self.tmp / name
        state.mkdir(mode=0o700)
        node = MeshNode(cast(Any, self), name, ns, index, self.lab.interface_name(), state,
                        self.tmp / f"{name}.yaml", self.tmp / f"{name}.log")
        config = json.loads(json.dumps(self.config))
        config["kubespan"]["interface"] = node.interface
        node.config_path.write_text(yaml.safe_dump(config))
        node.config_path.chmod(0o600)
        return node

    def metrics(self) -> dict[str, float]:
        text = self.switch.run("curl", "-sf", f"http://{SWITCH}:{METRICS}/metrics").stdout
        found = re.finditer(r"^(uspan_relay\S*) (\S+)$", text, re.M)
        return {match[1]: float(match[2]) for match in found}

    def pairs_up(self, timeout: float) -> float:
        started = time.monotonic()

        def full() -> bool:
            for node in self.nodes:
                states = node.statuses()
                if any(states.get(o.name, {}).get("state") != "up"
                       for o in self.nodes if o is not node):
                    return False
            return True

        poll(full, what="every pair up", timeout=timeout, interval=0.5)
        return time.monotonic() - started

    def logs(self) -> str:
        parts = [f"--- {n.name} ---\n{n.log()}" for n in self.nodes if n.log_path.exists()]
        parts.append(f"--- discovery+relay ---\n{self.service_log.read_text()[-4000:]}")
        return "\n".join(parts)


@pytest.fixture
def relaynet(lab: Lab, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[Callable[..., RelayNet]]:
    """Makes the world; the lab stops its processes and removes it after the test."""
    made: list[RelayNet] = []

    def make(count: int, udp_blocked: frozenset[int] = frozenset()) -> RelayNet:
        made.append(RelayNet(lab, tmp_path, count, udp_blocked))
        return made[-1]

    yield make
    if request.node.stash.get(FAILED, False):
        for net in made:
            print(net.logs())


# From the switch: frames of a non-member (never registered), then of a member of another
# cluster (a valid proof under another secret) aimed at a real member's relay address.
INTRUDER = r"""
import base64, socket, sys
from uspan.discovery.proof import MemberKey
from uspan.relay import frames
from uspan.relay.addressing import RelayAddresses
from uspan.relay.session import RelaySession
relay, cluster, secret, target_key = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
host, port = relay.rsplit(":", 1)
target = RelayAddresses(base64.b64decode(secret), cluster).of(base64.b64decode(target_key))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(frames.send_frame(target, b"\x04\x00\x00\x00not a member"), (host, int(port)))
s.sendto(b"\xffRLX garbage", (host, int(port)))
session = RelaySession(MemberKey(b"other secret".ljust(32, b"!"), cluster), b"intruder")
for out, _ in session.tick(0.0):
    s.sendto(out, (host, int(port)))
while not session.registered(0.0):
    for out in session.receive(s.recv(2048), 0.0):
        s.sendto(out, (host, int(port)))
s.sendto(frames.send_frame(target, b"\x04\x00\x00\x00other cluster"), (host, int(port)))
"""


def node_stats(node: MeshNode) -> dict[str, str]:
    """``uspan stats`` of the node's interface."""
    return dict(line.split() for line in subprocess.run(
        [USPAN, "stats", node.interface], check=True, capture_output=True, text=True,
    ).stdout.splitlines())


def stop_pinger(pinger: subprocess.Popen[bytes], log: Path) -> tuple[int, list[int]]:
    """Stop a ``ping -i 0.1``; return how many requests it sent and the ``icmp_seq`` of
    those never answered, but for the last second's: their replies may still have been on
    the way (a count of replies left the tail to chance: two in flight on a loaded
    machine read as a loss)."""
    pinger.send_signal(signal.SIGINT)
    pinger.wait(10)
    text = log.read_text()
    summary = re.search(r"(\d+) packets transmitted", text)
    assert summary is not None, text
    sent = int(summary[1])
    answered = {int(seq) for seq in re.findall(r"^\d+ bytes from .* icmp_seq=(\d+) ", text, re.M)}
    return sent, [seq for seq in range(1, sent - 10 + 1) if seq not in answered]


def test_hard_nats_meet_through_the_relay_and_udp_blocked_falls_back_to_tcp(
        relaynet: Callable[..., RelayNet]) -> None:
    net = relaynet(3, udp_blocked=frozenset({3}))
    for node in net.nodes:
        node.start()
    took = net.pairs_up(timeout=90)
    print(f"3 nodes (2 hard NATs, 1 UDP-blocked) all up through the relay in {took:.1f}s")
    for node in net.nodes:
        for other, status in node.statuses().items():
            assert status["endpoint"] == RELAY_TEXT, (node.name, other, status)
    addresses = {node.name: node.kubespan_ip() for node in net.nodes}
    for node in net.nodes:
        for other in net.nodes:
            if other is not node:
                node.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "3", addresses[other.name],
                            timeout=30)
    stats = {node.name: node_stats(node) for node in net.nodes}
    assert [stats[n]["relay_tcp"] for n in ("n1", "n2", "n3")] == ["0", "0", "1"]
    assert all(int(stats[n]["relay_received"]) > 0 for n in stats)
    metrics = net.metrics()
    assert metrics["uspan_relay_registrations"] == 3
    assert metrics["uspan_relay_tcp_clients"] == 1  # n3, whose UDP is blocked
    assert metrics["uspan_relay_forwarded_frames_total"] > 0

    n1, n2 = net.nodes[0], net.nodes[1]
    before = net.metrics()
    cluster = net.config["cluster"]
    net.switch.run(sys.executable, "-c", INTRUDER, f"{SWITCH}:{RELAY}", cluster["id"],
                   cluster["secret"], n2.identity()["publicKey"], timeout=30)

    def drops() -> tuple[float, ...]:
        after = net.metrics()
        return tuple(after.get(name, 0.0) - before.get(name, 0.0) for name in (
            f'uspan_relay_dropped_frames_total{{reason="{reason}"}}'
            for reason in ("not_member", "bad_frame", "no_destination")))

    # The intruder's last frame may still be on its way to the relay when it exits.
    with contextlib.suppress(TimeoutError):
        poll(lambda: drops() == (1, 1, 1), what="the intruder's frames dropped", timeout=10,
             interval=0.2)
    assert drops() == (1, 1, 1)
    n1.ns.run("ping", "-c", "2", "-i", "0.2", "-W", "3", addresses["n2"], timeout=30)

    # The relay restarts and forgets everyone: traffic that meets silence re-registers.
    net.service.kill()
    net.service.wait()
    net.start_service()
    restarted = time.monotonic()
    n1.ns.run("ping", "-c", "1", "-w", "15", addresses["n3"], timeout=30)
    print(f"through the restarted relay again after {time.monotonic() - restarted:.1f}s")


# Waits of the node's own (below) beyond what pytest's 120 s default leaves after setup.
@pytest.mark.timeout(300)
def test_a_direct_path_that_opens_later_takes_over_without_a_drop(
        relaynet: Callable[..., RelayNet], tmp_path: Path) -> None:
    net = relaynet(2)
    for node in net.nodes:
        node.start()
    net.pairs_up(timeout=60)
    n1, n2 = net.nodes
    assert n1.statuses()["n2"]["endpoint"] == RELAY_TEXT
    # Open a direct path: the routers route each other's LAN, without NAT between them.
    for router, other in ((net.routers[0], 2), (net.routers[1], 1)):
        router.ip("route", "add", f"10.{other}.0.0/24", "via", f"192.0.2.1{other}")
        router.run("iptables", "-t", "nat", "-I", "POSTROUTING", "-d", "10.0.0.0/8",
                   "-j", "RETURN")
    ping_log = tmp_path / "ping.log"
    with ping_log.open("wb") as out:
        pinger = n1.ns.spawn("ping", "-i", "0.1", "-W", "2", n2.kubespan_ip(), stdout=out.fileno())
    started = time.monotonic()

    def direct() -> bool:
        return (n1.statuses()["n2"]["endpoint"] == "10.2.0.2:51820"
                and n2.statuses()["n1"]["endpoint"] == "10.1.0.2:51820")

    # each node looks for a direct path every DIRECT_RETRY: one look may fail
    poll(direct, what="both sides on the direct path", timeout=2 * DIRECT_RETRY + 30,
         interval=0.5)
    took = time.monotonic() - started
    time.sleep(3)  # traffic on the direct path
    sent, lost = stop_pinger(pinger, ping_log)
    print(f"direct path took over {took:.1f}s after it opened; ping {sent - len(lost)}/{sent}")
    assert sent > 30 and not lost, lost


@pytest.mark.timeout(300)
def test_udp_unblocked_later_the_node_returns_to_udp_without_a_drop(
        relaynet: Callable[..., RelayNet], tmp_path: Path) -> None:
    net = relaynet(2, udp_blocked=frozenset({2}))
    for node in net.nodes:
        node.start()
    net.pairs_up(timeout=90)
    n1, n2 = net.nodes
    assert node_stats(n2)["relay_tcp"] == "1"
    ping_log = tmp_path / "ping.log"
    with ping_log.open("wb") as out:
        pinger = n1.ns.spawn("ping", "-i", "0.1", "-W", "2", n2.kubespan_ip(), stdout=out.fileno())
    net.routers[1].run("iptables", "-D", "FORWARD", "-p", "udp", "-j", "DROP")  # lifted
    lifted = time.monotonic()
    # the next try of UDP: at most 15 s after the fallback, then 30, 60, ... s apart
    poll(lambda: node_stats(n2)["relay_tcp"] == "0", what="n2 back on UDP", timeout=150,
         interval=0.5)
    took = time.monotonic() - lifted
    time.sleep(8)  # traffic through the switch and past the drain
    sent, lost = stop_pinger(pinger, ping_log)
    stats = node_stats(n2)
    print(f"n2 back on UDP {took:.1f}s after the block was lifted; ping {sent - len(lost)}/{sent}")
    assert stats["relay_udp_returns"] == "1" and stats["relay_fallbacks"] == "1"
    assert net.metrics()["uspan_relay_tcp_clients"] == 0  # the old connection closed
    assert sent > 50 and not lost, lost


# On the switch, a listener on the path: every REGISTER that reaches the relay, as
# "source-ip source-port frame-hex" lines.
RECORDER = r"""
import socket, struct, sys
from uspan.relay import frames
port = int(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
while True:
    packet = s.recv(65535)
    head = (packet[0] & 15) * 4
    if packet[9] != 17 or struct.unpack(">H", packet[head + 2:head + 4])[0] != port:
        continue
    frame = packet[head + 8:]
    if frame[:frames.TAG] == frames.REGISTER:
        source = socket.inet_ntoa(packet[12:16])
        sport = struct.unpack(">H", packet[head:head + 2])[0]
        print(source, sport, frame.hex(), flush=True)
"""

# ... and the same listener sending one of them again, from the source it came from.
REPLAY = r"""
import socket, sys
relay, source, port, frame = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: send from the router's address
s.bind((source, port))
s.sendto(bytes.fromhex(frame), (relay, 3001))
"""


def test_a_registration_replayed_from_the_old_udp_source_moves_nothing(
        relaynet: Callable[..., RelayNet], tmp_path: Path) -> None:
    """n1 registers over UDP, then its UDP is blocked and it falls back to TCP. Its last
    UDP REGISTER, recorded on the path and replayed from its old source while the nonce
    is fresh, moved its relay address back there: n2's datagrams went to the blocked
    UDP mapping until n1 registered again."""
    net = relaynet(2)
    recorded = tmp_path / "registers.txt"
    with recorded.open("wb") as out:
        net.switch.spawn(sys.executable, "-c", RECORDER, str(RELAY), stdout=out.fileno())
    for node in net.nodes:
        node.start()
    net.pairs_up(timeout=60)
    n1, n2 = net.nodes
    with (tmp_path / "ping.log").open("wb") as out:  # traffic: the fallback comes at once
        pinger = n2.ns.spawn("ping", "-i", "0.2", "-W", "1", n1.kubespan_ip(),
                             stdout=out.fileno())
    net.routers[0].run("iptables", "-A", "FORWARD", "-p", "udp", "-j", "DROP")
    poll(lambda: node_stats(n1)["relay_tcp"] == "1", what="n1 on TCP", timeout=40,
         interval=0.5)
    pinger.send_signal(2)
    pinger.wait(10)
    # n2 may have called n1 down during the block and be trying n1's dead direct endpoint
    # for a few seconds before it comes back to the relay: wait for the first reply.
    n2.ns.run("ping", "-c", "1", "-w", "20", n1.kubespan_ip(), timeout=30)
    source, port, frame = [line.split() for line in recorded.read_text().splitlines()
                           if line.startswith("192.0.2.11 ")][-1]
    before = net.metrics()
    net.switch.run(sys.executable, "-c", REPLAY, SWITCH, source, port, frame)
    name = 'uspan_relay_dropped_frames_total{reason="superseded"}'
    poll(lambda: net.metrics().get(name, 0.0) == before.get(name, 0.0) + 1,
         what="the replay refused", timeout=15, interval=0.2)
    done = n2.ns.run("ping", "-c", "10", "-i", "0.2", "-W", "1", n1.kubespan_ip(),
                     timeout=30, check=False)
    assert " 0% packet loss" in done.stdout, done.stdout  # still delivered over TCP
