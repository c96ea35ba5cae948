"""The plane thread's gate (``set_gate``/``gate_take``, uspan/csrc/plane_gate.c): handshake
messages judged in the thread as the core's plan says, on a real loopback socket. A
bad mac1 is dropped there, not punted; under load the unproven initiations go up while
``hand_up`` allows, then get cookie replies made in the thread (they open at the
initiator), then are dropped; the lane always goes up; what the thread did since the
last collect counts against a new plan; and the core is asked (urgent news) once a
budget runs out. Before, every handshake message went up through the punt ring and a
spoofed flood cost the core ~0.6 CPU seconds a second (tests/system/test_flood.py)."""

from __future__ import annotations

import ctypes.util
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.planekit import MTU, Plane, _plane
from tests.unit.test_gate import COOKIE_KEY, MAC1_KEY, PUBLIC, SECRET, proven_retry
from tests.unit.test_gate import _initiation as initiation
from uspan.wg.cookie import CookieGenerator
from uspan.wg.verdict import lane_records


def _initiation(generator: CookieGenerator) -> bytes:
    return initiation(generator, 1.0)


def _bad_mac1() -> bytes:
    body = bytearray(_initiation(CookieGenerator(PUBLIC)))
    body[116] ^= 1
    return bytes(body)


class Gated:
    """A started plane (a SOCK_SEQPACKET pair for a TUN) on one loopback UDP socket."""

    def __init__(self) -> None:
        self.inner, self.outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.address = self.udp.getsockname()
        self.plane = Plane(self.inner.fileno(), [self.udp.fileno()], MTU)
        self.plane.start()
        self.senders: list[socket.socket] = []

    def sender(self) -> socket.socket:
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender.bind(("127.0.0.1", 0))
        sender.settimeout(2.0)
        self.senders.append(sender)
        return sender

    def send(self, sender: socket.socket, datagrams: list[bytes]) -> None:
        """Send and wait until the thread has judged them all: a datagram too short to be
        anything follows them, and it is counted (bad_length) as the thread's step reaches
        it, after those before it. (udp_reads is counted before the step: a thread
        preempted between the two had not punted or counted them yet.)"""
        before = self.plane.counters()["bad_length"]
        for datagram in datagrams:
            sender.sendto(datagram, self.address)
        sender.sendto(b"\1", self.address)
        deadline = time.monotonic() + 5.0
        while self.plane.counters()["bad_length"] == before:
            assert time.monotonic() < deadline, self.plane.counters()
            time.sleep(0.002)

    def punted(self) -> list[bytes]:
        return [data for _, _, data, _ in self.plane.collect()[1]]

    def urgent(self) -> bool:
        """Whether the eventfd holds urgent news (without taking it)."""
        if not select.select([self.plane.fileno()], [], [], 0.5)[0]:
            return False
        value = int.from_bytes(os.read(self.plane.fileno(), 8), "little")
        os.write(self.plane.fileno(), value.to_bytes(8, "little"))
        return value >= _plane.NEWS_URGENT

    def close(self) -> None:
        self.plane.close()
        for sock in (self.inner, self.outer, self.udp, *self.senders):
            sock.close()


@pytest.fixture
def gated() -> Iterator[Gated]:
    g = Gated()
    try:
        yield g
    finally:
        g.close()


def _plan(under_load: bool = False, hand_up: int = 0, cookies: int = 0,
          lane: bytes = b"", secret: bytes | None = SECRET) -> tuple[object, ...]:
    return (MAC1_KEY, COOKIE_KEY, secret, under_load, hand_up, cookies, lane)


def test_without_a_plan_every_handshake_message_goes_up(gated: Gated) -> None:
    sender = gated.sender()
    sent = [_bad_mac1(), _initiation(CookieGenerator(PUBLIC))]
    gated.send(sender, sent)
    assert gated.punted() == sent
    assert gated.plane.gate_take() == (0, 0, 0, 0, 0, 0)


