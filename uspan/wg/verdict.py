"""The verdict on a received datagram before the core handles it, and what a read in C
(``uspan.daemon.gate``) may do under a handshake flood: sans-IO.

``classify_py`` is the verdict in Python; the compiled one (``uspan/daemon/_gate.c``)
must match it (tested on random and hostile datagrams). ``Plan`` is what the core lets a
read do (``Device.gate_plan``), ``Counts`` what it did (``Device.gate_done``).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from uspan.wg import crypto
from uspan.wg.constants import (
    INITIATION_SIZE,
    MAC_SIZE,
    MSG_INITIATION,
    MSG_RESPONSE,
    RESPONSE_SIZE,
)

PASS, BAD_MAC1, PROVEN, UNPROVEN = 0, 1, 2, 3
_SIZES = {MSG_INITIATION: INITIATION_SIZE, MSG_RESPONSE: RESPONSE_SIZE}
_ZERO_MAC = bytes(MAC_SIZE)


@dataclass(frozen=True)
class Plan:
    """What one read may do: the keys, the cookie secret (None: none fresh), whether the
    device is under load, how many unproven initiations go up to the core, and how many
    more are answered with a cookie in C (the rest are dropped). Those from the ``lane``
    (``lane_records``) always go up: the core's priority lane serves them."""

    mac1_key: bytes
    cookie_key: bytes
    secret: bytes | None
    under_load: bool
    hand_up: int
    cookies: int
    lane: bytes = b""


@dataclass(frozen=True)
class Counts:
    """What one read did besides what it returned."""

    truncated: int  # receives cut short (control data or datagram)
    bad_mac1: int  # handshake messages dropped for their mac1
    handed_up: int  # unproven initiations among those returned
    cookies: int  # unproven initiations answered with a cookie in C
    dropped: int  # unproven initiations dropped: no budget left
    send_failed: int  # cookie replies the kernel refused
    overflowed: int = 0  # the plane's thread: handshake messages its punt ring had no room
    # for (counted as plane_udp_punts_dropped; the load counts them, as judged)


def lane_records(sources: Iterable[bytes]) -> bytes:
    """The lane as a read in C takes it: per source key (IP || port), its length and
    the key zero-padded to 18 bytes."""
    return b"".join(bytes([len(key)]) + key.ljust(18, b"\0") for key in sources)


def classify_py(data: bytes, source: bytes, mac1_key: bytes, secret: bytes | None,
                under_load: bool) -> int:
    """The verdict on one datagram from ``source`` (IP bytes || port): BAD_MAC1 for a
    handshake message (initiation or response of its size) whose mac1 fails; under load,
    PROVEN or UNPROVEN for an initiation by its mac2 against ``secret`` (None: no fresh
    secret, nothing is proven); PASS for the rest."""
    if len(data) < 4 or data[1:4] != b"\0\0\0" or _SIZES.get(data[0]) != len(data):
        return PASS
    mac1_at, mac2_at = len(data) - 2 * MAC_SIZE, len(data) - MAC_SIZE
    if not hmac.compare_digest(crypto.mac(mac1_key, data[:mac1_at]), data[mac1_at:mac2_at]):
        return BAD_MAC1
    if not under_load or data[0] != MSG_INITIATION:
        return PASS
    if secret is None or data[mac2_at:] == _ZERO_MAC:
        return UNPROVEN
    cookie = crypto.mac(secret, source)
    return PROVEN if hmac.compare_digest(crypto.mac(cookie, data[:mac2_at]),
                                         data[mac2_at:]) else UNPROVEN

