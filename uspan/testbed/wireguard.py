"""WireGuard daemons in a testbed, driven by ``wg``: keys, peer configs, status.

The names say they are the testbed's (``WgKeys``, ``PeerConfig``), not the core's
``Keypair`` (a session's keys) and ``Peer`` (protocol state).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from uspan.testbed.process import NetnsError, OwnedProcess, poll, run, tail

if TYPE_CHECKING:
    from uspan.testbed.lab import Lab
    from uspan.testbed.namespace import Namespace

UAPI_DIR = Path("/var/run/wireguard")


# --- keys -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WgKeys:
    """A WireGuard key pair, base64 as ``wg`` prints it; ``repr`` hides the private key."""

    private: str = field(repr=False)
    public: str


def genkey() -> WgKeys:
    """A fresh key pair from ``wg genkey``/``wg pubkey`` (the key travels on stdin only)."""
    private = run(["wg", "genkey"]).stdout.strip()
    return WgKeys(private, run(["wg", "pubkey"], input=private + "\n").stdout.strip())


def genpsk() -> str:
    """A fresh preshared key from ``wg genpsk``."""
    return run(["wg", "genpsk"]).stdout.strip()


# --- `wg show IFACE dump` ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One peer line of ``wg show IFACE dump`` (the preshared key is not kept)."""

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # Unix seconds, 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int  # seconds, 0 = off


@dataclass(frozen=True, slots=True)
class InterfaceStatus:
    """The interface line of ``wg show IFACE dump`` (the private key is not kept)."""

    public_key: str | None
    listen_port: int
    fwmark: int
    peers: dict[str, PeerStatus]


def _none(value: str) -> str | None:
    return None if value == "(none)" else value


def _off(value: str) -> int:
    return 0 if value == "off" else int(value, 0)


