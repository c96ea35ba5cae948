"""The compiled read path under a handshake flood: ``_gate.c`` when it was built.

A spoofed flood of initiations with a valid mac1 outruns what Python drains and answers
(~20,000 a second against ~280,000 sent), so a newcomer's first initiation, which looks
like the junk, is answered by chance. ``read`` drains a socket in C and judges each
handshake message there (``classify``; a coalesced receive that holds one, piece by
piece); under load, the unproven initiations beyond what the core judges itself
(``Plan.hand_up``) are answered there with a cookie reply (``Plan.cookies``) or dropped,
and only counts come back. How many of each is the core's decision
(``Device.gate_plan``). ``uspan.wg.verdict.classify_py`` is the verdict in Python: the C
one must match it (tested on random and hostile datagrams); without the extension the
shell reads as before and the core judges every datagram itself.
"""

from __future__ import annotations

try:
    from uspan.daemon._gate import BATCH, BUFFER_SIZE, classify, cookie_reply, read
    COMPILED = True
except ImportError:  # built without a compiler or OpenSSL headers
    COMPILED = False

ROUNDS = 16  # recvmmsg calls of BATCH per read: ~1,000 datagrams, a few ms in C at most

__all__ = ["BATCH", "BUFFER_SIZE", "COMPILED", "ROUNDS", "classify", "cookie_reply", "read"]