def test_a_calm_plan_drops_bad_mac1_and_passes_the_rest(gated: Gated) -> None:
    gated.plane.set_gate(*_plan())
    sender = gated.sender()
    good = [_initiation(CookieGenerator(PUBLIC)) for _ in range(3)]
    gated.send(sender, [_bad_mac1(), good[0], _bad_mac1(), good[1], good[2]])
    assert gated.punted() == good
    assert gated.plane.gate_take() == (2, 0, 0, 0, 0, 0)
    assert gated.plane.gate_take() == (0, 0, 0, 0, 0, 0)  # taken once
    gated.plane.set_gate()  # off again: all go up
    bad = _bad_mac1()
    gated.send(sender, [bad])
    assert gated.punted() == [bad]


def test_under_load_hand_up_then_cookies_that_open_then_drops(gated: Gated) -> None:
    """Of five unproven initiations: two go up, two get a cookie reply made in the
    thread (sealed for the sender's address, bound to its message's mac1: the
    initiator's retry then carries a valid mac2), one is dropped."""
    gated.plane.set_gate(*_plan(under_load=True, hand_up=2, cookies=2))
    sender = gated.sender()
    generator = CookieGenerator(PUBLIC)
    sent = [_initiation(generator) for _ in range(5)]
    gated.send(sender, sent)
    assert gated.punted() == sent[:2]
    assert gated.plane.gate_take() == (0, 2, 2, 1, 0, 0)
    replies = [sender.recv(100) for _ in range(2)]
    assert [r[4:8] for r in replies] == [m[4:8] for m in sent[2:4]]
    retry = proven_retry(generator, replies[0], sent[2], sender)
    gated.send(sender, [retry])  # proven: goes up with no budget left
    assert gated.punted() == [retry]


def test_no_fresh_secret_means_no_cookie(gated: Gated) -> None:
    gated.plane.set_gate(*_plan(under_load=True, cookies=5, secret=None))
    sender = gated.sender()
    gated.send(sender, [_initiation(CookieGenerator(PUBLIC))])
    assert gated.punted() == []
    assert gated.plane.gate_take() == (0, 0, 0, 1, 0, 0)


