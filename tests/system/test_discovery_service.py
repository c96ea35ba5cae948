"""``uspan discovery-service`` as a process on loopback: crash safety with --state-file,
hostile clients, clean shutdown, the command line. Every process is ours, stopped by PID."""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

from uspan.discovery import protocol as p
from uspan.discovery.client import DiscoveryClient, DiscoveryError, Snapshot, Updated
from uspan.discovery.procs import ServiceProcess
from uspan.userpaths import program

pytestmark = pytest.mark.system

SECRET = os.urandom(32)
NO_LIMIT = ("--rate-limit", "100000/100000")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    """Services a test starts; all stopped (by PID) afterwards, logs shown on failure."""
    started: list[ServiceProcess] = []
    yield started
    for service in started:
        service.kill()
        print(f"--- {service.log}\n{service.log_tail()}")


def run(main: Callable[[], Awaitable[None]], timeout: float = 90) -> None:
    """trio.run with a deadline: a hang fails here, clearly, before pytest-timeout."""

    async def bounded() -> None:
        with trio.fail_after(timeout):
            await main()

    trio.run(bounded)


def start(services: list[ServiceProcess], tmp_path: Path, *flags: str,
          port: int | None = None) -> ServiceProcess:  # fmt: skip
    service = ServiceProcess(tmp_path, *flags, port=port)
    services.append(service)
    return service.start()


def client(*addresses: str) -> DiscoveryClient:
    return DiscoveryClient(list(addresses), "cluster", SECRET, backoff_min=0.02, attempts=1)


