"""Real network topologies on one machine: namespaces, veth links and WireGuard daemons.

A ``Lab`` owns everything it creates — uniquely named namespaces, the processes it
started (including daemonized WireGuard children, found as the owner of their UAPI
socket), UAPI sockets and extra files — and removes all of it in ``close()``, which the
context manager calls even when the body fails. Works with any implementation that
follows the ``wireguard-go`` launch contract (``PROG [-f] IFACE``), driven by ``wg``.

Private keys only ever travel through files of mode 0600 in the lab's private
directory; they never appear on a command line, in a log or in an exception.
Addresses used here belong only to namespaces the lab created.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TypeVar

UAPI_DIR = Path("/var/run/wireguard")
T = TypeVar("T")


class NetnsError(RuntimeError):
    """A lab operation failed; the message names the command or object involved."""


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = 20.0,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; on failure raise ``NetnsError`` naming the command and its stderr."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)}: no exit within {timeout}s") from e
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


def poll(
    probe: Callable[[], T | None],
    *,
    what: str,
    timeout: float = 5.0,
    interval: float = 0.02,
) -> T:
    """Call ``probe`` until it returns something other than None/False; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- keys -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A WireGuard key pair, base64 as ``wg`` prints it; ``repr`` hides the private key."""

    private: str = field(repr=False)
    public: str


def genkey() -> KeyPair:
    """A fresh key pair from ``wg genkey``/``wg pubkey`` (the key travels on stdin only)."""
    private = run(["wg", "genkey"]).stdout.strip()
    return KeyPair(private, run(["wg", "pubkey"], input=private + "\n").stdout.strip())


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


# --- processes --------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _start_time(pid: int) -> str | None:
    """The kernel start time of ``pid`` (to tell it apart from a reused PID), or None."""
    fields = _stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, start: str | None) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and start in (None, fields[19])


@dataclass(slots=True)
class _Owned:
    """A process the lab started or adopted; killed only while its identity holds."""

    pid: int
    start: str | None
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return _alive(self.pid, self.start)

    def stop(self, grace: float = 3.0) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(grace)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(grace)
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _alive(self.pid, self.start):
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + grace
            while _alive(self.pid, self.start) and time.monotonic() < deadline:
                time.sleep(0.02)
        if _alive(self.pid, self.start):
            raise NetnsError(f"pid {self.pid} survived SIGKILL for {grace}s")


# --- namespaces and links ---------------------------------------------------------------


class Namespace:
    """A network namespace created by a ``Lab``."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def run(
        self, *argv: str, input: str | None = None, timeout: float = 20.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this namespace (``ip netns exec``)."""
        return run(
            ["ip", "netns", "exec", self.name, *argv], input=input, timeout=timeout, check=check
        )

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``ip -n NAME ARGS``."""
        return run(["ip", "-n", self.name, *args], check=check)

    def spawn(
        self,
        *argv: str,
        stdin: int = subprocess.DEVNULL,
        stdout: int = subprocess.DEVNULL,
        stderr: int = subprocess.DEVNULL,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a background command in this namespace; the lab stops it on close."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
        self.lab._processes.append(_Owned(proc.pid, _start_time(proc.pid), proc))
        return proc

    def pids(self) -> list[int]:
        """PIDs of all processes inside this namespace."""
        out = run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split()]

    def wait_listening(self, port: int, *, udp: bool = False, timeout: float = 5.0) -> None:
        """Wait until something listens on ``port`` (TCP, or UDP with ``udp``)."""
        flags = "-Hulnp" if udp else "-Htlnp"

        def listening() -> bool:
            return bool(self.run("ss", flags, f"sport = :{port}", check=False).stdout.strip())

        poll(listening, what=f"port {port} listening in {self.name}", timeout=timeout)

    def link_up(self, dev: str, *, wait: bool = True, timeout: float = 5.0) -> None:
        """Set ``dev`` up and (with ``wait``) wait until the kernel reports it operational."""
        self.ip("link", "set", dev, "up")
        if wait:
            self.wait_up(dev, timeout)

    def wait_up(self, dev: str, timeout: float = 5.0) -> None:
        """Wait until ``dev`` has carrier (a veth only once both ends are up).

        Carrier is immediate; ``operstate`` follows up to a second later (linkwatch).
        """

        def up() -> bool:
            return self.run("cat", f"/sys/class/net/{dev}/carrier", check=False).stdout == "1\n"

        poll(up, what=f"{dev} up in {self.name}", timeout=timeout)

    def add_address(self, dev: str, cidr: str) -> None:
        """Add an address to ``dev``; IPv6 addresses skip duplicate address detection."""
        extra = ["nodad"] if ":" in cidr else []
        self.ip("addr", "add", cidr, "dev", dev, *extra)


