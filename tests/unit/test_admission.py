"""Who gets work under load, on a fake clock: the budgets alone, then a device flooded
with valid-mac1 initiations while a real peer starts its first handshake."""

from __future__ import annotations

from tests.unit.wgnet import Net, Node, ipv4_packet
from uspan.testbed.flood import junk_initiation
from uspan.wg import crypto
from uspan.wg.admission import (
    FLAG_TIME,
    MAX_FLAGGED,
    MIN_KEEP,
    SAMPLE_TARGET,
    SAMPLE_WINDOW,
    Admission,
    Verdict,
)
from uspan.wg.constants import (
    COOKIES_PER_SECOND,
    HANDSHAKE_BURST,
    MSG_COOKIE_REPLY,
    MSG_RESPONSE,
    REKEY_TIMEOUT,
    SOURCE_INTERVAL,
    UNPROVEN_PER_SECOND,
)
from uspan.wg.cookie import mac1_key
from uspan.wg.drops import Drop
from uspan.wg.endpoint import Endpoint
from uspan.wg.ratelimit import RateLimiter

T0 = 1000.0
ATTACKER = [Endpoint("192.0.2.66", 40000 + i) for i in range(64)]


def source(i: int) -> Endpoint:
    return Endpoint(f"198.18.{i >> 8 & 255}.{i & 255}", 1024 + i)


def test_a_new_source_is_served_at_once() -> None:
    assert Admission().unproven(source(1), T0) is Verdict.PROCESS


def test_a_source_sending_again_too_soon_is_dropped_and_flagged() -> None:
    admission = Admission()
    admission.unproven(source(1), T0)
    version = admission.flag_version
    assert admission.unproven(source(1), T0 + 0.1) is Verdict.DROP
    assert admission.drop is Drop.SOURCE_LIMITED
    assert admission.flagged_sources(T0 + 0.1) == [source(1)]
    assert admission.flag_version == version + 1
    assert admission.busy_until == T0 + 0.1 + FLAG_TIME


def test_a_real_initiators_retry_is_served() -> None:
    admission = Admission()
    admission.unproven(source(1), T0)
    assert admission.unproven(source(1), T0 + SOURCE_INTERVAL) is Verdict.PROCESS


def test_flags_expire_and_are_bounded() -> None:
    admission = Admission()
    for i in range(MAX_FLAGGED + 10):
        admission.unproven(source(i), T0)
        admission.unproven(source(i), T0)
    assert len(admission.flagged_sources(T0)) == MAX_FLAGGED
    version = admission.flag_version
    assert admission.flagged_sources(T0 + FLAG_TIME) == []
    assert admission.flag_version == version + 1


def test_spoofed_sources_cost_at_most_the_budgets() -> None:
    """Every source new: full handshakes, then cookies, then nothing, each second."""
    admission = Admission()
    verdicts = [admission.unproven(source(i), T0) for i in range(5000)]
    assert verdicts.count(Verdict.PROCESS) == UNPROVEN_PER_SECOND
    assert verdicts.count(Verdict.COOKIE) == COOKIES_PER_SECOND
    assert admission.drop is Drop.COOKIE_LIMITED
    assert admission.unproven(source(9999), T0 + 1.01) is Verdict.PROCESS  # refilled


def test_a_spoofed_flood_is_sampled_down_and_the_sample_lifted_when_it_ends() -> None:
    admission = Admission()
    for i in range(25_000):  # a window of new sources, 100,000 a second
        admission.unproven(source(i), T0 + i * 1e-5)
    version = admission.flag_version
    admission.unproven(source(1 << 20), T0 + SAMPLE_WINDOW)  # the next window starts
    assert admission.keep <= SAMPLE_TARGET / 100_000 and admission.keep > MIN_KEEP
    assert admission.flag_version == version + 1
    assert admission.busy_until >= T0 + 1.0  # still under load while sampling
    admission.flagged_sources(T0 + 1.5 * SAMPLE_WINDOW)
    assert admission.keep < 1.0  # the window is not over
    admission.flagged_sources(T0 + 2 * SAMPLE_WINDOW)  # over, and nobody came: lifted
    assert admission.keep == 1.0


def test_backlog_from_flagged_sources_does_not_lower_keep() -> None:
    """Junk queued before the kernel filter had its source is not spoofed traffic."""
    admission = Admission()
    for port in ATTACKER:
        admission.unproven(port, T0)
        admission.unproven(port, T0)
    for i in range(25_000):
        assert admission.unproven(ATTACKER[i % 64], T0 + i * 1e-5) is Verdict.DROP
    admission.unproven(source(1), T0 + SAMPLE_WINDOW)
    assert admission.keep == 1.0