def test_kill_9_during_updates_loses_nothing_acknowledged(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    service = start(services, tmp_path, "--state-file", str(state), *NO_LIMIT)
    acknowledged: dict[str, bytes] = {}

    async def writer(n: int) -> None:
        async with client(service.address) as c:
            for i in range(100_000):
                aid, data = f"w{n}-{i}", os.urandom(16)
                try:
                    await c.update(aid, data, [("192.0.2.1", 1000 + i % 1000)], 600)
                except DiscoveryError:
                    return  # the service died under us
                acknowledged[aid] = data

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(4):  # concurrent writers share fsyncs (group commit)
                nursery.start_soon(writer, n)
            while len(acknowledged) < 300:
                await trio.sleep(0.005)
            os.kill(service.pid, signal.SIGKILL)

    run(main)
    assert service.process is not None and service.process.wait(10) == -signal.SIGKILL
    assert len(acknowledged) >= 300

    again = start(services, tmp_path, "--state-file", str(state), *NO_LIMIT)

    async def check() -> None:
        async with client(again.address) as c:
            found = {a.id: a.data for a in await c.list()}
        missing = [aid for aid in acknowledged if found.get(aid) != acknowledged[aid]]
        assert not missing, f"{len(missing)} acknowledged updates lost, e.g. {missing[:3]}"

    run(check)


def test_garbage_from_one_client_while_others_watch(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    service = start(services, tmp_path, *NO_LIMIT)
    host, port = service.address.rsplit(":", 1)
    rng = random.Random(6)
    payloads = [
        rng.randbytes(2000),
        b"\xff\xff\xff\xff" + rng.randbytes(100),
        struct.pack(">I", 100) + b"\x81",  # truncated, then closed
        p.encode({"op": "hello", "id": 1, "version": 1}) + p.encode({"op": "nope", "id": 2}),
        p.encode({"op": "hello", "id": 1, "version": 1})
        + p.encode({"op": "list", "id": 2, "cluster": "cluster", "key": bytes(32), "seq": 1,
                    "sig": bytes(64)}),  # a forged proof: refused, connection stays
    ]  # fmt: skip

    def hostile() -> None:
        for payload in payloads * 5:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass

    async def main() -> None:
        watcher = client(service.address)
        async with client(service.address) as writer, watcher, watcher.watch() as events:
            assert isinstance(await events.receive(), Snapshot)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, hostile)
                for i in range(50):
                    await writer.update(f"n{i}", b"x", [], 60)
                    event = await events.receive()
                    assert isinstance(event, Updated) and event.affiliate.id == f"n{i}"
            assert watcher.status.watch.connects == 1  # never disturbed
            assert len(await writer.list()) == 50  # nothing else stored

    run(main)
    assert service.alive()


def test_sigterm_saves_state_and_exits_0(services: list[ServiceProcess], tmp_path: Path) -> None:
    state = tmp_path / "state"
    service = start(services, tmp_path, "--state-file", str(state))

    async def write() -> None:
        async with client(service.address) as c:
            await c.update("n1", b"kept", [("2001:db8::1", 51820)], 60)

    run(write)
    assert service.stop() == 0
    again = start(services, tmp_path, "--state-file", str(state))

    async def read() -> None:
        async with client(again.address) as c:
            (one,) = await c.list()
            assert (one.data, one.endpoints) == (b"kept", (("2001:db8::1", 51820),))

    run(read)
    assert again.stop() == 0


def test_metrics(services: list[ServiceProcess], tmp_path: Path) -> None:
    metrics_port = ServiceProcess(tmp_path).port
    service = start(services, tmp_path, "--metrics", f"127.0.0.1:{metrics_port}")

    async def use() -> None:
        async with client(service.address) as c:
            await c.update("n1", b"x", [], 60)
            with pytest.raises(DiscoveryError):
                await c.update_blobs("n1", bytes(4000), [], 60)

    run(use)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "uspan_discovery_affiliates 1.0" in text
    assert 'uspan_discovery_refusals_total{reason="limit_data"} 1.0' in text
    assert 'uspan_discovery_requests_total{op="update"} 2.0' in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "nonsense"], "--listen"),
        (["--listen", "127.0.0.1:1", "--metrics", "x"], "--metrics"),
        (["--listen", "127.0.0.1:1", "--etcd", "localhost:2379"], "--etcd"),
        (["--listen", "127.0.0.1:1", "--rate-limit", "fast"], "--rate-limit"),
        (["--bogus"], "usage"),
    ],
)
def test_bad_arguments_print_usage(argv: list[str], message: str) -> None:
    done = subprocess.run([program("uspan"), "discovery-service", *argv],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2
    assert "usage:" in done.stderr and message in done.stderr


def test_listen_address_in_use_is_a_clear_error(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    service = start(services, tmp_path)
    done = subprocess.run([program("uspan"), "discovery-service", "--listen", service.address],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 1
    assert "in use" in done.stderr


def test_a_picked_port_taken_before_the_service_binds_it_is_picked_again(
    services: list[ServiceProcess], tmp_path: Path
) -> None:
    """Another test worker takes the free port picked for the service before the service
    binds it (here on purpose): the service starts on another, and its readiness is its
    own listener's, not the other's (which answered the readiness probe before)."""
    service = ServiceProcess(tmp_path)
    services.append(service)
    taken = service.port
    with socket.socket() as other:
        other.bind(("127.0.0.1", taken))
        other.listen()
        service.start()
        assert service.port != taken and service.alive()

        async def use() -> None:
            async with client(service.address) as c:
                await c.update("n1", b"x", [], 60)
                assert [a.id for a in await c.list()] == ["n1"]

        run(use, timeout=30)


def test_unusable_state_file_is_a_clear_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(b"not a snapshot")
    for path, message in ((tmp_path / "missing" / "state", "No such file"),
                          (corrupt, "snapshot")):  # fmt: skip
        done = subprocess.run([program("uspan"), "discovery-service", "--listen", "127.0.0.1:0",
                               "--state-file", str(path)], capture_output=True, text=True,
                              timeout=30)  # fmt: skip
        assert done.returncode == 1
        assert message in done.stderr and "Traceback" not in done.stderr
