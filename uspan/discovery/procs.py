"""Processes for system tests and benchmarks: the service and a throwaway etcd, on
loopback, on free ports, each stopped by its own PID (never by name).
Readiness is polled (a connection, an HTTP answer), never assumed after a sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

from uspan import userpaths
from uspan.testbed import poll

ETCD = "/usr/bin/etcd"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


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


class ServiceProcess(_Process):
    """``uspan discovery-service`` with extra flags."""

    def __init__(self, workdir: Path, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.flags = list(flags)
        self.log = workdir / f"service-{self.port}.log"

    def start(self, timeout: float = 15.0) -> ServiceProcess:
        argv = [userpaths.program("uspan"), "discovery-service", "--listen", self.address,
                *self.flags]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        poll(self._ready, what=f"discovery service on {self.address}", timeout=timeout)
        return self

    def _ready(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"discovery service exited:\n{self.log_tail()}")
        return _connectable(self.port)


class EtcdProcess(_Process):
    """A single-member etcd on loopback with its data in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.data = workdir / "etcd-data"
        self.log = workdir / "etcd.log"

    def start(self, timeout: float = 30.0) -> EtcdProcess:
        if not os.access(ETCD, os.X_OK):
            raise RuntimeError(f"{ETCD} is missing (apt-get install etcd-server)")
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
        return self

    def _healthy(self) -> bool:
        if not self.alive():
            raise RuntimeError(f"etcd exited:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                return b'"true"' in response.read()
        except OSError:
            return False