def test_the_lane_always_goes_up(gated: Gated) -> None:
    sender = gated.sender()
    port = sender.getsockname()[1]
    lane = lane_records([socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big")])
    gated.plane.set_gate(*_plan(under_load=True, lane=lane))
    sent = [_initiation(CookieGenerator(PUBLIC)) for _ in range(3)]
    gated.send(sender, sent)
    assert gated.punted() == sent
    assert gated.plane.gate_take() == (0, 0, 0, 0, 0, 0)
    other = gated.sender()  # the same address, another port: not the lane's
    gated.send(other, [sent[0]])
    assert gated.punted() == []
    assert gated.plane.gate_take() == (0, 0, 0, 1, 0, 0)


def test_what_was_done_since_the_last_collect_counts_against_a_new_plan(
        gated: Gated) -> None:
    """The core plans from its tokens after judging what it collected; what the thread
    handed up or answered since is not in them, so it is taken off the new budgets."""
    gated.plane.set_gate(*_plan(under_load=True, hand_up=3, cookies=3))
    sender = gated.sender()
    gated.send(sender, [_initiation(CookieGenerator(PUBLIC)) for _ in range(2)])
    gated.plane.set_gate(*_plan(under_load=True, hand_up=3, cookies=1))  # not collected
    gated.send(sender, [_initiation(CookieGenerator(PUBLIC)) for _ in range(4)])
    assert len(gated.punted()) == 3  # 3 - 2 since the collect: one more went up
    assert gated.plane.gate_take() == (0, 3, 1, 2, 0, 0)


def test_a_collect_short_of_memory_hands_over_each_initiation_once() -> None:
    """collect moved every handed-up initiation's count to gate_take before building the
    punts; one short of memory left some punts in the ring, their counts taken: a plan
    made then offered their tokens again (more went up than the core allowed), and
    gate_take reported them before the core had them. Now a count goes with its punt.
    Every allocation of the collect in turn fails here (the steps run synchronously)."""
    _testcapi = pytest.importorskip("_testcapi")
    source = (b"\x7f\x00\x00\x01", 40001)
    partial = 0
    nothing: list[Any] = []  # made before: the except clause runs with allocations failing
    for fail_at in range(40):
        plane = Plane(-1, [], MTU)
        try:
            plane.set_gate(*_plan(under_load=True, hand_up=3))
            first = [_initiation(CookieGenerator(PUBLIC)) for _ in range(3)]
            plane._udp_step([(m, *source) for m in first], 0)
            _testcapi.set_nomemory(fail_at, 0)
            try:
                punts = plane.collect()[1]
            except MemoryError:
                punts = nothing  # before anything left the plane
            finally:
                _testcapi.remove_mem_hooks()
            got = [data for _, _, data, _ in punts]
            assert got == first[:len(got)], fail_at
            partial += 0 < len(got) < 3
            assert plane.gate_take()[1] == len(got), fail_at  # the core has judged these
            plane.set_gate(*_plan(under_load=True, hand_up=3))  # the core's tokens: 3
            more = [_initiation(CookieGenerator(PUBLIC)) for _ in range(3)]
            plane._udp_step([(m, *source) for m in more], 0)
            rest = [data for _, _, data, _ in plane.collect()[1]]
            assert rest == first[len(got):] + more[:len(got)], fail_at  # 3 up, not more
            assert plane.gate_take()[1] == 3, fail_at
        finally:
            plane.close()
    assert partial


def test_a_spent_budget_asks_the_core_once(gated: Gated) -> None:
    gated.plane.set_gate(*_plan(under_load=True, hand_up=0, cookies=1))
    gated.plane.collect()
    sender = gated.sender()
    gated.send(sender, [_initiation(CookieGenerator(PUBLIC))])
    assert gated.urgent()  # the last cookie: a new plan is due
    gated.plane.collect()
    gated.send(sender, [_initiation(CookieGenerator(PUBLIC)) for _ in range(3)])
    assert not gated.urgent()  # asked already: not again until a new plan
    gated.plane.set_gate(*_plan(under_load=True, hand_up=0, cookies=0))
    gated.send(sender, [_initiation(CookieGenerator(PUBLIC))])
    assert gated.urgent()
    assert gated.plane.collect()[1] == []
    assert gated.plane.gate_take() == (0, 0, 1, 4, 0, 0)


def test_a_calm_plan_asks_after_a_run_of_bad_mac1(gated: Gated) -> None:
    """A calm plan's core counts the load from what it judges; bad mac1s dropped in the
    thread reach it when enough of them came (a flood of them turns the load on)."""
    gated.plane.set_gate(*_plan())
    gated.plane.collect()
    sender = gated.sender()
    bad = _bad_mac1()
    gated.send(sender, [bad] * 127)
    assert not gated.urgent()
    gated.send(sender, [bad])
    assert gated.urgent()
    gated.plane.collect()
    assert gated.plane.gate_take() == (128, 0, 0, 0, 0, 0)


def test_a_bad_plan_is_refused() -> None:
    plane = Plane(-1, [], MTU)
    try:
        with pytest.raises(ValueError, match="32 bytes"):
            plane.set_gate(b"short", COOKIE_KEY, None, False, 0, 0, b"")
        with pytest.raises(ValueError, match="lane"):
            plane.set_gate(MAC1_KEY, COOKIE_KEY, None, True, 0, 0, bytes(20))
        with pytest.raises(TypeError):
            plane.set_gate(MAC1_KEY)
    finally:
        plane.close()


def test_key_material_of_a_plan_is_not_kept_past_it() -> None:
    """A plan without a fresh secret (the core's secret expired) left the last one in
    the plane, where a plan of none (``set_gate()``) or close would cleanse it. The
    plane's own memory (its struct holds the gate) is searched for the bytes."""
    plane = Plane(-1, [], MTU)

    def held() -> bytes:
        return ctypes.string_at(id(plane), type(plane).__basicsize__)

    try:
        plane.set_gate(*_plan(under_load=True, cookies=1))
        assert SECRET in held() and MAC1_KEY in held()  # what the search can see
        plane.set_gate(*_plan(under_load=True, secret=None))
        assert SECRET not in held()
        plane.set_gate()
        assert MAC1_KEY not in held() and COOKIE_KEY not in held()
    finally:
        plane.close()


def test_an_overflow_of_the_ring_is_counted_apart(gated: Gated) -> None:
    """A calm plan's flood of valid initiations fills the punt ring before the core sees
    a load; what finds no room is counted apart, for the core's load."""
    gated.plane.set_gate(*_plan())
    sender = gated.sender()
    message = _initiation(CookieGenerator(PUBLIC))
    for _ in range(13):  # 260, in steps the socket's buffer holds
        gated.send(sender, [message] * 20)
    assert len(gated.punted()) == 256  # the ring's slots
    assert gated.plane.gate_take() == (0, 0, 0, 0, 0, 4)


# RAND_bytes failing while the file $USPAN_TEST_RAND_FAILS exists, else OpenSSL's (from
# $USPAN_TEST_LIBCRYPTO: loaded by the extension, outside the global scope RTLD_NEXT sees).
_FAILING_RAND = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>
int
RAND_bytes(unsigned char *buf, int num)
{
    static int (*real)(unsigned char *, int);
    const char *flag = getenv("USPAN_TEST_RAND_FAILS");
    if (flag && access(flag, F_OK) == 0)
        return 0;
    if (!real) {
        void *crypto = dlopen(getenv("USPAN_TEST_LIBCRYPTO"), RTLD_LAZY | RTLD_NOLOAD);
        if (!crypto)
            abort();
        real = (int (*)(unsigned char *, int))dlsym(crypto, "RAND_bytes");
    }
    return real(buf, num);
}
"""

_AFTER_A_FAILED_DRAW = """
import os
from tests.unit.test_gate import PUBLIC
from tests.unit.test_plane_gate import Gated, _initiation, _plan
from uspan.wg.cookie import CookieGenerator
gated = Gated()  # the first draw of nonces fails
os.unlink(os.environ["USPAN_TEST_RAND_FAILS"])  # and the next works
try:
    gated.plane.set_gate(*_plan(under_load=True, cookies=1))
    sender = gated.sender()
    gated.send(sender, [_initiation(CookieGenerator(PUBLIC))])
    assert sender.recv(100)[:1] == bytes([3]), "no cookie reply"
finally:
    gated.close()
"""


def test_cookie_replies_come_back_after_a_failed_draw_of_nonces(tmp_path: Path) -> None:
    """A draw of the 32 nonces that fails (RAND_bytes) leaves them all used; only a
    flush, after a reply made, drew again, and with no nonce no reply is made: the
    thread never answered a cookie again, every unproven initiation past hand_up was
    dropped. Now a reply with none left draws again. In a child process, with
    RAND_bytes interposed to fail while a file exists (plane_init's draw here)."""
    cc, libcrypto = shutil.which("cc"), ctypes.util.find_library("crypto")
    if cc is None or libcrypto is None:
        pytest.skip("no C compiler for the RAND_bytes shim, or no libcrypto")
    shim, flag = tmp_path / "failing_rand.so", tmp_path / "fail"
    (tmp_path / "failing_rand.c").write_text(_FAILING_RAND)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "failing_rand.c"),
                    "-ldl"], check=True)
    flag.touch()
    repo = Path(__file__).resolve().parents[2]
    preload = " ".join(filter(None, [os.environ.get("LD_PRELOAD"), str(shim)]))  # a
    # sanitizer's runtime first (scripts/sanitize-plane: the child loads its build too)
    env = {**os.environ, "LD_PRELOAD": preload, "USPAN_TEST_RAND_FAILS": str(flag),
           "USPAN_TEST_LIBCRYPTO": libcrypto, "PYTHONPATH": str(repo)}
    done = subprocess.run([sys.executable, "-c", _AFTER_A_FAILED_DRAW], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not flag.exists()  # the plane was made while the draw failed