@dataclass(frozen=True, slots=True)
class Veth:
    """A veth pair: ``a_dev`` in namespace ``a``, ``b_dev`` in namespace ``b``."""

    a: Namespace
    a_dev: str
    b: Namespace
    b_dev: str


# --- WireGuard --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
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
        keys: KeyPair,
        process: _Owned,
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

    def configure(self, *, listen_port: int | None = None, peers: Sequence[Peer] = ()) -> None:
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

    def set_peer(self, peer: Peer) -> None:
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

    def wait_handshake(self, public_key: str, timeout: float = 5.0) -> PeerStatus:
        """Wait until the peer reports a completed handshake; return its status."""

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
        return _tail(self.log_path, lines) if self.log_path else "(no log)"


# --- the lab ----------------------------------------------------------------------------


def _socket_owner(ns: Namespace, socket_path: Path) -> int | None:
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


class Lab:
    """Owner of a set of namespaces, links and daemons; ``close()`` removes them all."""

    def __init__(self, prefix: str = "usp") -> None:
        self.prefix = f"{prefix}{secrets.token_hex(3)}"
        self.namespaces: list[Namespace] = []
        self.interfaces: list[WireGuard] = []
        self._processes: list[_Owned] = []
        self._names: list[str] = []
        self._files: list[Path] = []
        self._dir = Path(tempfile.mkdtemp(prefix="uspan-lab-"))  # mode 0700

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(raise_errors=kind is None)

    def namespace(self, role: str) -> Namespace:
        """Create a namespace named ``PREFIX-ROLE`` with loopback up."""
        ns = Namespace(self, f"{self.prefix}-{role}")
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def veth(
        self, a: Namespace, b: Namespace, a_addrs: Sequence[str] = (), b_addrs: Sequence[str] = ()
    ) -> Veth:
        """Join ``a`` and ``b`` with a veth pair carrying the given addresses, both up."""
        link = Veth(a, f"v{secrets.token_hex(4)}", b, f"v{secrets.token_hex(4)}")
        a.ip("link", "add", link.a_dev, "type", "veth", "peer", "name", link.b_dev,
             "netns", b.name)  # fmt: skip
        for cidr in a_addrs:
            a.add_address(link.a_dev, cidr)
        for cidr in b_addrs:
            b.add_address(link.b_dev, cidr)
        a.link_up(link.a_dev, wait=False)
        b.link_up(link.b_dev)
        a.wait_up(link.a_dev)
        return link

    def bridge(self, nodes: Sequence[Namespace], addrs: Sequence[Sequence[str]]) -> list[Veth]:
        """A bridge namespace joining every node by a veth; node i gets ``addrs[i]``."""
        if len(addrs) != len(nodes):
            raise NetnsError(f"bridge: {len(nodes)} nodes but {len(addrs)} address lists")
        hub = self.namespace("br")
        hub.ip("link", "add", "br0", "type", "bridge")
        hub.link_up("br0")
        links = []
        for node, node_addrs in zip(nodes, addrs, strict=True):
            link = self.veth(hub, node, (), node_addrs)
            hub.ip("link", "set", link.a_dev, "master", "br0")
            links.append(link)
        return links

    def secret_file(self, text: str) -> Path:
        """Write ``text`` to a new mode-0600 file in the lab's private directory."""
        fd, path = tempfile.mkstemp(dir=self._dir, prefix="secret-")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(path)

    def remove_on_close(self, path: Path) -> None:
        """Delete ``path`` (if it exists) when the lab closes."""
        self._files.append(path)

    def interface_name(self) -> str:
        """A fresh interface name, reserved: its link and UAPI socket are removed on close."""
        while True:
            name = f"wg{secrets.token_hex(4)}"
            if not (UAPI_DIR / f"{name}.sock").exists() and name not in self._names:
                self._names.append(name)
                return name

    def start_wireguard(
        self,
        ns: Namespace,
        program: str,
        *,
        foreground: bool = False,
        log_level: str = "error",
        keys: KeyPair | None = None,
        timeout: float = 5.0,
        env: Mapping[str, str] | None = None,
    ) -> WireGuard:
        """Launch ``program [-f] IFACE`` in ``ns`` and wait for its UAPI socket.

        Without ``foreground`` the launcher must exit 0 after daemonizing, as with
        wireguard-go; the daemon is then found as the owner of the UAPI socket. ``env``
        adds to (or overrides) the inherited environment and ``LOG_LEVEL``.
        """
        if not os.access(program, os.X_OK):
            raise NetnsError(f"{program}: not an executable file")
        name = self.interface_name()
        log = self._dir / f"{name}.log"
        argv = [program, "-f", name] if foreground else [program, name]
        environment = {**os.environ, "LOG_LEVEL": log_level, **(env or {})}
        with log.open("wb") as out:
            launcher = ns.spawn(
                *argv, stdout=out.fileno(), stderr=subprocess.STDOUT, env=environment
            )
        owned = self._processes[-1]  # the launcher; in the foreground also the daemon
        socket_path = UAPI_DIR / f"{name}.sock"

        def started() -> bool:
            if socket_path.exists():
                return True
            if launcher.poll() is not None:
                raise NetnsError(
                    f"{program} {name}: exited {launcher.returncode} before creating "
                    f"{socket_path}; log:\n{_tail(log)}"
                )
            return False

        try:
            poll(started, what=f"{program} to create {socket_path}", timeout=timeout)
            if not foreground:
                try:
                    code = launcher.wait(timeout)
                except subprocess.TimeoutExpired as e:
                    raise NetnsError(f"{program} {name}: launcher did not daemonize") from e
                if code != 0:
                    raise NetnsError(f"{program} {name}: launcher exited {code}:\n{_tail(log)}")
            pid = poll(
                lambda: _socket_owner(ns, socket_path),
                what=f"the process serving {socket_path}",
                timeout=timeout,
            )
        except TimeoutError as e:
            raise NetnsError(f"{program} {name}: {e}; log:\n{_tail(log)}") from e
        process = owned
        if not foreground:
            process = _Owned(pid, _start_time(pid))
            self._processes.append(process)
        wg = WireGuard(self, name, program, ns, keys or genkey(), process, log)
        self.interfaces.append(wg)
        return wg

    def adopt_wireguard(
        self, ns: Namespace, name: str, program: str, keys: KeyPair, timeout: float = 5.0
    ) -> WireGuard:
        """Take ownership of a daemon someone else launched in ``ns`` (e.g. wg-quick)."""
        socket_path = UAPI_DIR / f"{name}.sock"
        pid = poll(
            lambda: _socket_owner(ns, socket_path),
            what=f"the process serving {socket_path}",
            timeout=timeout,
        )
        process = _Owned(pid, _start_time(pid))
        self._processes.append(process)
        wg = WireGuard(self, name, program, ns, keys, process, None)
        self.interfaces.append(wg)
        return wg

    def daemon_logs(self) -> str:
        """The tail of every daemon's log, for reports of failed tests."""
        return "\n".join(
            f"--- {wg.name} ({wg.program}) ---\n{wg.log_tail()}" for wg in self.interfaces
        )

    def close(self, raise_errors: bool = True) -> None:
        """Stop our processes, delete namespaces, sockets and files, even after failures."""
        errors: list[str] = []
        for process in reversed(self._processes):
            try:
                process.stop()
            except (OSError, subprocess.SubprocessError, NetnsError) as e:
                errors.append(f"stopping pid {process.pid}: {e}")
        for ns in self.namespaces:  # anything left inside our own namespaces is ours
            for pid in ns.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for name in self._names:
            (UAPI_DIR / f"{name}.sock").unlink(missing_ok=True)
        for ns in reversed(self.namespaces):
            done = run(["ip", "netns", "del", ns.name], check=False)
            if done.returncode != 0:
                errors.append(f"ip netns del {ns.name}: {done.stderr.strip()}")
        for path in self._files:
            path.unlink(missing_ok=True)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._processes.clear()
        self.namespaces.clear()
        self._names.clear()
        self._files.clear()
        if errors:
            message = "lab cleanup: " + "; ".join(errors)
            if raise_errors:
                raise NetnsError(message)
            print(message, file=sys.stderr)


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"
