"""How a peer's timers learn of the plane thread's traffic without a wake per packet.

The thread keeps, per peer between two collects, six fields of its authenticated
traffic (``plane.PeerRecord``); ``replay`` turns them into the unchanged ``PeerTimers``
events at the times they happened. That equals the events packet by packet, as
``uspan.wg.peer`` fires them, because each timer is "arm if not pending" or "disarm": only
the first and last events of a window matter (the property in tests/unit/test_plane_sync.py,
first proved on branch ``plane`` in proto/test_timersync.py).
"""

from __future__ import annotations

from uspan.wg.plane import PeerRecord, seconds
from uspan.wg.timers import PeerTimers


def replay(timers: PeerTimers, record: PeerRecord) -> None:
    """Apply ``record``'s traffic to ``timers`` as the packets' own events would have."""
    _, sent, received, data_sent, data_received, again, before, *_ = record
    # need_another_keepalive: data came while send_keepalive was pending. Pending at the
    # start (before any send of this window), or armed by a receive of this window.
    if before and timers.send_keepalive is not None:
        timers.need_another_keepalive = True
    if again:
        timers.need_another_keepalive = True
    if received:
        timers.any_authenticated_received()
    if data_sent:
        timers.data_sent(seconds(data_sent))
    if sent:
        timers.any_authenticated_sent()
    if data_received and timers.send_keepalive is None:
        timers.data_received(seconds(data_received))
    if sent or received:
        timers.any_authenticated_traversal(seconds(max(sent, received)))
