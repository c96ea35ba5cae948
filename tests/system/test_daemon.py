"""The uspan-wg daemon driven by the real ``wg`` tool, in namespaces of our own.

``lab`` (tests/system/conftest.py) owns the namespaces, daemons and sockets and removes
them after each test; tests are skipped unless root, /dev/net/tun and the tools exist.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from uspan.daemon.udp import UdpBind
from uspan.testbed import UAPI_DIR, Lab, Namespace, PeerConfig, WireGuard, genkey, poll, run
from uspan.wg.endpoint import Endpoint

pytestmark = pytest.mark.system

PROGRAM = shutil.which("uspan-wg", path=os.path.dirname(sys.executable)) or shutil.which(
    "uspan-wg"
)


@pytest.fixture
def ns(lab: Lab) -> Namespace:
    return lab.namespace("a")


def start(lab: Lab, ns: Namespace) -> WireGuard:
    assert PROGRAM, "uspan-wg is not installed (pip install -e .)"
    return lab.start_wireguard(ns, PROGRAM)


def uapi(wg: WireGuard, request: str) -> str:
    """One raw request on the daemon's UAPI socket; returns the reply text."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(wg.socket))
        sock.sendall(request.encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            reply += chunk
    return reply.decode()


def showconf(wg: WireGuard) -> str:
    return run(["wg", "showconf", wg.name]).stdout


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def wait_exit(wg: WireGuard) -> None:
    # it looks for its socket and interface every WATCH_INTERVAL (1 s), then shuts down
    poll(lambda: gone(wg.process.pid), what=f"{wg.name} daemon to exit", timeout=20)


# Launch ------------------------------------------------------------------------------------


def test_launch_creates_interface_and_private_socket(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    shown = run(["wg", "show", wg.name]).stdout
    assert f"interface: {wg.name}" in shown and "listening port:" in shown
    status = wg.status()
    assert status.public_key is None and 0 < status.listen_port < 65536 and not status.peers
    assert ns.ip("link", "show", wg.name).returncode == 0
    assert (wg.socket.stat().st_mode & 0o777) == 0o600  # as the node API socket
    assert (UAPI_DIR.stat().st_mode & 0o777) == 0o755
    mtu = int(ns.run("cat", f"/sys/class/net/{wg.name}/mtu").stdout)
    assert mtu == 1420
    # The daemon is detached: its own session, not the launcher's.
    assert os.getsid(wg.process.pid) == wg.process.pid


def test_second_daemon_on_same_interface_fails_with_message(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    done = ns.run(PROGRAM, wg.name, check=False)
    assert done.returncode == 1
    assert wg.name in done.stderr and done.stderr.strip()
    assert not gone(wg.process.pid)
    assert wg.status().listen_port > 0


def test_foreground_logs_like_wireguard_go(lab: Lab, ns: Namespace, tmp_path: Path) -> None:
    name = lab.interface_name()
    log = tmp_path / "log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns.name, PROGRAM, "-f", name], stdout=out, stderr=out,
            env={**os.environ, "LOG_LEVEL": "verbose"})
    try:
        poll(lambda: (UAPI_DIR / f"{name}.sock").exists(), what="socket", timeout=20)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log.read_text().splitlines()
    assert lines, "no log output"
    for line in lines:
        prefix, _, rest = line.partition(f" ({name}) ")
        assert prefix in ("DEBUG:", "ERROR:"), line
        time.strptime(rest[:19], "%Y/%m/%d %H:%M:%S")
    assert any("Shutting down" in line for line in lines)
    assert not (UAPI_DIR / f"{name}.sock").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_at_once_after_ready_is_always_clean(lab: Lab, ns: Namespace,
                                                  signum: signal.Signals) -> None:
    """A service manager stopping the daemon the instant its socket appears gets a clean
    exit every time: status 0, socket removed, TUN gone (issue 13: 3 of 30 died)."""
    assert PROGRAM
    for _ in range(20):
        name = lab.interface_name()
        path = UAPI_DIR / f"{name}.sock"
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, PROGRAM, "-f", name],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            poll(lambda: path.exists() or proc.poll() is not None, what="socket",  # noqa: B023
                 timeout=20, interval=0.001)
            proc.send_signal(signum)
            code = proc.wait(10)
            stderr = proc.stderr.read().decode() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == 0, f"{name}: exit {code}: {stderr}"
        assert not path.exists(), f"{path} left behind"
        assert ns.ip("link", "show", name, check=False).returncode != 0, f"{name} left"


def test_detached_daemon_stopped_at_once_after_launch_is_clean(lab: Lab, ns: Namespace) -> None:
    """The launcher returns once the daemon is ready; SIGTERM right then is clean too."""
    for _ in range(10):
        wg = start(lab, ns)
        os.kill(wg.process.pid, signal.SIGTERM)
        wait_exit(wg)
        assert not wg.socket.exists(), f"{wg.socket} left behind"
        assert ns.ip("link", "show", wg.name, check=False).returncode != 0


@pytest.mark.parametrize(
    "args",
    [[], ["-f"], ["a", "b"], ["-f", "a", "b"], ["-x", "wg0"], ["--bogus"],
     ["x" * 16], ["a/b"], ["-f", "a:b"], ["."], ["wg0", "--uapi-dir"], ["--uapi-dir=", "wg0"]],
)
def test_cli_bad_arguments_exit_2(args: list[str]) -> None:
    assert PROGRAM
    done = subprocess.run([PROGRAM, *args], capture_output=True, text=True, timeout=20)
    assert done.returncode == 2
    assert "Usage:" in done.stderr


def test_cli_version() -> None:
    assert PROGRAM
    done = subprocess.run([PROGRAM, "--version"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and done.stdout.startswith("uspan-wg v")


# Configuration through wg ------------------------------------------------------------------


def test_wg_set_and_showconf_round_trip(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    peer = genkey()
    key_file = lab.secret_file(wg.keys.private + "\n")
    psk_file = lab.secret_file("uvgeDkCG8hE0sbBaB6bhUZNR0cEK3/eydUGYFmwS3VI=\n")
    run(["wg", "set", wg.name, "private-key", str(key_file), "listen-port", "41820",
         "fwmark", "0x1234", "peer", peer.public, "preshared-key", str(psk_file),
         "endpoint", "192.0.2.9:51820", "persistent-keepalive", "25",
         "allowed-ips", "10.0.0.0/24,fd00:1::/64"])
    status = wg.status()
    assert status.public_key == wg.keys.public
    assert status.listen_port == 41820 and status.fwmark == 0x1234
    shown = status.peers[peer.public]
    assert shown.endpoint == "192.0.2.9:51820" and shown.persistent_keepalive == 25
    assert shown.allowed_ips == ("10.0.0.0/24", "fd00:1::/64")
    assert "41820" in ns.run("ss", "-Hulnp", "sport = :41820").stdout
    conf = showconf(wg)
    assert f"PrivateKey = {wg.keys.private}" in conf
    assert "PresharedKey = uvgeDkCG8hE0sbBaB6bhUZNR0cEK3/eydUGYFmwS3VI=" in conf
    # Feed showconf back to a second daemon: it must show the very same configuration.
    other_ns = lab.namespace("b")
    other = start(lab, other_ns)
    conf_file = lab.secret_file(conf)
    run(["wg", "setconf", other.name, str(conf_file)])
    assert showconf(other) == conf
    # Remove the peer again.
    run(["wg", "set", wg.name, "peer", peer.public, "remove"])
    assert wg.status().peers == {}


def big_config(private: str, peers: list[tuple[str, list[str]]]) -> str:
    lines = ["[Interface]", f"PrivateKey = {private}", "ListenPort = 42000"]
    for public, prefixes in peers:
        lines += ["", "[Peer]", f"PublicKey = {public}", f"AllowedIPs = {', '.join(prefixes)}"]
    return "\n".join(lines) + "\n"


def test_syncconf_40_peers_of_52_prefixes(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    publics = [run(["wg", "pubkey"], input=run(["wg", "genkey"]).stdout).stdout.strip()
               for _ in range(40)]
    peers = [(public, [f"10.{p}.{i}.0/24" for i in range(26)]
              + [str(ipaddress.ip_network(f"fd00:{p:x}:{i:x}::/64")) for i in range(26)])
             for p, public in enumerate(publics)]
    conf_file = lab.secret_file(big_config(wg.keys.private, peers))
    run(["wg", "syncconf", wg.name, str(conf_file)])
    status = wg.status()
    assert status.listen_port == 42000
    assert {key: set(p.allowed_ips) for key, p in status.peers.items()} == {
        public: set(prefixes) for public, prefixes in peers}
    # Sync again with half the peers, one of them with other prefixes.
    changed = [*peers[:19], (peers[19][0], ["192.168.0.0/16"])]
    conf_file.write_text(big_config(wg.keys.private, changed))
    run(["wg", "syncconf", wg.name, str(conf_file)])
    assert {key: set(p.allowed_ips) for key, p in wg.status().peers.items()} == {
        public: set(prefixes) for public, prefixes in changed}


def test_syncconf_peer_with_130k_allowed_ips(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    peer = genkey()
    prefixes = [f"10.{i >> 16}.{i >> 8 & 255}.{i & 255}/32" for i in range(120_000)]
    prefixes += [f"fd00::{i:x}/128" for i in range(1, 10_001)]
    conf_file = lab.secret_file(big_config(wg.keys.private, [(peer.public, prefixes)]))
    started = time.monotonic()
    run(["wg", "syncconf", wg.name, str(conf_file)], timeout=60)
    shown = run(["wg", "show", wg.name, "allowed-ips"], timeout=60).stdout.split()
    elapsed = time.monotonic() - started
    assert shown[0] == peer.public
    assert len(shown) == 1 + 130_000 and set(shown[1:]) == set(prefixes)
    assert elapsed < 30
    # A second sync of the same config changes nothing and is accepted.
    run(["wg", "syncconf", wg.name, str(conf_file)], timeout=60)
    assert len(run(["wg", "show", wg.name, "allowed-ips"]).stdout.split()) == 130_001


def test_bad_set_leaves_config_unchanged(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    wg.configure(listen_port=43000)
    before = uapi(wg, "get=1\n\n")
    peer = genkey()
    peer_hex = base64.b64decode(peer.public).hex()
    reply = uapi(wg, f"set=1\nfwmark=7\npublic_key={peer_hex}\nallowed_ip=10.0.0.0/8\n"
                     "allowed_ip=10.0.0.0/99\n\n")
    assert reply == "errno=-22\n\n"
    assert uapi(wg, "get=1\n\n") == before
    assert uapi(wg, "frobnicate=1\n\n") == "errno=-22\n\n"
    # A port that is taken: -EADDRINUSE, the old port stays bound, nothing else changes.
    blocker = ns.spawn("python3", "-c", "import socket,time; s=socket.socket(socket.AF_INET,"
                       "socket.SOCK_DGRAM); s.bind(('0.0.0.0', 43001)); time.sleep(60)")
    ns.wait_listening(43001, udp=True)
    reply = uapi(wg, f"set=1\nlisten_port=43001\npublic_key={peer_hex}\n\n")
    assert reply == f"errno=-{errno.EADDRINUSE}\n\n"
    assert uapi(wg, "get=1\n\n") == before
    bound = ns.run("ss", "-Hulnp", "sport = :43000").stdout.splitlines()
    assert len(bound) == 2 and all("uspan-wg" in line for line in bound)  # v4 and v6
    # (each socket may show twice: the data plane's thread works on a dup of its fd)
    blocker.kill()
    blocker.wait()
    # The same change now succeeds, and the old port is released.
    assert uapi(wg, f"set=1\nlisten_port=43001\npublic_key={peer_hex}\n\n") == "errno=0\n\n"
    assert wg.status().listen_port == 43001 and peer.public in wg.status().peers
    assert ns.run("ss", "-Hulnp", "sport = :43000").stdout == ""


# Lifetime ----------------------------------------------------------------------------------


def test_exits_when_interface_deleted(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    ns.ip("link", "del", wg.name)
    wait_exit(wg)
    assert not wg.socket.exists()


def test_exits_when_socket_removed(lab: Lab, ns: Namespace) -> None:
    wg = start(lab, ns)
    wg.socket.unlink()
    wait_exit(wg)
    assert ns.ip("link", "show", wg.name, check=False).returncode != 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_exits_on_signal(lab: Lab, ns: Namespace, signum: int) -> None:
    wg = start(lab, ns)
    os.kill(wg.process.pid, signum)
    wait_exit(wg)
    assert not wg.socket.exists()
    assert ns.ip("link", "show", wg.name, check=False).returncode != 0


# Data path ---------------------------------------------------------------------------------


def test_ping_between_two_daemons_and_after_moving_the_interface(lab: Lab) -> None:
    if not shutil.which("ping"):
        pytest.skip("needs ping")
    a_ns, b_ns, inner = lab.namespace("a"), lab.namespace("b"), lab.namespace("in")
    lab.veth(a_ns, b_ns, ["192.0.2.1/24"], ["192.0.2.2/24"])
    a, b = start(lab, a_ns), start(lab, b_ns)
    a.configure(listen_port=51001)
    b.configure(listen_port=51002)
    a.set_peer(PeerConfig(b.keys.public, ["10.77.0.2/32"], "192.0.2.2:51002"))
    b.set_peer(PeerConfig(a.keys.public, ["10.77.0.1/32"], "192.0.2.1:51001"))
    a.add_address("10.77.0.1/24")
    b.add_address("10.77.0.2/24")
    a.up()
    b.up()
    a_ns.run("ping", "-c", "3", "-i", "0.2", "-W", "3", "10.77.0.2", timeout=30)
    assert b.wait_handshake(a.keys.public).rx_bytes > 0
    # Move a's interface into another namespace: its UDP socket stays in a_ns.
    a.move_to(inner)
    a.add_address("10.77.0.1/24")
    a.up()
    inner.run("ping", "-c", "3", "-i", "0.2", "-W", "3", "10.77.0.2", timeout=30)
    assert not gone(a.process.pid)


def test_attaches_to_persistent_tun(lab: Lab, ns: Namespace) -> None:
    name = lab.interface_name()
    ns.ip("tuntap", "add", "mode", "tun", "name", name)
    ns.ip("link", "set", name, "mtu", "1280")
    ifindex = ns.run("cat", f"/sys/class/net/{name}/ifindex").stdout
    proc = ns.spawn(PROGRAM, "-f", name)
    poll(lambda: (UAPI_DIR / f"{name}.sock").exists(), what="socket", timeout=20)
    assert run(["wg", "show", name]).returncode == 0
    assert ns.run("cat", f"/sys/class/net/{name}/ifindex").stdout == ifindex
    assert ns.run("cat", f"/sys/class/net/{name}/mtu").stdout.strip() == "1280"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    # The persistent interface outlives the daemon.
    assert ns.ip("link", "show", name).returncode == 0


# The UDP sockets (on loopback only) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "loopback", "absent"),
    [(socket.AF_INET, "127.0.0.1", "192.0.2.99"), (socket.AF_INET6, "::1", "fd00::99")],
)
def test_udp_sticky_source_and_fallback(family: int, loopback: str, absent: str) -> None:
    async def scenario() -> None:
        bind = UdpBind.open(0)
        client = socket.socket(family, socket.SOCK_DGRAM)
        client.bind((loopback, 0))
        client.settimeout(5)
        try:
            udp = next(s for s in bind.sockets if s.family == family)
            for payload in (b"one", b"two"):
                client.sendto(payload, (loopback, bind.port))
            received: list[tuple[bytes, Endpoint]] = []
            while len(received) < 2:
                received += await udp.receive()
            (first, source), (second, again) = received
            assert (first, second) == (b"one", b"two")
            assert source is again  # repeat sources reuse the cached Endpoint
            assert source == Endpoint(loopback, client.getsockname()[1], loopback,
                                      socket.if_nametoindex("lo"))
            assert await bind.send([(b"reply", source)]) == []
            data, address = client.recvfrom(100)
            assert (data, address[:2]) == (b"reply", (loopback, bind.port))
            # A sticky source that is not ours: resent without it, and reported.
            stale = Endpoint(source.host, source.port, absent, source.ifindex)
            assert await bind.send([(b"again", stale)]) == [stale]
            assert client.recvfrom(100)[0] == b"again"
        finally:
            client.close()
            bind.close()

    trio.run(scenario)


def test_udp_rebinding_a_taken_port_fails() -> None:
    first = UdpBind.open(0)
    try:
        with pytest.raises(OSError) as info:
            UdpBind.open(first.port)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        first.close()
