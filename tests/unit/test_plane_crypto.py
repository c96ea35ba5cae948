"""The plane's per-packet keypair state against the core's: sealing byte for byte as
``uspan.wg._aead.Sealer``, opening as ``Opener``, the replay window as ``ReplayWindow``
(including ``accept_run``) over random counter sequences."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.planekit import MTU, Plane
from uspan.wg.constants import REJECT_AFTER_MESSAGES, REPLAY_WINDOW
from uspan.wg.replay import ReplayWindow

_aead = pytest.importorskip("uspan.wg._aead")

SEND, RECV = bytes(range(32)), bytes(range(32, 64))


def _plane(mtu: int = MTU) -> tuple[Plane, int]:
    plane = Plane(-1, [], mtu)
    peer = plane.add_peer()
    plane.install(peer, 7, 0xABCDEF01, SEND, RECV, time.monotonic_ns(), True)
    return plane, peer


@settings(max_examples=60, deadline=None)
@given(packets=st.lists(st.binary(max_size=1500), min_size=1, max_size=8),
       mtu=st.integers(min_value=1, max_value=1500), skip=st.integers(0, 40))
def test_seal_is_the_sealers_byte_for_byte(packets: list[bytes], mtu: int, skip: int) -> None:
    plane, _ = _plane(mtu)
    try:
        if skip:
            plane.seal(7, [b""] * skip)  # the counter advances as the core's would
        assert plane.send_counter(7) == skip
        mine = plane.seal(7, packets)
        theirs = _aead.Sealer(SEND).seal(0xABCDEF01, skip, packets, mtu)
        assert mine == theirs
        assert plane.send_counter(7) == skip + len(packets)
    finally:
        plane.close()


@settings(max_examples=40, deadline=None)
@given(packets=st.lists(st.binary(max_size=600), min_size=1, max_size=8),
       flips=st.lists(st.tuples(st.integers(0, 7), st.integers(16, 700)), max_size=4))
def test_open_is_the_openers(packets: list[bytes], flips: list[tuple[int, int]]) -> None:
    plane, _ = _plane()
    try:
        datagrams = [bytearray(d) for d in _aead.Sealer(RECV).seal(7, 3, packets, MTU)]
        for which, at in flips:  # tampered ciphertexts or tags
            if which < len(datagrams) and at < len(datagrams[which]):
                datagrams[which][at] ^= 1
        frozen = [bytes(d) for d in datagrams]
        assert plane.open(7, frozen) == _aead.Opener(RECV).open(frozen)
    finally:
        plane.close()


def test_open_refuses_what_is_not_a_message() -> None:
    plane, _ = _plane()
    try:
        with pytest.raises(ValueError):
            plane.open(7, [b"\x04" + bytes(30)])
        with pytest.raises(KeyError):
            plane.open(8, [bytes(32)])
    finally:
        plane.close()


_counters = st.one_of(
    st.integers(0, 3 * REPLAY_WINDOW),
    st.integers(REJECT_AFTER_MESSAGES - 3, REJECT_AFTER_MESSAGES + 3),
    st.integers(0, (1 << 64) + 5),
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.one_of(
    st.tuples(st.just("one"), _counters, st.just(1)),
    st.tuples(st.just("run"), _counters, st.integers(1, REPLAY_WINDOW + 2)),
    st.tuples(st.just("near"), st.integers(-200, 200), st.integers(1, 300)),
), max_size=60))
def test_replay_window_is_the_cores(steps: list[tuple[str, int, int]]) -> None:
    """The same verdicts as ReplayWindow on the same sequence, step by step; "near" steps
    are runs and singles around the window's top, where the edges are."""
    plane, _ = _plane()
    window = ReplayWindow()
    try:
        for kind, value, count in steps:
            if kind == "near":
                value = max(0, window._top + value)
                kind = "run" if count > 150 else "one"
                count -= 150
            if kind == "one":
                assert plane.accept(7, value) == window.accept(value), (kind, value)
            else:
                assert plane.accept_run(7, value, count) == window.accept_run(value, count), (
                    kind, value, count)
    finally:
        plane.close()


def test_sealing_stops_at_the_limit_and_expire_sending_reaches_it() -> None:
    plane, _ = _plane()
    try:
        assert len(plane.seal(7, [b"x", b"y"])) == 2
        plane.expire_sending(7)
        assert plane.send_counter(7) == REJECT_AFTER_MESSAGES
        assert plane.seal(7, [b"z"]) == []
    finally:
        plane.close()


def test_keys_are_not_kept_in_the_python_object() -> None:
    key = os.urandom(32)
    plane = Plane(-1, [], MTU)
    try:
        peer = plane.add_peer()
        plane.install(peer, 1, 2, key, key, 0, False)
        assert key.hex() not in repr(plane) and not hasattr(plane, "__dict__")
    finally:
        plane.close()
