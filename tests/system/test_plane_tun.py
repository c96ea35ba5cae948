"""The plane (uspan/plane/_plane.c) against real TUNs set up unlike what it can carry
(review C1, H3): each check runs in a namespace of its own (tests/system/planetun.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from uspan.testbed import Lab

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]


def _check(check: str) -> Any:
    with Lab("upt") as lab:
        ns = lab.namespace("a")
        done = ns.run(sys.executable, "-m", "tests.system.planetun", check, lab.interface_name(),
                      timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def test_a_tun_unlike_the_flags_or_too_wide_is_refused() -> None:
    found = _check("flags")
    assert "IFF_VNET_HDR" in found["vnet_without_flag"]
    assert "IFF_VNET_HDR" in found["flag_without_vnet"]
    assert "MTU 16000" in found["mtu_too_big"]
    assert found["vnet_with_flag"] is None and found["plain"] is None


def test_a_packet_longer_than_a_slot_is_dropped_not_sealed_past_it() -> None:
    """A TUN read of a packet longer than a slot is cut (this kernel returns the cut
    length; some the whole one, which sealed past the slot): before, the plane sealed
    and sent the cut 9 KB as if whole."""
    found = _check("oversize")
    counters = found["counters"]
    assert counters["bad_length"] == 1 and counters["sealed"] == 1, counters
    assert len(found["sizes"]) == 1, found
    assert found["sizes"][0] < 100  # the short one: 5 bytes + IP/UDP headers, sealed


def test_a_link_local_peer_roaming_in_is_answered_through_its_interface() -> None:
    """Review L2: a link-local source read without IPV6_PKTINFO lost its scope (cleared)
    and the record said ifindex 0, so the core's endpoint had no ``%scope``; now the
    scope stays for the plane's sends and the record carries it as ifindex. (The reply
    reaches fe80::2 either way here: both ends are in one namespace, so it is local.)"""
    found = _check("linklocal")
    counters = found["counters"]
    assert counters["roams"] == 1 and counters["opened"] == 1, counters
    assert counters["send_errors"] == 0 and len(found["sizes"]) == 1, found
    assert found["roamed_ifindex"] == found["v0"]
