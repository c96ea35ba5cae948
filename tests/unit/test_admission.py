"""Who gets work under load, on a fake clock: the budgets alone, then a device flooded
with valid-mac1 initiations while a real peer starts its first handshake."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from tests.unit.wgnet import Net, Node, ipv4_packet
from uspan.testbed.flood import junk_initiation
from uspan.wg import crypto
from uspan.wg.admission import (
    BACKLOG_HIGH,
    DRAIN_SHARE,
    FLAG_TIME,
    MAX_FLAGGED,
    MAX_STEPS,
    MAX_TRUSTED,
    MIN_TARGET,
    SAMPLE_WINDOW,
    TRUSTED_BURST,
    Admission,
    Verdict,
    cookie_rate,
)
from uspan.wg.config import DeviceChange
from uspan.wg.constants import (
    COOKIES_PER_SECOND,
    HANDSHAKE_BURST,
    MIN_COOKIES_PER_SECOND,
    MSG_COOKIE_REPLY,
    MSG_RESPONSE,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
    SOURCE_INTERVAL,
    TUNNEL_YIELD_RATE,
    UNPROVEN_PER_SECOND,
)
from uspan.wg.cookie import cookie_key, mac1_key
from uspan.wg.device import HAND_UP_PER_READ, LANE_IDLE, Device
from uspan.wg.drops import Drop
from uspan.wg.endpoint import Endpoint
from uspan.wg.ratelimit import RateLimiter
from uspan.wg.verdict import Counts, lane_records

T0 = 1000.0
ATTACKER = [Endpoint("192.0.2.66", 40000 + i) for i in range(64)]
PEER = Endpoint("192.0.2.7", 51820)
PEER_KEY = (PEER.host, PEER.port)


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
    assert admission.kernel_filter(T0 + 0.1).flagged == [source(1)]
    assert admission.flag_version == version + 1
    assert admission.busy_until == T0 + 0.1 + FLAG_TIME


def test_a_stray_response_and_an_initiation_do_not_flag_a_source_together() -> None:
    """Stray responses are counted apart from initiations: each flags only on its own
    repeats."""
    admission = Admission()
    assert admission.unproven(source(1), T0) is Verdict.PROCESS
    admission.stray(source(1), T0 + 0.1)
    assert admission.kernel_filter(T0 + 0.1).flagged == []
    admission.stray(source(2), T0)
    assert admission.unproven(source(2), T0 + 0.1) is Verdict.PROCESS
    assert admission.kernel_filter(T0 + 0.1).flagged == []
    admission.stray(source(1), T0 + 0.2)
    assert admission.kernel_filter(T0 + 0.2).flagged == [source(1)]


def test_a_real_initiators_retry_is_served() -> None:
    admission = Admission()
    admission.unproven(source(1), T0)
    assert admission.unproven(source(1), T0 + SOURCE_INTERVAL) is Verdict.PROCESS


def test_flags_expire_and_are_bounded() -> None:
    admission = Admission()
    for i in range(MAX_FLAGGED + 10):
        admission.unproven(source(i), T0)
        admission.unproven(source(i), T0)
    assert len(admission.kernel_filter(T0).flagged) == MAX_FLAGGED
    version = admission.flag_version
    assert admission.kernel_filter(T0 + FLAG_TIME).flagged == []
    assert admission.flag_version == version + 1


def test_spoofed_sources_cost_at_most_the_budgets() -> None:
    """Every source new: full handshakes, then cookies, then nothing, each second."""
    admission = Admission()
    verdicts = [admission.unproven(source(i), T0)
                for i in range(UNPROVEN_PER_SECOND + COOKIES_PER_SECOND + 1000)]
    assert verdicts.count(Verdict.PROCESS) == UNPROVEN_PER_SECOND
    assert verdicts.count(Verdict.COOKIE) == COOKIES_PER_SECOND
    assert admission.drop is Drop.COOKIE_LIMITED
    assert admission.unproven(source(60_000), T0 + 1.01) is Verdict.PROCESS  # refilled


def test_a_spoofed_flood_is_sampled_down_and_the_sample_lifted_when_it_ends() -> None:
    admission = Admission()
    for i in range(25_000):  # a window of new sources, 100,000 a second
        admission.unproven(source(i), T0 + i * 1e-5)
    version = admission.flag_version
    admission.unproven(source(1 << 20), T0 + SAMPLE_WINDOW)  # the next window starts
    budgets = UNPROVEN_PER_SECOND + COOKIES_PER_SECOND
    # sampled down to the budgets, not to the floor (KEEP_STEP ** -MAX_STEPS)
    assert budgets / 100_000 >= admission.keep > 2.0 ** -(MAX_STEPS / 4)
    assert admission.flag_version == version + 1
    assert admission.busy_until >= T0 + 1.0  # still under load while sampling
    admission.kernel_filter(T0 + 1.5 * SAMPLE_WINDOW)
    assert admission.keep < 1.0  # the window is not over
    admission.kernel_filter(T0 + 2 * SAMPLE_WINDOW)  # over, and nobody came: lifted
    assert admission.keep == 1.0


def spoofed(i: int) -> Endpoint:
    return Endpoint(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 4000)


def sampled_flood(admission: Admission, rate: float, windows: int, start: int,
                  now: float, drain: float | None = None) -> list[Verdict]:
    """A spoofed flood of ``rate`` new sources a second for ``windows`` sample windows:
    the kernel's sample of it (``keep``) reaches ``unproven`` evenly spread, or only
    ``drain`` a second of it when we cannot read more; the verdicts of the last window."""
    verdicts: list[Verdict] = []
    for _ in range(windows):
        if now - admission._window >= SAMPLE_WINDOW:  # the kernel takes the new keep at
            admission.kernel_filter(now)  # once (unbacklogged, the queue has no lag)
        read = rate * admission.keep if drain is None else min(drain, rate * admission.keep)
        count = max(1, round(read * SAMPLE_WINDOW))
        verdicts = [admission.unproven(spoofed(start + i), now + i * SAMPLE_WINDOW / count)
                    for i in range(count)]
        start += count
        now += SAMPLE_WINDOW
    return verdicts


def test_every_initiation_the_sample_lets_through_is_answered() -> None:
    """What the kernel keeps of a spoofed flood is no more than the budgets answer: once
    settled, none of it is read only to be refused, and at least half the budgets are
    given (a new peer's chance per attempt is what is answered over the flood rate).
    With a sample of four times the budgets, three in four were dropped unanswered."""
    for settle in range(5, 12):  # (the sample swung with a period of 6 windows)
        admission = Admission()
        sampled_flood(admission, 200_000, settle, 0, T0)
        for w in range(6):
            verdicts = sampled_flood(admission, 200_000, 1, (w + 1) << 20,
                                     T0 + (settle + w) * SAMPLE_WINDOW)
            assert Verdict.DROP not in verdicts
            assert (len(verdicts) / SAMPLE_WINDOW
                    >= (UNPROVEN_PER_SECOND + COOKIES_PER_SECOND) / 2)


def test_a_queue_full_of_tunnel_data_leaves_the_sample_alone() -> None:
    """The socket queue is full of established peers' data, not of initiations: the
    backlog's cut frees no room there (it cut a small flood's answers to a quarter); the
    aim is what the budgets give beside that data."""
    admission = Admission(backlog=lambda: 1.0)
    for w in range(8):
        admission.others += 4_000  # transport messages read in the window: 16,000/s
        sampled_flood(admission, 3_000, 1, w << 12, T0 + w * SAMPLE_WINDOW)
    assert admission.target == UNPROVEN_PER_SECOND + cookie_rate(16_000)
    assert admission.keep == 1.0


def answers_in_a_second(admission: Admission, start: float, tunnels: int = 0) -> int:
    """A spoofed flood of new sources, 100,000 a second, for one second, beside
    ``tunnels`` transport messages a second read by the device: the cookies given (the
    kernel's sample is not applied, so every budget is offered more than it gives)."""
    cookies = 0
    for w in range(4):
        now = start + w * SAMPLE_WINDOW
        admission.kernel_filter(now)
        admission.others += tunnels // 4
        for i in range(25_000):
            verdict = admission.unproven(source((w << 15) + i), now + i * 1e-5)
            cookies += verdict is Verdict.COOKIE
    return cookies


def test_the_cookie_rate_falls_linearly_from_idle_to_the_yield_rate() -> None:
    assert [cookie_rate(t * TUNNEL_YIELD_RATE) for t in (0, 0.5, 1, 5)] == [
        COOKIES_PER_SECOND, (COOKIES_PER_SECOND + MIN_COOKIES_PER_SECOND) // 2,
        MIN_COOKIES_PER_SECOND, MIN_COOKIES_PER_SECOND]


@pytest.mark.parametrize("tunnels", [0, 10_000, 20_000, 100_000])
def test_the_cookie_budget_yields_to_the_tunnels(tunnels: int) -> None:
    """The cookies of a second follow the tunnels' traffic in the window before: all of
    COOKIES_PER_SECOND while idle, down to MIN_COOKIES_PER_SECOND at TUNNEL_YIELD_RATE.
    Measured before the flood too (the shell's filter loop judges idle windows), so its
    first second already yields; and the sample aims at the smaller budget."""
    admission = Admission()
    for w in range(4):  # a tunnel's traffic, no flood: the shell's filter loop looks
        admission.kernel_filter(T0 + w * SAMPLE_WINDOW)
        admission.others += tunnels // 8
        admission.sent += tunnels // 8
    first = answers_in_a_second(admission, T0 + 1.0, tunnels)  # and a second's burst
    cookies = answers_in_a_second(admission, T0 + 2.0, tunnels)
    expected = cookie_rate(tunnels)
    assert expected <= first <= 2 * expected + 1
    assert expected - 1 <= cookies <= expected + 1
    assert admission.target == UNPROVEN_PER_SECOND + expected
    assert 100_000 * admission.keep <= admission.target


def test_the_cookie_budget_grows_back_when_the_tunnels_go_quiet() -> None:
    admission = Admission()
    answers_in_a_second(admission, T0, tunnels=40_000)
    assert answers_in_a_second(admission, T0 + 1.0, tunnels=40_000) == MIN_COOKIES_PER_SECOND
    answers_in_a_second(admission, T0 + 2.0)  # the first quiet window still yields
    assert answers_in_a_second(admission, T0 + 3.0) >= COOKIES_PER_SECOND - 1


def test_the_device_counts_its_tunnels_messages_both_ways() -> None:
    """What the budget follows: transport messages the device read and sent."""
    net, a, b = initiator_and_responder()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    admission = b.device.admission
    before = (admission.others, admission.sent)
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")] * 3)
    net.send(b, [ipv4_packet("10.0.0.2", "10.0.0.1")] * 2)
    net.run()
    assert (admission.others - before[0], admission.sent - before[1]) == (3, 2)
    admission.kernel_filter(net.now + SAMPLE_WINDOW)  # the stats' total spans windows
    assert admission.tunnel_messages == sum(before) + 5


def test_unauthenticated_transport_messages_leave_the_cookie_budget_whole() -> None:
    """Only authentic, fresh transport messages are the tunnels' traffic: 20,000 a
    second of spoofed ones (unknown index, a real index with a forged tag, replays of a
    real message) cut the budget 16-fold when every transport-shaped datagram counted."""
    net, a, b = initiator_and_responder()
    captured: list[bytes] = []
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    net.emit = lambda sender, out: captured.extend(d for d, _ in out)  # type: ignore[method-assign]
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    real = captured[-1]
    forged = real[:-1] + bytes([real[-1] ^ 1])
    unknown = bytes([4, 0, 0, 0]) + b"\xef\xbe\xad\xde" + bytes(24)
    admission = b.device.admission
    admission.kernel_filter(net.now)
    b.device.receive([(real, a.endpoint)], net.now)  # the one accepted
    spoofer = Endpoint("198.51.100.7", 4444)
    junk = [(d, spoofer) for d in (unknown, forged, real)] * (TUNNEL_YIELD_RATE // 12)
    b.device.receive(junk, net.now + 0.1)
    counters = b.device.counters
    assert counters[Drop.UNKNOWN_INDEX] + counters[Drop.DECRYPT_FAILED] \
        + counters[Drop.REPLAY] >= len(junk)
    admission.kernel_filter(net.now + SAMPLE_WINDOW)
    assert admission.target == UNPROVEN_PER_SECOND + cookie_rate(1 / SAMPLE_WINDOW)
    assert answers_in_a_second(admission, net.now + SAMPLE_WINDOW) >= COOKIES_PER_SECOND


def test_one_busy_window_cuts_the_sample_for_one_window_only() -> None:
    """A settled sampled flood; the tunnels burst for one window, then go quiet: the
    budget lifts at the next window and the sample with it (the backlog's aim is kept
    apart from the budgets' cap). It used to grow back a quarter a window, ~3 s, so a
    short burst every 3 s kept the answers ~2.5 times lower."""
    admission = Admission()
    rate, whole = 40_000, UNPROVEN_PER_SECOND + COOKIES_PER_SECOND
    sampled_flood(admission, rate, 8, 0, T0)
    settled = sampled_flood(admission, rate, 1, 1 << 20, T0 + 8 * SAMPLE_WINDOW)
    admission.others += TUNNEL_YIELD_RATE // 4  # a window at TUNNEL_YIELD_RATE
    busy = sampled_flood(admission, rate, 1, 2 << 20, T0 + 9 * SAMPLE_WINDOW)
    assert len(busy) < len(settled) / 8  # the budget and the sample yield at once
    quiet = sampled_flood(admission, rate, 1, 3 << 20, T0 + 10 * SAMPLE_WINDOW)
    assert admission.target == whole
    assert len(quiet) == len(settled) and Verdict.DROP not in quiet
    assert len(quiet) / SAMPLE_WINDOW >= whole / 2


def test_windows_without_initiations_never_cut_the_aim() -> None:
    """Idle windows are judged too (for the tunnels' traffic): one in which no
    initiation was read is not a flood we fell behind, whatever fills the queue, also
    while a flagged source keeps the device busy."""
    full = [0.0]
    admission = Admission(backlog=lambda: full[0])
    admission.unproven(source(1), T0)
    admission.unproven(source(1), T0)  # flagged: busy for FLAG_TIME
    admission.kernel_filter(T0 + SAMPLE_WINDOW)
    full[0] = 1.0  # say, tunnel data the shell has not read yet
    for w in range(2, 8):
        admission.kernel_filter(T0 + w * SAMPLE_WINDOW)
    assert admission.busy_until > T0 + 8 * SAMPLE_WINDOW
    assert admission.target == UNPROVEN_PER_SECOND + COOKIES_PER_SECOND


def test_a_full_socket_queue_lowers_the_sample_until_we_drain_it() -> None:
    """While the shell's queue stays full we read only what we can (here 2,000 a
    second), which alone would look like a small flood: the aim falls below that, and
    the estimate of the flood doubles each window the queue stays full after the cut,
    so the sample halves until we keep up; the aim grows back once the queue is clear
    (without it the sample stayed whole and the queue full, losing a peer's initiation
    and its mac2 retry at random)."""
    full = [1.0]
    admission = Admission(backlog=lambda: full[0])
    keeps = []
    for w in range(8):
        sampled_flood(admission, 200_000, 1, w << 12, T0 + w * SAMPLE_WINDOW, drain=2000)
        keeps.append(admission.keep)
    assert all(b <= a / 2 for a, b in itertools.pairwise(keeps))
    assert admission.target == DRAIN_SHARE * 2000
    assert 200_000 * admission.keep <= 2000
    after = T0 + 8 * SAMPLE_WINDOW + 60.0  # another flood, long after
    full[0] = 0.0  # (the queue was read once the flood ended)
    admission.kernel_filter(after - 1.0)  # the sample is lifted...
    admission.kernel_filter(after)  # ...and the aim whole again
    assert admission.target == UNPROVEN_PER_SECOND + COOKIES_PER_SECOND
    admission.aim = MIN_TARGET
    sampled_flood(admission, 200_000, 12, 1 << 16, after + SAMPLE_WINDOW)
    assert admission.target > 8 * MIN_TARGET  # a quarter more each clear window
    assert admission.keep > 8 * MIN_TARGET / 200_000 / 2


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


def spend_budgets(admission: Admission, now: float) -> None:
    """Spoofed sources take every full handshake and cookie of this second."""
    for i in range(UNPROVEN_PER_SECOND + COOKIES_PER_SECOND + 10):
        admission.unproven(source(i), now)
    assert admission.unproven(source(1 << 19), now) is Verdict.DROP


def test_a_known_peer_is_served_although_the_budgets_are_spent() -> None:
    admission = Admission(known=lambda now: [PEER])
    spend_budgets(admission, T0)
    assert admission.unproven(PEER, T0) is Verdict.PROCESS
    assert admission.unproven(Endpoint(PEER.host, PEER.port + 1), T0) is Verdict.DROP


def test_a_lane_endpoint_over_its_limit_leaves_the_lane_but_is_never_flagged() -> None:
    """A spoofer of the peer's exact endpoint: the first TRUSTED_BURST are served, then
    that endpoint gets cookies (the real peer's way in) and is sampled in the kernel like
    anyone for FLAG_TIME."""
    admission = Admission(known=lambda now: [PEER])
    verdicts = [admission.unproven(PEER, T0 + i * 0.001) for i in range(TRUSTED_BURST + 2)]
    assert verdicts == [Verdict.PROCESS] * TRUSTED_BURST + [Verdict.COOKIE] * 2
    rules = admission.kernel_filter(T0 + 0.01)
    assert (rules.lane, rules.flagged, list(admission.abused)) == ([], [], [PEER_KEY])
    assert admission.unproven(PEER, T0 + SOURCE_INTERVAL) is Verdict.PROCESS  # refilled
    version = admission.flag_version
    rules = admission.kernel_filter(T0 + 0.01 + FLAG_TIME)
    assert (rules.lane, admission.abused) == ([PEER], {})
    assert admission.flag_version == version + 1


def test_the_lane_follows_the_known_endpoints_and_is_bounded() -> None:
    known = [source(i) for i in range(MAX_TRUSTED + 5)]
    admission = Admission(known=lambda now: known)
    admission.unproven(source(1), T0)
    assert admission.kernel_filter(T0).lane == known[:MAX_TRUSTED]
    assert admission.unproven(known[MAX_TRUSTED], T0) is Verdict.PROCESS  # by the budget
    assert admission.unproven(known[MAX_TRUSTED], T0) is Verdict.DROP  # not in the lane
    version = admission.flag_version
    admission.unproven(source(500), T0 + SAMPLE_WINDOW)
    assert admission.flag_version == version  # the same endpoints: the filter stays
    known[0] = PEER  # a peer roamed
    admission.unproven(source(501), T0 + 1.5 * SAMPLE_WINDOW)
    assert PEER not in admission.kernel_filter(T0 + 1.5 * SAMPLE_WINDOW).lane  # not yet read
    admission.unproven(source(502), T0 + 2 * SAMPLE_WINDOW)
    assert admission.flag_version == version + 1
    assert admission.kernel_filter(T0 + 2 * SAMPLE_WINDOW).lane[0] == PEER


def test_a_flag_from_before_an_endpoint_joined_the_lane_does_not_hold() -> None:
    known: list[Endpoint] = []
    admission = Admission(known=lambda now: known)
    admission.unproven(PEER, T0)
    admission.unproven(PEER, T0)
    assert admission.kernel_filter(T0).flagged == [PEER]
    known.append(PEER)  # then the peer's handshake came from there
    assert admission.unproven(PEER, T0 + SAMPLE_WINDOW) is Verdict.PROCESS


# --- a device under a flood --------------------------------------------------------------


def initiator_and_responder(known: bool = False) -> tuple[Net, Node, Node]:
    """a knows b's endpoint; b, the responder, learns a's from its initiation unless
    ``known``."""
    net = Net()
    a = net.add("a", "192.0.2.1", 51820, seed=1)
    b = net.add("b", "192.0.2.2", 51821, seed=2)
    net.connect(a, b, ["10.0.0.1/32"], ["10.0.0.2/32"], b_endpoint=known)
    return net, a, b


def flood(net: Net, target: Node, seconds: float, per_tick: int = 128,
          sources: Sequence[Endpoint] = ATTACKER) -> int:
    """Junk initiations (valid mac1), 12,800 a second, from ``sources`` in turn."""
    key = mac1_key(target.public)
    junk = [junk_initiation(key) for _ in range(per_tick)]
    sent = 0
    for _ in range(round(seconds * 100)):
        batch = [(d, sources[(sent + i) % len(sources)]) for i, d in enumerate(junk)]
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
    """Responses with a valid mac1 to no handshake of ours cost a lookup each, and their
    sources are judged alike, so a few repeating ports are left to the kernel."""
    net, _, b = initiator_and_responder()
    b.device.under_load_rate = 10
    key = mac1_key(b.public)
    body = (2).to_bytes(4, "little") + bytes(range(56))
    junk = body + crypto.mac(key, body) + bytes(16)
    for i in range(64 * 20):
        b.device.receive([(junk, ATTACKER[i % 64])], net.now)
        net.now += 0.0001
    assert b.device.counters[Drop.UNKNOWN_INDEX] == 64 * 20
    assert len(b.device.admission.flagged) == 64


@pytest.mark.parametrize("known", [True, False], ids=["known", "unknown"])
def test_a_known_peer_is_answered_at_once_during_a_spoofed_flood(known: bool) -> None:
    """Every second's budgets spent by new sources: a peer whose endpoint the responder
    knows gets a response to its first initiation, arriving amid the junk; an unknown
    one gets nothing (and waits for REKEY_TIMEOUT)."""
    net, a, b = initiator_and_responder(known)
    flood(net, b, 2.0, per_tick=512, sources=[spoofed(i) for i in range(110_000)])
    assert b.device.admission.kernel_filter(net.now).keep < 1.0
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    [(initiation, _, _)] = net.wire
    net.wire.clear()
    key = mac1_key(b.public)
    junk = [(junk_initiation(key), source(40_000 + i)) for i in range(512)]
    _, out = b.device.receive([*junk, (initiation, a.endpoint)], net.now)
    to_a = [(d, e) for d, e in out if e.address == a.endpoint.address]
    assert [d[0] for d, _ in to_a] == ([MSG_RESPONSE] if known else [])
    net.emit(b, to_a)
    net.run()
    assert b.tun == ([ipv4_packet("10.0.0.1", "10.0.0.2")] if known else [])


def test_a_spoofer_of_a_peers_endpoint_costs_it_only_the_lane() -> None:
    """Junk from the known peer's exact endpoint: that endpoint leaves the lane and is
    never flagged, so the peer gets a cookie and its retry with mac2 is served."""
    net, a, b = initiator_and_responder(known=True)
    flood(net, b, 1.0, sources=[a.endpoint])
    rules = b.device.admission.kernel_filter(net.now)
    assert (rules.lane, rules.flagged) == ([], [])
    assert list(b.device.admission.abused) == [(a.endpoint.host, a.endpoint.port)]
    net.now += 0.5  # the cookie budget refills
    b.sent.clear()
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    assert [d[0] for d in b.sent] == [MSG_COOKIE_REPLY]
    flood(net, b, REKEY_TIMEOUT, sources=[a.endpoint])
    b.sent.clear()
    net.advance(0.5)
    assert MSG_RESPONSE in [d[0] for d in b.sent]
    assert b.tun == [ipv4_packet("10.0.0.1", "10.0.0.2")]


def test_a_spoofer_of_a_peers_endpoint_does_not_stop_our_handshakes_to_it() -> None:
    """Responses are not judged by their source under load: the peer's response to our
    own initiation is served while its endpoint is abused, and one to an index we have
    not got pending is dropped at the cost of a lookup."""
    net, a, b = initiator_and_responder(known=True)
    flood(net, b, 1.0, sources=[a.endpoint])
    assert list(b.device.admission.abused) == [(a.endpoint.host, a.endpoint.port)]
    before = b.device.counters[Drop.HANDSHAKE_FAILED]
    net.send(b, [ipv4_packet("10.0.0.2", "10.0.0.1")])
    net.run()
    assert MSG_RESPONSE in [d[0] for d in a.sent]
    assert a.tun == [ipv4_packet("10.0.0.2", "10.0.0.1")]
    assert b.device.counters[Drop.HANDSHAKE_FAILED] == before
    assert net.now < b.device.admission.abused[(a.endpoint.host, a.endpoint.port)]
    key = mac1_key(b.public)
    body = bytes([MSG_RESPONSE, 0, 0, 0]) + bytes(range(8)) + bytes(RESPONSE_SIZE - 44)
    forged = body + crypto.mac(key, body) + bytes(16)
    b.device.receive([(forged, a.endpoint)] * 3, net.now)
    assert b.device.counters[Drop.UNKNOWN_INDEX] == 3
    assert b.device.admission.kernel_filter(net.now).flagged == []  # never a lane's


def test_the_lane_is_read_again_on_the_clock_without_unproven_messages() -> None:
    """A port flood dropped in the kernel leaves ``unproven`` idle with ``keep`` at 1:
    the lane must not go stale for it."""
    known = [PEER]
    admission = Admission(known=lambda now: known)
    admission.unproven(source(1), T0)
    admission.unproven(source(1), T0)  # flagged: the flood's ports
    assert admission.kernel_filter(T0).lane == [PEER]
    known[0] = source(7)  # the peer roamed
    assert admission.kernel_filter(T0 + SAMPLE_WINDOW).lane == [source(7)]


def test_an_idle_kernel_filter_does_not_read_the_lane() -> None:
    """The shell asks every second; with nothing dropped the lane is moot, and reading
    it is a pass over every peer. Under load it is read every SAMPLE_WINDOW."""
    reads: list[float] = []

    def known(now: float) -> list[Endpoint]:
        reads.append(now)
        return [PEER]

    admission = Admission(known=known)
    for second in range(5):
        assert not admission.kernel_filter(T0 + second).drops_any()
    assert reads == []
    admission.unproven(source(1), T0 + 5)
    admission.unproven(source(1), T0 + 5)  # flagged
    assert reads == [T0 + 5]
    for i in range(1, 4):
        assert admission.kernel_filter(T0 + 5 + i * SAMPLE_WINDOW).lane == [PEER]
    assert reads == [T0 + 5 + i * SAMPLE_WINDOW for i in range(4)]


def test_endpoints_that_left_the_lane_leave_no_room_taken() -> None:
    """Lane after lane of new endpoints, each using its burst: a newcomer's first
    initiation is still served (a full limiter table would refuse it and mark it abused)."""
    known: list[Endpoint] = []
    admission = Admission(known=lambda now: known)
    now = T0
    for lane in range(3):
        known[:] = [source(lane * MAX_TRUSTED + i) for i in range(MAX_TRUSTED)]
        now += SAMPLE_WINDOW
        assert [admission.unproven(e, now) for e in known] == [Verdict.PROCESS] * MAX_TRUSTED
    assert admission.abused == {}


def test_the_lane_prefers_the_peers_heard_from_lately_and_skips_relayed_ones() -> None:
    """Peers heard from within LANE_IDLE first, in config order (recency among them
    would change the lane with every keepalive); then the others by recency."""
    net = Net()
    b = net.add("b", "192.0.2.2", 51821, seed=2)
    nodes = [net.add(f"p{i}", "192.0.2.100", 1000 + i, seed=10 + i)
             for i in range(MAX_TRUSTED + 3)]
    for i, node in enumerate(nodes):
        net.connect(node, b, [f"10.1.{i}.1/32"], ["10.0.0.2/32"])
    relayed = Endpoint("100::1:2:3:4", 7000)
    net.peer(b, nodes[1]).endpoint = relayed
    lane = b.device.known_endpoints(net.now)
    assert nodes[-1].endpoint not in lane and relayed not in lane  # config order
    net.peer(b, nodes[-2]).authenticated_received(net.now - LANE_IDLE - 1)  # dead since
    net.peer(b, nodes[-1]).authenticated_received(net.now)
    lane = b.device.known_endpoints(net.now)
    assert len(lane) == MAX_TRUSTED and relayed not in lane
    assert lane[:2] == [nodes[-1].endpoint, nodes[-2].endpoint]
    net.peer(b, nodes[-3]).authenticated_received(net.now)
    assert b.device.known_endpoints(net.now)[:3] == [
        nodes[-3].endpoint, nodes[-1].endpoint, nodes[-2].endpoint]


BULK = 80_000


def test_without_bulk_cookies_a_read_in_c_may_only_hand_up() -> None:
    admission = Admission()
    assert admission.plan(T0) == (UNPROVEN_PER_SECOND + COOKIES_PER_SECOND, 0)


def test_bulk_cookies_are_a_third_budget_spent_by_reads_in_c() -> None:
    """``allow_bulk`` adds a budget C answers from, and leaves the one judged in Python
    the least (its cookies cost four times C's); what a read gave is taken from the
    bulk budget, refilled over the second, and counted in the sample."""
    admission = Admission()
    admission.allow_bulk(BULK)
    assert admission.target == UNPROVEN_PER_SECOND + MIN_COOKIES_PER_SECOND + BULK
    hand_up, cookies = admission.plan(T0)
    assert (hand_up, cookies) == (UNPROVEN_PER_SECOND + MIN_COOKIES_PER_SECOND, BULK)
    admission.planned(cookies=BULK - 10, dropped=500)
    assert admission._seen == BULK - 10 + 500
    assert admission.plan(T0)[1] == 10
    assert admission.plan(T0 + 0.1)[1] == 10 + BULK // 10


def test_bulk_cookies_yield_to_the_tunnels_like_the_others() -> None:
    admission = Admission()
    admission.allow_bulk(BULK)
    admission.plan(T0)
    admission.others = round(TUNNEL_YIELD_RATE * SAMPLE_WINDOW)  # a busy window
    admission.planned(cookies=BULK, dropped=0)
    assert admission.plan(T0 + SAMPLE_WINDOW)[1] <= MIN_COOKIES_PER_SECOND


def test_a_spoofed_flood_within_the_bulk_budget_is_not_sampled() -> None:
    """Answered in C, a flood below all three budgets passes the kernel whole: every
    initiation, a newcomer's too, gets an answer."""
    admission = Admission()
    admission.allow_bulk(BULK)
    admission.plan(T0)
    admission.planned(cookies=round(50_000 * SAMPLE_WINDOW), dropped=0)
    admission.kernel_filter(T0 + SAMPLE_WINDOW)
    assert admission.keep == 1.0
    plain = Admission()
    for i in range(round(50_000 * SAMPLE_WINDOW)):
        plain.unproven(source(i), T0 + i * 1e-5)
    plain.kernel_filter(T0 + SAMPLE_WINDOW)
    assert plain.keep < 1.0


def test_the_device_plans_reads_in_c_by_its_load() -> None:
    """Not under load a read in C only checks mac1; under load it gets the cookie secret,
    at most HAND_UP_PER_READ to hand up and the bulk budget; what it did is counted, and
    its handshakes put the device under load as ``receive``'s do."""
    net, _, b = initiator_and_responder()
    device = b.device
    device.admission.allow_bulk(BULK)
    plan = device.gate_plan(net.now)
    assert plan is not None and not plan.under_load and plan.secret is None
    assert (plan.hand_up, plan.cookies) == (0, 0)
    assert plan.mac1_key == mac1_key(b.public)
    device.gate_done(Counts(0, bad_mac1=3, handed_up=0, cookies=0, dropped=0, send_failed=0),
                     net.now)
    device.admission.plan(net.now)  # as a read under load would have had it
    device.gate_done(Counts(0, 0, 0, cookies=device.under_load_rate, dropped=0,
                            send_failed=0), net.now)
    plan = device.gate_plan(net.now)
    assert plan is not None and plan.under_load and plan.secret is not None
    assert plan.hand_up == HAND_UP_PER_READ
    assert plan.cookies == BULK - device.under_load_rate
    assert device.counters[Drop.BAD_MAC1] == 3
    assert device.counters[Drop.COOKIE_SENT] == device.under_load_rate
    device.gate_done(Counts(0, 0, 0, cookies=0, dropped=7, send_failed=0), net.now)
    assert device.counters[Drop.COOKIE_LIMITED] == 7


def test_what_the_threads_ring_had_no_room_for_puts_the_device_under_load() -> None:
    """A flood that overflows the plane's punt ring before the core sees it counts for the
    load, and for no drop of the core's own (the plane counts it)."""
    net, _, b = initiator_and_responder()
    device = b.device
    device.gate_done(Counts(0, 0, 0, 0, 0, 0, overflowed=device.under_load_rate - 1),
                     net.now)
    plan = device.gate_plan(net.now)
    assert plan is not None and not plan.under_load
    device.gate_done(Counts(0, 0, 0, 0, 0, 0, overflowed=1), net.now)
    plan = device.gate_plan(net.now)
    assert plan is not None and plan.under_load
    assert sum(device.counters.values()) == 0


def test_a_read_in_c_under_load_passes_the_lane() -> None:
    """The peer whose endpoint the responder knows is in the plan's lane, so a read in
    C hands up its initiations whatever the budgets say."""
    net, a, b = initiator_and_responder(known=True)
    device = b.device
    device.admission.allow_bulk(BULK)
    device.gate_done(Counts(0, 0, 0, cookies=device.under_load_rate, dropped=0,
                            send_failed=0), net.now)
    plan = device.gate_plan(net.now)
    assert plan is not None and plan.under_load
    endpoint = device.peers[a.public].endpoint
    assert endpoint is not None
    assert plan.lane == lane_records([endpoint.source_key()])


def test_the_device_has_no_plan_without_a_key() -> None:
    assert Device().gate_plan(T0) is None


class FloodedSocket:
    """A socket queue in front of a reader that drains at most ``capacity`` a second, fed
    a spoofed flood of ``rate`` a second through the kernel's sample (``keep``): what
    reaches ``unproven``, what the queue holds and what it loses when full."""

    def __init__(self, admission: Admission, rate: float, capacity: float,
                 size: int = 14_000, queued: int = 0) -> None:
        self.admission, self.rate, self.capacity, self.size = admission, rate, capacity, size
        self.queued, self.lost, self.read, self._next = queued, 0, 0, 0
        admission.backlog = lambda: self.queued / self.size

    def window(self, now: float) -> list[Verdict]:
        """One SAMPLE_WINDOW from ``now``: the kernel takes the new keep, the sample
        arrives, the reader drains what it can."""
        admission = self.admission
        admission.kernel_filter(now)
        kept = round(self.rate * admission.keep * SAMPLE_WINDOW)
        read = min(round(self.capacity * SAMPLE_WINDOW), self.queued + kept)
        self.lost += max(0, self.queued + kept - read - self.size)
        self.queued = min(self.size, self.queued + kept - read)
        self.read += read
        verdicts = [admission.unproven(spoofed(self._next + i), now + i * SAMPLE_WINDOW / read)
                    for i in range(read)]
        self._next += read
        return verdicts


def settled_flood(capacity: float = 60_000, rate: float = 100_000,
                  queued: int = 14_000) -> tuple[Admission, FloodedSocket]:
    """A flood of ``rate`` a second that we read at ``capacity`` (the budgets answer
    more), begun with a full queue (read before the device was under load), 2 s in."""
    admission = Admission(cookies_per_second=80_000)
    flooded = FloodedSocket(admission, rate, capacity, queued=queued)
    for w in range(8):
        flooded.window(T0 + w * SAMPLE_WINDOW)
    return admission, flooded


def test_the_sample_keeps_what_we_drain_from_a_floods_onset() -> None:
    """At a flood's onset the queue is full of what came before the sample: once it is
    read (from 0.5 s), the kernel keeps at least half what we drain, and the queue loses
    nothing. The aim was halved below what we drained each window the queue was still
    over BACKLOG_HIGH, also while it emptied, and arrivals were judged from what we read
    over the keep of now, though the queue had kept them at an older, larger one: the
    sample fell to 1/32 (1/256 at 50,000 a second) and took 2-3 s to grow back, so a
    newcomer starting 2 s in had a chance of 1/4 or less where 0.6 was there."""
    for capacity in (50_000, 60_000):
        admission = Admission(cookies_per_second=80_000)
        flooded = FloodedSocket(admission, 100_000, capacity, queued=14_000)
        flooded.window(T0)
        lost = flooded.lost
        for w in range(1, 16):
            flooded.window(T0 + w * SAMPLE_WINDOW)
            if w >= 2:  # (read at 0.5 s)
                assert 100_000 * admission.keep >= capacity / 2, (capacity, w)
        assert flooded.lost == lost


def test_the_sample_is_in_the_stats() -> None:
    """``uspan stats`` shows what the kernel keeps and why: the sample, its aim and
    target, what we drained and the flood's rate as estimated."""
    admission, _ = settled_flood()
    got = admission.stats()
    assert got["sample_keep_ppm"] == round(admission.keep * 1e6) < 1_000_000
    assert got["sample_drained"] > 0 and got["sample_arrived"] > got["sample_drained"]
    assert got["sample_target"] <= got["sample_aim"]


def test_a_stalled_window_cuts_the_sample_to_what_we_drained_before() -> None:
    """The reader stalls for a window (the CPU was taken): the queue fills, and the aim
    is cut below what we drained before the stall, not below the stall's nothing, so the
    sample stays near what we drain and the queue is clear within two seconds. It fell to
    MIN_TARGET (1/128 of the flood) and took 3 s to grow back."""
    admission, flooded = settled_flood()
    flooded.capacity = 0
    flooded.window(T0 + 8 * SAMPLE_WINDOW)
    flooded.capacity, lost, queued = 60_000, flooded.lost, []
    for w in range(9, 17):
        flooded.window(T0 + w * SAMPLE_WINDOW)
        queued.append(flooded.queued)
        assert 100_000 * admission.keep >= 0.3 * 60_000, w
    assert min(queued) <= BACKLOG_HIGH * flooded.size
    assert flooded.lost == lost


def test_the_calm_plan_follows_the_key() -> None:
    """While not under load every read gets the same Plan (made once), but never one of
    an old key: a new private key gives the new mac1/cookie keys at the next read,
    removing it gives no plan, and the first key again gives its keys back."""
    device = Device()
    keys = [crypto.clamp(bytes([n]) * 32) for n in (1, 2)]
    publics = [crypto.public_key(key) for key in keys]
    for private, public in ((keys[0], publics[0]), (keys[1], publics[1])):
        device.apply(DeviceChange(private_key=private), T0)
        plan = device.gate_plan(T0)
        assert plan is not None and not plan.under_load
        assert (plan.mac1_key, plan.cookie_key) == (mac1_key(public), cookie_key(public))
        assert device.gate_plan(T0) is plan
    device.apply(DeviceChange(private_key=bytes(32)), T0)
    assert device.gate_plan(T0) is None
    device.apply(DeviceChange(private_key=keys[0]), T0)
    plan = device.gate_plan(T0)
    assert plan is not None and plan.mac1_key == mac1_key(publics[0])