def test_a_full_source_table_falls_back_to_the_budgets() -> None:
    admission = Admission()
    admission.sources = RateLimiter(2, rate=1 / SOURCE_INTERVAL, burst=1)
    admission.unproven(source(1), T0)
    admission.unproven(source(2), T0)
    assert admission.unproven(source(3), T0) is Verdict.PROCESS
    assert admission.unproven(source(1), T0) is Verdict.DROP  # known and spent


def test_proven_messages_are_limited_per_ip() -> None:
    admission = Admission()
    ip = bytes([192, 0, 2, 1])
    assert [admission.proven_allowed(ip, T0) for _ in range(HANDSHAKE_BURST + 1)] == (
        [True] * HANDSHAKE_BURST + [False])


def test_no_budgets_means_no_work_for_unproven_messages() -> None:
    admission = Admission(unproven_per_second=0, cookies_per_second=0)
    assert admission.unproven(source(1), T0) is Verdict.DROP
    assert admission.drop is Drop.COOKIE_LIMITED


# --- a device under a flood --------------------------------------------------------------


def initiator_and_responder() -> tuple[Net, Node, Node]:
    """a knows b's endpoint; b, the responder, learns a's from its initiation."""
    net = Net()
    a = net.add("a", "192.0.2.1", 51820, seed=1)
    b = net.add("b", "192.0.2.2", 51821, seed=2)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"], b_endpoint=False)
    return net, a, b


def flood(net: Net, target: Node, seconds: float, per_tick: int = 128) -> int:
    """Junk initiations (valid mac1) from ATTACKER's 64 ports, 12,800 a second."""
    key = mac1_key(target.public)
    junk = [junk_initiation(key) for _ in range(per_tick)]
    sent = 0
    for _ in range(round(seconds * 100)):
        batch = [(d, ATTACKER[i % 64]) for i, d in enumerate(junk)]
        _, out = target.device.receive(batch, net.now)
        target.sent.extend(d for d, _ in out)
        sent += len(batch)
        net.now += 0.01
    return sent


def test_first_initiation_is_answered_during_a_flood() -> None:
    """2 s into a 64-port flood a peer's first initiation gets a response, not a cookie,
    and the flood cost the responder a bounded number of full handshakes."""
    net, a, b = initiator_and_responder()
    sent = flood(net, b, 2.0)
    assert b.device.counters[Drop.SOURCE_LIMITED] > 0.9 * sent
    handshakes = b.device.counters[Drop.HANDSHAKE_FAILED]
    assert handshakes <= b.device.under_load_rate + 64  # before load was seen, then once each
    assert len(b.device.admission.flagged) == 64
    b.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert [d[0] for d in b.sent] == [MSG_RESPONSE]
    assert b.tun == [ipv4_packet("10.0.0.1", "10.0.0.2")]


def test_retry_with_mac2_is_served_while_junk_arrives() -> None:
    """With both budgets spent by spoofed sources, the peer gets a cookie once; its retry
    carries mac2 and is served although the flood goes on."""
    net, a, b = initiator_and_responder()
    b.device.admission = Admission(unproven_per_second=0, cookies_per_second=1)
    flood(net, b, 1.0)
    net.now += 0.5  # the cookie budget refills (one a second)
    b.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert [d[0] for d in b.sent] == [MSG_COOKIE_REPLY]
    flood(net, b, REKEY_TIMEOUT)  # the peer retries after REKEY_TIMEOUT; junk goes on
    b.sent.clear()
    net.advance(0.5)
    assert MSG_RESPONSE in [d[0] for d in b.sent]
    assert b.tun == [ipv4_packet("10.0.0.1", "10.0.0.2")]


def test_a_response_flood_is_judged_and_flagged_alike() -> None:
    """Responses with a valid mac1 cost a lookup and a DH without a defence, too."""
    net, _, b = initiator_and_responder()
    b.device.under_load_rate = 10
    key = mac1_key(b.public)
    body = (2).to_bytes(4, "little") + bytes(range(56))
    junk = body + crypto.mac(key, body) + bytes(16)
    for i in range(64 * 20):
        b.device.receive([(junk, ATTACKER[i % 64])], net.now)
        net.now += 0.0001
    assert b.device.counters[Drop.SOURCE_LIMITED] > 0
    assert len(b.device.admission.flagged) == 64
