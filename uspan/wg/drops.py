"""Why the core dropped a datagram or packet: one enumeration to count and to report.

``Device.counters`` is keyed by ``Drop``; ``uspan stats`` prints every member as
``drop_<value>``, so a new reason is counted and reported by adding it here. The members
are strings (``StrEnum``): hashing them is str's, as cheap as the literals they replace.

``ProtocolError`` is the core's one exception for a message it refuses (malformed,
not authentic, not for us); ``drop`` says which counter counts it.
"""

from __future__ import annotations

from enum import StrEnum


class Drop(StrEnum):
    """Drop counters by reason (``uspan stats`` prints them sorted by name; new reasons
    are appended, so the order of existing members never changes)."""

    BAD_LENGTH = "bad_length"
    BAD_TYPE = "bad_type"
    BAD_MAC1 = "bad_mac1"
    COOKIE_SENT = "cookie_sent"
    RATELIMITED = "ratelimited"
    HANDSHAKE_FAILED = "handshake_failed"
    UNKNOWN_PEER = "unknown_peer"
    STALE_INITIATION = "stale_initiation"
    UNKNOWN_INDEX = "unknown_index"
    BAD_COOKIE_REPLY = "bad_cookie_reply"
    EXPIRED_KEY = "expired_key"
    DECRYPT_FAILED = "decrypt_failed"
    REPLAY = "replay"
    BAD_INNER_PACKET = "bad_inner_packet"
    NOT_ALLOWED_SOURCE = "not_allowed_source"
    NO_ROUTE = "no_route"
    NO_ENDPOINT = "no_endpoint"
    NO_PRIVATE_KEY = "no_private_key"
    BAD_PEER_KEY = "bad_peer_key"
    STAGED_OVERFLOW = "staged_overflow"
    STAGED_DROPPED = "staged_dropped"
    SOURCE_LIMITED = "source_limited"  # under load: the source sent again too soon
    COOKIE_LIMITED = "cookie_limited"  # under load: the budget of cookie replies is spent


# Refusals counted as something other than a failed handshake.
_DROPS = {"bad_length": Drop.BAD_LENGTH, "unknown_static": Drop.UNKNOWN_PEER}


class ProtocolError(ValueError):
    """A message was refused.

    ``reason``: "bad_length" (a malformed message), "decrypt" (an AEAD field did not
    authenticate), "dh" (a low-order public key), "length" (hand-built fields of wrong
    size), "unknown_static" (an initiation from a key that is not a peer), "receiver"
    (a response for another index) or "spent" (handshake state already used once).
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason

    @property
    def drop(self) -> Drop:
        return _DROPS.get(self.reason, Drop.HANDSHAKE_FAILED)
