"""The status rules with explicit ``now`` values: every boundary checked on both sides."""

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from uspan.mesh.status import (
    ATTEMPT_TIMEOUT,
    DATA_SILENCE_TIMEOUT,
    ENDPOINT_CONNECTION_TIMEOUT,
    KEEPALIVE_SILENCE_TIMEOUT,
    PEER_DOWN_INTERVAL,
    LinkFacts,
    PeerState,
    PeerStatus,
    compute_state,
    update_status,
)
from uspan.wg.endpoint import Endpoint

EP = Endpoint("192.0.2.1", 51820)
T0 = 1000.0
UP, DOWN, UNKNOWN = PeerState.UP, PeerState.DOWN, PeerState.UNKNOWN


def facts(
    handshake: float | None = None,
    attempts: int = 0,
    last_attempt: float | None = None,
    endpoint: Endpoint | None = EP,
    received: float | None = None,
    data_since: float | None = None,
) -> LinkFacts:
    return LinkFacts(
        endpoint,
        handshake,
        attempts,
        last_attempt,
        rx_bytes=0,
        tx_bytes=0,
        last_received=received,
        unanswered_data_since=data_since,
    )


def picked(t0: float | None = T0) -> PeerStatus:
    return PeerStatus(label="n1", endpoint=EP, last_used_endpoint=EP, last_endpoint_change=t0)


def test_timeouts_are_talos() -> None:
    assert ENDPOINT_CONNECTION_TIMEOUT == 15.0
    assert PEER_DOWN_INTERVAL == 275.0
    assert ATTEMPT_TIMEOUT == 6.0
    assert DATA_SILENCE_TIMEOUT == 15.0
    assert KEEPALIVE_SILENCE_TIMEOUT == 30.0


def test_no_endpoint_is_unknown() -> None:
    assert compute_state(picked(), facts(endpoint=None, handshake=T0 + 1), T0 + 1) is UNKNOWN
    assert update_status(picked(), facts(endpoint=None), T0 + 500).deadline is None


@pytest.mark.parametrize(
    ("handshake", "now", "state"),
    [
        (None, T0, UNKNOWN),
        (None, T0 + 14.999, UNKNOWN),
        (None, T0 + 15, DOWN),  # EndpointConnectionTimeout reached, no handshake
        (T0 - 1, T0 + 14.999, UNKNOWN),  # a handshake before T0 does not count
        (T0 - 1, T0 + 15, DOWN),
        (T0 + 3, T0 + 3, UP),
        (T0 + 3, T0 + 274.999, UP),
        (T0 + 3, T0 + 275, UP),  # past 275 s of T0: the handshake is still < 275 s old
        (T0 + 3, T0 + 277.999, UP),
        (T0 + 3, T0 + 278, DOWN),  # the handshake is now 275 s old
        (None, T0 + 274.999, DOWN),
        (None, T0 + 275, DOWN),
        (T0, T0 + 5, UNKNOWN),  # at T0 exactly is not after T0
    ],
)
def test_talos_rules(handshake: float | None, now: float, state: PeerState) -> None:
    assert compute_state(picked(), facts(handshake), now) is state


def test_never_picked_roamed_endpoint_uses_handshake_age() -> None:
    status = PeerStatus(label="n1")
    assert compute_state(status, facts(handshake=100.0), 100.0 + 274.999) is UP
    assert compute_state(status, facts(handshake=100.0), 100.0 + 275) is DOWN
    assert compute_state(status, facts(), 5.0) is DOWN


def test_fast_rule_on_a_new_endpoint() -> None:
    status = picked()
    # first initiation at T0, retransmit at T0+5.2: down 6 s after the second one
    one = facts(attempts=1, last_attempt=T0)
    assert compute_state(status, one, T0 + 10) is UNKNOWN
    two = facts(attempts=2, last_attempt=T0 + 5.2)
    assert compute_state(status, two, T0 + 11.199) is UNKNOWN
    assert compute_state(status, two, T0 + 11.2) is DOWN  # before Talos's 15 s


def test_fast_rule_on_an_up_peer() -> None:
    status = picked()
    handshake = T0 + 2
    assert compute_state(status, facts(handshake), T0 + 200) is UP
    lost = facts(handshake, attempts=2, last_attempt=T0 + 205)
    assert compute_state(status, lost, T0 + 210.999) is UP
    assert compute_state(status, lost, T0 + 211) is DOWN  # not T0 + 277


def test_traffic_rule_data_unanswered_for_15_s() -> None:
    status = picked()
    handshake = T0 + 2
    # talking happily until T0+100, then data goes out and nothing comes back
    lost = facts(handshake, received=T0 + 100, data_since=T0 + 100.5)
    assert compute_state(status, lost, T0 + 115.499) is UP
    assert compute_state(status, lost, T0 + 115.5) is DOWN
    assert update_status(status, lost, T0 + 101).deadline == T0 + 115.5