def parse_dump(text: str) -> InterfaceStatus:
    """Parse the tab-separated output of ``wg show IFACE dump``."""
    lines = [line.split("\t") for line in text.splitlines() if line]
    if not lines or len(lines[0]) != 4:
        raise NetnsError(f"wg dump: interface line has {len(lines[0]) if lines else 0} fields")
    _private, public, port, fwmark = lines[0]
    peers = {}
    for number, fields in enumerate(lines[1:], start=2):
        if len(fields) != 8:
            raise NetnsError(f"wg dump: line {number} has {len(fields)} fields, expected 8")
        key, _psk, endpoint, ips, handshake, rx, tx, keepalive = fields
        allowed = () if ips == "(none)" else tuple(ips.split(","))
        peers[key] = PeerStatus(
            key, _none(endpoint), allowed, int(handshake), int(rx), int(tx), _off(keepalive)
        )
    return InterfaceStatus(_none(public), int(port), _off(fwmark), peers)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A peer to configure; keys are base64, endpoint is ``host:port`` or ``[v6]:port``."""

    public_key: str
    allowed_ips: Sequence[str] = ()
    endpoint: str | None = None
    preshared_key: str | None = field(default=None, repr=False)
    persistent_keepalive: int = 0


class WireGuard:
    """A WireGuard interface served by a userspace daemon the lab started or adopted."""

    def __init__(
        self,
        lab: Lab,
        name: str,
        program: str,
        ns: Namespace,
        keys: WgKeys,
        process: OwnedProcess,
        log_path: Path | None,
    ) -> None:
        self.lab = lab
        self.name = name
        self.program = program
        self.ns = ns  # where the daemon (and its UDP socket) runs
        self.link_ns = ns  # where the network interface currently is
        self.keys = keys
        self.process = process
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"WireGuard({self.name!r}, {Path(self.program).name}, ns={self.ns.name!r})"

    @property
    def socket(self) -> Path:
        return UAPI_DIR / f"{self.name}.sock"

    def configure(self, *, listen_port: int | None = None,
                  peers: Sequence[PeerConfig] = ()) -> None:
        """Replace the whole configuration (``wg setconf``) with this key, port and peers."""
        lines = ["[Interface]", f"PrivateKey = {self.keys.private}"]
        if listen_port is not None:
            lines.append(f"ListenPort = {listen_port}")
        for peer in peers:
            lines += ["", "[Peer]", f"PublicKey = {peer.public_key}"]
            if peer.preshared_key:
                lines.append(f"PresharedKey = {peer.preshared_key}")
            if peer.allowed_ips:
                lines.append(f"AllowedIPs = {', '.join(peer.allowed_ips)}")
            if peer.endpoint:
                lines.append(f"Endpoint = {peer.endpoint}")
            if peer.persistent_keepalive:
                lines.append(f"PersistentKeepalive = {peer.persistent_keepalive}")
        conf = self.lab.secret_file("\n".join(lines) + "\n")
        try:
            run(["wg", "setconf", self.name, str(conf)])
        finally:
            conf.unlink()

    def set(self, *args: str) -> None:
        """``wg set IFACE ARGS`` for settings without secrets (ports, endpoints, IPs)."""
        run(["wg", "set", self.name, *args])

    def set_peer(self, peer: PeerConfig) -> None:
        """Add or update one peer; the preshared key goes through a 0600 file."""
        args = ["peer", peer.public_key]
        psk = self.lab.secret_file(peer.preshared_key + "\n") if peer.preshared_key else None
        if psk:
            args += ["preshared-key", str(psk)]
        if peer.allowed_ips:
            args += ["allowed-ips", ",".join(peer.allowed_ips)]
        if peer.endpoint:
            args += ["endpoint", peer.endpoint]
        if peer.persistent_keepalive:
            args += ["persistent-keepalive", str(peer.persistent_keepalive)]
        try:
            self.set(*args)
        finally:
            if psk:
                psk.unlink()

    def status(self) -> InterfaceStatus:
        """The parsed ``wg show IFACE dump``."""
        return parse_dump(run(["wg", "show", self.name, "dump"]).stdout)

    def peer(self, public_key: str) -> PeerStatus:
        """The status of one peer."""
        peers = self.status().peers
        if public_key not in peers:
            raise NetnsError(f"{self.name}: no peer {public_key}")
        return peers[public_key]

    def wait_handshake(self, public_key: str, timeout: float = 15.0) -> PeerStatus:
        """Wait until the peer reports a completed handshake; return its status. The
        default outlasts two lost initiations: each retry comes REKEY_TIMEOUT (5 s, plus
        jitter) after the one before."""

        def done() -> PeerStatus | None:
            peer = self.peer(public_key)
            return peer if peer.latest_handshake else None

        return poll(done, what=f"{self.name}: handshake with {public_key}", timeout=timeout)

    def add_address(self, *cidrs: str) -> None:
        """Add inner addresses to the interface (in whichever namespace it is now)."""
        for cidr in cidrs:
            self.link_ns.add_address(self.name, cidr)

    def up(self) -> None:
        """Bring the interface up."""
        self.link_ns.link_up(self.name)

    def move_to(self, ns: Namespace) -> None:
        """Move the interface to ``ns``; the daemon and its UDP socket stay where they are."""
        self.link_ns.ip("link", "set", self.name, "netns", ns.name)
        self.link_ns = ns

    def alive(self) -> bool:
        """Whether the daemon process is still running."""
        return self.process.alive()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the daemon wrote, for error messages."""
        return tail(self.log_path, lines) if self.log_path else "(no log)"


def socket_owner(ns: Namespace, socket_path: Path) -> int | None:
    """PID of the process in ``ns`` holding the listening unix socket ``socket_path``."""
    wanted = str(socket_path)
    for pid in ns.pids():
        try:
            inodes = {
                line.split()[6]
                for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
                if line.split()[-1] == wanted
            }
            fds = Path(f"/proc/{pid}/fd")
            held = {os.readlink(fd) for fd in fds.iterdir()}
        except (FileNotFoundError, ProcessLookupError):
            continue
        if any(f"socket:[{inode}]" in held for inode in inodes):
            return pid
    return None
