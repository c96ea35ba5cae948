"""The kernel filter on real loopback sockets: a flagged source's mac2-less initiations
are dropped before the queue, a sample of the rest passes, the priority lane
all of its own, and everything else arrives."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from uspan.daemon import earlydrop
from uspan.daemon.udp import UdpBind
from uspan.wg.admission import MAX_TRUSTED, KernelFilter
from uspan.wg.endpoint import Endpoint

INITIATION = b"\x01\x00\x00\x00" + os.urandom(128) + bytes(16)  # no mac2
WITH_MAC2 = INITIATION[:-16] + b"\x01" * 16
TRANSPORT = b"\x04\x00\x00\x00" + bytes(40)
RESPONSE = b"\x02\x00\x00\x00" + os.urandom(72) + bytes(16)  # no mac2
COOKIE_REPLY = b"\x03\x00\x00\x00" + os.urandom(60)


@pytest.fixture(params=[socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
def family(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def sockets(family: int) -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    made = []
    try:
        for _ in range(3):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            made.append(sock)
            sock.bind((host, 0))
        made[0].settimeout(0.5)
        yield made[0], made[1], made[2]
    except OSError as exc:
        pytest.skip(f"no loopback for this family: {exc}")
    finally:
        for sock in made:
            sock.close()


def arrives(receiver: socket.socket, sender: socket.socket, data: bytes) -> bool:
    """Send ``data``, then a marker; True if ``data`` is what arrives first."""
    marker = b"marker" + os.urandom(4)
    sender.sendto(data, receiver.getsockname())
    sender.sendto(marker, receiver.getsockname())
    first = receiver.recv(4096)
    if first != marker:
        assert receiver.recv(4096) == marker
    return first == data


def endpoint(sock: socket.socket) -> Endpoint:
    host, port = sock.getsockname()[:2]
    return Endpoint(host, port)


def attach(receiver: socket.socket, *, flagged: list[Endpoint] | None = None,
           lane: list[Endpoint] | None = None, keep: float = 1.0) -> None:
    rules = KernelFilter(flagged or [], lane or [], keep)
    earlydrop.attach(receiver, earlydrop.program(receiver.family, rules))


def flag(receiver: socket.socket, *senders: socket.socket) -> None:
    attach(receiver, flagged=[endpoint(sender) for sender in senders])


def test_flagged_source_loses_only_its_mac2_less_initiations(sockets) -> None:
    receiver, flagged, other = sockets
    flag(receiver, flagged)
    assert not arrives(receiver, flagged, INITIATION)
    assert arrives(receiver, flagged, WITH_MAC2)
    assert arrives(receiver, flagged, RESPONSE[:-16] + b"\x01" * 16)
    assert arrives(receiver, flagged, TRANSPORT)
    assert arrives(receiver, flagged, COOKIE_REPLY)
    assert arrives(receiver, flagged, b"\x02" + INITIATION[1:])  # a type-2 of 148 bytes
    assert arrives(receiver, flagged, INITIATION[:-1])  # not an initiation: the core counts it
    assert arrives(receiver, other, INITIATION)
    assert arrives(receiver, other, RESPONSE)


def test_a_flagged_sources_responses_pass(sockets) -> None:
    """A response may answer our own initiation (the core serves it by receiver index,
    whoever flagged its source): the kernel passes it, and drops only the initiations."""
    receiver, flagged, _ = sockets
    for keep in (1.0, 0.0):
        attach(receiver, flagged=[endpoint(flagged)], keep=keep)
        assert arrives(receiver, flagged, RESPONSE)
        assert not arrives(receiver, flagged, INITIATION)


def test_detach_lets_everything_through_again(sockets) -> None:
    receiver, flagged, _ = sockets
    flag(receiver, flagged)
    earlydrop.detach(receiver)
    assert arrives(receiver, flagged, INITIATION)
    earlydrop.detach(receiver)  # none attached: no error


def test_the_most_sources_fit(sockets) -> None:
    receiver, flagged, peer = sockets
    host = endpoint(flagged).host
    lane = [Endpoint(host, port) for port in range(1, MAX_TRUSTED)]
    flags = [Endpoint(host, port) for port in range(100, 99 + earlydrop.MAX_SOURCES)]
    earlydrop.install(receiver, KernelFilter([endpoint(flagged), *flags],
                                             [endpoint(peer), *lane], 0.0))
    assert not arrives(receiver, flagged, INITIATION)
    assert arrives(receiver, peer, INITIATION)


def test_a_sample_of_the_unflagged_initiations_passes(sockets) -> None:
    receiver, sender, _ = sockets
    attach(receiver, keep=0.0)
    assert not arrives(receiver, sender, INITIATION)
    assert arrives(receiver, sender, WITH_MAC2)
    assert arrives(receiver, sender, TRANSPORT)
    assert arrives(receiver, sender, RESPONSE)  # never sampled: it answers our initiation
    attach(receiver, keep=0.5)
    passed = sum(arrives(receiver, sender, INITIATION) for _ in range(200))
    assert 60 < passed < 140


def test_the_lane_passes_whole_while_the_rest_is_sampled(sockets) -> None:
    receiver, peer, other = sockets
    attach(receiver, lane=[endpoint(peer)], flagged=[endpoint(peer)], keep=0.0)
    assert all(arrives(receiver, peer, INITIATION) for _ in range(20))  # the lane first
    assert arrives(receiver, peer, RESPONSE)
    assert not arrives(receiver, other, INITIATION)
    wrong_port = Endpoint(endpoint(peer).host, endpoint(other).port + 1)
    attach(receiver, lane=[wrong_port], keep=0.0)
    assert not arrives(receiver, peer, INITIATION)


def test_a_source_is_the_lanes_only_if_all_of_its_address_matches(sockets) -> None:
    """Only the address's last word is compared first: a source that shares it (and the
    port) but differs before is not in the lane."""
    receiver, peer, _ = sockets
    port = endpoint(peer).port
    near = "10.0.0.1" if receiver.family == socket.AF_INET else "2001:db8::1"  # ::1's last
    attach(receiver, lane=[Endpoint(near, port)], keep=0.0)
    assert not arrives(receiver, peer, INITIATION)
    attach(receiver, lane=[Endpoint(near, port), endpoint(peer)], keep=0.0)
    assert arrives(receiver, peer, INITIATION)


def test_an_endpoint_out_of_the_lane_is_sampled_but_keeps_its_responses(sockets) -> None:
    """An abused lane endpoint (a spoofer repeats its initiations) leaves the lane; the
    real peer's responses to our initiations must still reach the core."""
    receiver, peer, other = sockets
    attach(receiver, lane=[endpoint(other)], keep=0.0)
    assert not arrives(receiver, peer, INITIATION)
    assert arrives(receiver, peer, RESPONSE)
    assert arrives(receiver, peer, WITH_MAC2)