def test_an_idle_peer_that_only_hears_our_keepalives_stays_up() -> None:
    # Our keepalives re-arm its persistent keepalive timer (as WireGuard does on every
    # packet received), so it may send nothing until the next rekey: not a dead path.
    status = picked()
    quiet = facts(T0 + 2, received=T0 + 2)
    assert compute_state(status, quiet, T0 + 150) is UP
    assert compute_state(status, quiet, T0 + 2 + 274.9) is UP
    assert compute_state(status, quiet, T0 + 2 + 275) is DOWN  # Talos's rule still holds


def test_silences_count_from_the_endpoint_change() -> None:
    status = picked()
    before = facts(received=T0 - 100, data_since=T0 - 50)
    assert compute_state(status, before, T0 + 14) is UNKNOWN
    assert update_status(status, before, T0 + 1).deadline == T0 + 15


def test_fast_rule_ignores_attempts_before_the_endpoint_change() -> None:
    stale = facts(attempts=3, last_attempt=T0 - 1)
    assert compute_state(picked(), stale, T0 + 10) is UNKNOWN


def test_fast_rule_ignores_answered_attempts() -> None:
    answered = facts(handshake=T0 + 6, attempts=2, last_attempt=T0 + 5)
    assert compute_state(picked(), answered, T0 + 20) is UP


def test_update_reports_changes_not_counters() -> None:
    status = picked()
    first = update_status(status, facts(), T0 + 1)
    assert first.status.state is UNKNOWN
    assert not first.changed
    moving = LinkFacts(EP, None, 0, None, rx_bytes=100, tx_bytes=200)
    counted = update_status(first.status, moving, T0 + 2)
    assert not counted.changed
    assert (counted.status.rx_bytes, counted.status.tx_bytes) == (100, 200)
    down = update_status(counted.status, moving, T0 + 15)
    assert down.changed and down.status.state is DOWN
    handshake = update_status(down.status, facts(T0 + 16), T0 + 16)
    assert handshake.changed and handshake.status.state is UP
    assert handshake.status.last_handshake == T0 + 16
    rekey = update_status(handshake.status, facts(T0 + 136), T0 + 136)
    assert not rekey.changed and rekey.status.last_handshake == T0 + 136
    relabel = update_status(handshake.status, facts(T0 + 16), T0 + 17, label="renamed")
    assert relabel.changed and relabel.status.label == "renamed"


def test_roamed_endpoint_is_reported_but_keeps_t0() -> None:
    roamed = Endpoint("198.51.100.7", 4000)
    update = update_status(picked(), facts(T0 + 1, endpoint=roamed), T0 + 2)
    assert update.changed
    assert update.status.endpoint == roamed
    assert update.status.last_used_endpoint == EP
    assert update.status.last_endpoint_change == T0


@pytest.mark.parametrize(
    ("f", "now", "deadline"),
    [
        (facts(), T0 + 1, T0 + 15),
        (facts(), T0 + 15, T0 + 275),
        (facts(), T0 + 275, None),
        (facts(T0 + 3), T0 + 4, T0 + 15),
        (facts(T0 + 3), T0 + 275, T0 + 278),
        (facts(attempts=2, last_attempt=T0 + 5), T0 + 6, T0 + 11),
        (facts(attempts=1, last_attempt=T0 + 5), T0 + 6, T0 + 15),
        (facts(T0 + 3, received=T0 + 40), T0 + 41, T0 + 275),  # no silence rule
        (facts(T0 + 3, received=T0 + 40, data_since=T0 + 41), T0 + 42, T0 + 56),
    ],
)
def test_deadline_is_the_next_boundary(f: LinkFacts, now: float, deadline: float | None) -> None:
    assert update_status(picked(), f, now).deadline == deadline


def test_sleeping_until_each_deadline_sees_every_transition() -> None:
    """Drive the machine only at its deadlines: each transition lands exactly on one."""
    status, now = picked(), T0
    seen = []
    f = facts()
    while True:
        update = update_status(status, f, now)
        status = update.status
        seen.append((now - T0, status.state))
        if update.deadline is None:
            break
        now = update.deadline
    assert seen == [(0, UNKNOWN), (15, DOWN), (275, DOWN)]


times = st.floats(0, 2000, allow_nan=False).map(lambda t: round(t, 3))


@given(
    t0=st.none() | times,
    handshake=st.none() | times,
    attempts=st.integers(0, 4),
    last_attempt=st.none() | times,
    received=st.none() | times,
    data_since=st.none() | times,
    now=times,
    later=st.floats(0, 1, exclude_max=True),
)
def test_state_holds_until_the_deadline(
    t0: float | None,
    handshake: float | None,
    attempts: int,
    last_attempt: float | None,
    received: float | None,
    data_since: float | None,
    now: float,
    later: float,
) -> None:
    """Between ``now`` and the deadline nothing changes: sleeping until it misses nothing."""
    status = picked(t0)
    f = facts(handshake, attempts, last_attempt, received=received, data_since=data_since)
    update = update_status(status, f, now)
    horizon = now + 10_000 if update.deadline is None else update.deadline
    assert horizon > now
    moment = now + (horizon - now) * later
    assume(moment < horizon)  # float rounding can land on the deadline itself
    assert compute_state(status, f, moment) is update.status.state
