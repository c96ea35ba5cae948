"""Processes for system tests and benchmarks: the service and a throwaway etcd, on
loopback, on free ports, each stopped by its own PID (never by name).
Readiness is polled (a listener, an HTTP answer), never assumed after a sleep.

A free port is free only when it is picked: another test worker, or any connection's
ephemeral port, may take it before the process binds it. So a process that could not
bind a port picked for it is started again on new ones (PORT_TRIES in all), and a
listener counts as ready only if it is this process's own (not another's that got the
port first).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

from uspan import userpaths
from uspan.testbed import poll

ETCD = "/usr/bin/etcd"
PORT_TRIES = 5


def bound_pair() -> tuple[socket.socket, socket.socket]:
    """A TCP and a UDP socket bound to one loopback port that was free for both (the UDP
    twin of a free TCP port may be another process's: then another port)."""
    for _ in range(20):
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(("127.0.0.1", tcp.getsockname()[1]))
        except OSError:
            tcp.close()
            udp.close()
            continue
        return tcp, udp
    raise RuntimeError("no loopback port free for both TCP and UDP")


def free_port() -> int:
    """A loopback port free right now for TCP and UDP both: the service listens on TCP and
    answers reflexive probes on UDP at the same port."""
    tcp, udp = bound_pair()
    with tcp, udp:
        return int(tcp.getsockname()[1])


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on TCP ``port``."""
    done = subprocess.run(["ss", "-Htlnp", f"sport = :{port}"], capture_output=True,
                          text=True, check=False)
    return f"pid={pid}," in done.stdout


class _PortTaken(RuntimeError):
    """The process exited because a port picked for it was taken meanwhile."""


class _Process:
    process: subprocess.Popen[bytes] | None = None
    log: Path

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9 and reap."""
        if self.alive():
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait; kill -9 if it did not exit. Returns the exit status."""
        if self.process is None:
            return None
        if self.alive():
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _exited(self, what: str, picked: bool) -> Exception:
        """Why the process is gone: a port picked for it taken (retry) or else."""
        tail = self.log_tail()
        if picked and "address already in use" in tail.lower():
            return _PortTaken(tail)
        return RuntimeError(f"{what} exited:\n{tail}")


class ServiceProcess(_Process):
    """``uspan discovery-service`` with extra flags."""

    def __init__(self, workdir: Path, *flags: str, port: int | None = None) -> None:
        self.workdir = workdir
        self.picked = port is None  # by free_port: another may be picked if it is taken
        self.flags = list(flags)
        self._use(port or free_port())

    def _use(self, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.log = self.workdir / f"service-{port}.log"

    def start(self, timeout: float = 15.0) -> ServiceProcess:
        for _ in range(PORT_TRIES - 1):
            try:
                return self._start(timeout)
            except _PortTaken:
                self._use(free_port())
        return self._start(timeout)

    def _start(self, timeout: float) -> ServiceProcess:
        argv = [userpaths.program("uspan"), "discovery-service", "--listen", self.address,
                *self.flags]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        poll(self._ready, what=f"discovery service on {self.address}", timeout=timeout,
             interval=0.05)
        return self

    def _ready(self) -> bool:
        if not self.alive():
            raise self._exited("discovery service", self.picked)
        return _listens(self.pid, self.port)


class EtcdProcess(_Process):
    """A single-member etcd on loopback with its data in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.data = workdir / "etcd-data"
        self.log = workdir / "etcd.log"
        self.started = False  # once it ran, it keeps its ports (its data names them)
        self._pick()

    def _pick(self) -> None:
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = 30.0) -> EtcdProcess:
        if not os.access(ETCD, os.X_OK):
            raise RuntimeError(f"{ETCD} is missing (apt-get install etcd-server)")
        for _ in range(PORT_TRIES - 1):
            try:
                return self._start(timeout)
            except _PortTaken:
                shutil.rmtree(self.data, ignore_errors=True)  # of ports it never served
                self._pick()
        return self._start(timeout)

    def _start(self, timeout: float) -> EtcdProcess:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            ETCD,
            "--name",
            "uspan-test",
            "--data-dir",
            str(self.data),
            "--listen-client-urls",
            self.url,
            "--advertise-client-urls",
            self.url,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"uspan-test={peer}",
            "--log-level",
            "warn",
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        poll(self._healthy, what=f"etcd on {self.url}", timeout=timeout, interval=0.1)
        self.started = True
        return self

    def _healthy(self) -> bool:
        if not self.alive():
            raise self._exited("etcd", not self.started)
        if not _listens(self.pid, self.client_port):
            return False
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                return b'"true"' in response.read()
        except OSError:
            return False
