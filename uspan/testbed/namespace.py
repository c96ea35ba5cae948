"""Network namespaces and veth links of a testbed."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from uspan.testbed.process import OwnedProcess, poll, run, start_time

if TYPE_CHECKING:
    from uspan.testbed.lab import Lab


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
        self.lab._processes.append(OwnedProcess(proc.pid, start_time(proc.pid), proc))
        return proc

    def pids(self) -> list[int]:
        """PIDs of all processes inside this namespace."""
        out = run(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split()]

    def wait_listening(self, port: int, *, udp: bool = False, timeout: float = 20.0) -> None:
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