def test_the_largest_filter_replaces_the_old_one_in_one_step(
        sockets, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replacing a filter charges the old and the new together: each is sized to fit
    beside the other (flagged sources give way first), so the socket is never left
    without one, and the lane and the sample hold on any kernel."""
    receiver, peer, other = sockets
    host = endpoint(other).host
    lane = [endpoint(peer), *(Endpoint(host, port) for port in range(1, MAX_TRUSTED))]
    flags = [Endpoint(host, port) for port in range(100, 100 + earlydrop.MAX_SOURCES)]

    def unfiltered(sock: socket.socket) -> None:
        raise AssertionError("the socket was left without a filter")

    monkeypatch.setattr(earlydrop, "detach", unfiltered)
    for keep in (0.0, 0.5, 0.0):  # each replaces a filter as big
        earlydrop.install(receiver, KernelFilter(flags, lane, keep))
    assert arrives(receiver, peer, INITIATION)
    assert not arrives(receiver, other, INITIATION)  # flagged, or else sampled away


def test_a_filter_too_big_for_the_option_memory_sheds_sources_not_the_sample(
        sockets, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the kernel refuses a filter all the same, sources give way from the end (the
    lane's last), down to the sample alone."""
    receiver, peer, other = sockets
    sizes = []

    def tight(sock: socket.socket, code: list[earlydrop.Instruction]) -> None:
        sizes.append(len(code))
        if len(code) > 100:
            raise OSError(errno.ENOMEM, "optmem_max")
        real(sock, code)

    real = earlydrop.attach
    monkeypatch.setattr(earlydrop, "attach", tight)
    host = endpoint(other).host
    lane = [endpoint(peer), *(Endpoint(host, port) for port in range(1, MAX_TRUSTED))]
    earlydrop.install(receiver, KernelFilter([endpoint(other)], lane, 0.0))
    assert sizes[-1] <= 100 < sizes[0]
    assert arrives(receiver, peer, INITIATION)
    assert not arrives(receiver, other, INITIATION)
    monkeypatch.setattr(earlydrop, "attach", lambda sock, code: tight(sock, code * 100))
    with pytest.raises(OSError):
        earlydrop.install(receiver, KernelFilter([], lane, 0.0))
    assert not arrives(receiver, other, INITIATION)  # the old filter stays


OPTMEM_MAX_BEFORE_6_9 = 20480


@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare")
def test_everything_here_under_the_optmem_max_of_kernels_before_6_9() -> None:
    """These tests again, in a network namespace of our own whose optmem_max (a
    per-namespace sysctl) is what kernels before 6.9 have by default."""
    if os.environ.get("USPAN_OPTMEM_MAX"):
        pytest.skip("already inside")
    if subprocess.run(["unshare", "-Urn", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged user and network namespaces")
    script = (f"echo {OPTMEM_MAX_BEFORE_6_9} > /proc/sys/net/core/optmem_max"
              ' && ip link set lo up && exec "$@"')
    run = subprocess.run(
        ["unshare", "-Urn", "sh", "-c", script, "sh", sys.executable, "-m", "pytest", "-q",
         "-p", "no:cacheprovider", __file__], cwd=Path(__file__).parents[2],
        env={**os.environ, "USPAN_OPTMEM_MAX": str(OPTMEM_MAX_BEFORE_6_9)},
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " skipped" in run.stdout  # this one, inside


def test_the_backlog_is_how_full_the_receive_queue_is() -> None:
    """What the core's sample follows (``Admission.backlog``): the queued bytes over the
    receive buffer, read from the kernel, back to 0 once drained."""
    bind = UdpBind.open(0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert bind.backlog() == 0.0
        fills = []
        for _ in range(2):
            for _ in range(100):  # (a default 208 KiB buffer holds ~160 of them)
                sender.sendto(INITIATION, ("127.0.0.1", bind.port))
            fills.append(bind.backlog())
        assert 0.0 < fills[0] < fills[1] <= 1.0
        for udp in bind.sockets:
            while udp.receive_batch():
                pass
        assert bind.backlog() == 0.0
    finally:
        sender.close()
        bind.close()


def test_the_socket_drops_count_the_filters_drops() -> None:
    """``uspan stats`` shows the socket's drops (``udp_socket_drops``): the sample's and a
    full queue's, which nothing else on the node counts."""
    bind = UdpBind.open(0)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert bind.socket_drops == 0
        bind.drop_unproven(KernelFilter([], [], 0.0))
        for _ in range(20):
            sender.sendto(INITIATION, ("127.0.0.1", bind.port))
        sender.sendto(TRANSPORT, ("127.0.0.1", bind.port))
        assert bind.socket_drops == 20
    finally:
        sender.close()
        bind.close()
