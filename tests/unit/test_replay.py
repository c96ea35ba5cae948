"""Replay window: the Linux selftest and wireguard-go cases, and a brute-force model."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uspan.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW
from uspan.wg.replay import ReplayWindow

LIM = REPLAY_WINDOW + 1
REJ = REJECT_AFTER_MESSAGES

# (counter, expected) in order on one fresh window: the sequence of the kernel's
# drivers/net/wireguard/selftest/counter.c, which wireguard-go's replay_test.go ports.
SELFTEST_SEQUENCE = [
    (0, True),
    (1, True),
    (1, False),
    (9, True),
    (8, True),
    (7, True),
    (7, False),
    (LIM, True),
    (LIM - 1, True),
    (LIM - 1, False),
    (LIM - 2, True),
    (2, True),
    (2, False),
    (LIM + 16, True),
    (3, False),
    (LIM + 16, False),
    (LIM * 4, True),
    (LIM * 4 - (LIM - 1), True),
    (10, False),
    (LIM * 4 - LIM, False),
    (LIM * 4 - (LIM + 1), False),
    (LIM * 4 - (LIM - 2), True),
    (LIM * 4 + 1 - LIM, False),
    (0, False),
    (REJ, False),
    (REJ - 1, True),
    (REJ, False),
    (REJ - 1, False),
    (REJ - 2, True),
    (REJ + 1, False),
    (REJ + 2, False),
    (REJ - 2, False),
    (REJ - 3, True),
    (0, False),
]


def _ascending(first: int, last: int) -> list[tuple[int, bool]]:
    return [(i, True) for i in range(first, last + 1)]


def _descending(first: int, last: int) -> list[tuple[int, bool]]:
    return [(i, True) for i in range(first, last - 1, -1)]


W = REPLAY_WINDOW
BULK_SEQUENCES = {
    # The kernel's bulk runs.
    "kernel-1": [*_ascending(1, W), (0, True), (0, False)],
    "kernel-2": [*_ascending(2, W + 1), (1, True), (0, False)],
    "kernel-3": _descending(W, 0),
    "kernel-4": [*_descending(W + 1, 1), (0, False)],
    "kernel-5": [*_descending(W, 1), (W + 1, True), (0, False)],
    "kernel-6": [*_descending(W, 1), (0, True), (W + 1, True)],
    # wireguard-go's bulk runs 3 and 4 are shifted by one from the kernel's.
    "go-3": _descending(W + 1, 1),
    "go-4": [*_descending(W + 2, 2), (0, False)],
}


def _run(sequence: list[tuple[int, bool]]) -> None:
    window = ReplayWindow()
    for step, (counter, expected) in enumerate(sequence, 1):
        assert window.accept(counter) is expected, f"step {step}: counter {counter}"


def test_selftest_sequence() -> None:
    _run(SELFTEST_SEQUENCE)


@pytest.mark.parametrize("name", sorted(BULK_SEQUENCES))
def test_bulk_sequence(name: str) -> None:
    _run(BULK_SEQUENCES[name])


def test_out_of_range_counters_are_rejected_without_raising() -> None:
    window = ReplayWindow()
    assert not window.accept(-1)
    assert not window.accept(REJ)
    assert not window.accept(1 << 64)
    assert not window.accept(1 << 200)
    assert window.accept(0)


@pytest.mark.parametrize("jump_words", [1, 63, 126, 127, 128, 129, 1000])
def test_advance_clears_stale_ring_slots(jump_words: int) -> None:
    # Fill every counter of the window, then jump ahead: every slot the jump
    # re-enters must be free, and the remaining old counters still replays.
    window = ReplayWindow()
    top = W + 100
    for counter in range(top + 1):
        window.accept(counter)
    new_top = top + jump_words * 64
    assert window.accept(new_top)
    for counter in range(max(top + 1, new_top - W), new_top):
        assert window.accept(counter), counter
    for counter in range(max(0, new_top - W), top + 1):
        assert not window.accept(counter), counter
    assert not window.accept(new_top - W - 1)


class _Model:
    """Brute force: a set of every accepted counter and the highest one."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.top = 0

    def accept(self, counter: int) -> bool:
        if not 0 <= counter < REJ or counter in self.seen or self.top - counter > W:
            return False
        self.seen.add(counter)
        self.top = max(self.top, counter)
        return True


_EDGE_DELTAS = [-W - 64, -W - 1, -W, -W + 1, -64, -63, -1, 0, 1, 63, 64, 65, 8191, 8192, 8193]
_deltas = st.one_of(
    st.integers(min_value=-W - 200, max_value=200),
    st.sampled_from(_EDGE_DELTAS),
    st.integers(min_value=0, max_value=3 * 8192),
)


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from([0, 1 << 32, REJ - 20_000]), deltas=st.lists(_deltas, max_size=400))
def test_matches_model(start: int, deltas: list[int]) -> None:
    window, model = ReplayWindow(), _Model()
    for delta in deltas:
        # Counters are drawn relative to the highest seen, to stay near the window edges.
        counter = max(model.top, start) + delta
        assert window.accept(counter) is model.accept(counter), counter


def test_matches_model_long_random_walk() -> None:
    rng = random.Random(6479)
    window, model = ReplayWindow(), _Model()
    for _ in range(200_000):
        roll = rng.random()
        if roll < 0.6:
            counter = model.top + rng.randint(-40, 8)
        elif roll < 0.9:
            counter = model.top - rng.randint(W - 70, W + 70)
        else:
            counter = model.top + rng.randint(0, 2 * 8192)
        assert window.accept(counter) is model.accept(counter), counter


def _state(window: ReplayWindow) -> tuple[int, list[int]]:
    return window._top, list(window._words)


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from([0, 1 << 32, REJ - 20_000]),
       before=st.lists(st.integers(min_value=-200, max_value=9000), max_size=30),
       gap=st.sampled_from([-5, -1, 0, 1, 2, 63, 64, 65, W - 1, W, 3 * 8192]),
       length=st.sampled_from([1, 2, 47, 64, 65, 200, W - 1, W, W + 1]))
def test_accept_run_is_accept_one_by_one(start: int, before: list[int], gap: int,
                                         length: int) -> None:
    """In order from just above the top (or not: then False and no change)."""
    bulk, single = ReplayWindow(), ReplayWindow()
    for delta in before:
        assert bulk.accept(start + delta) is single.accept(start + delta)
    first = single._top + gap
    counters = list(range(first, first + length))
    state = _state(bulk)
    if bulk.accept_run(first, length):
        assert all([single.accept(counter) for counter in counters])
        assert _state(bulk) == _state(single)
    else:
        assert _state(bulk) == state
        assert (gap <= 0 or length > W
                or counters[-1] >= REJ), "an in-order run was refused"
