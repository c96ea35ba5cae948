"""What ``uspan lab ping`` prints, from a snapshot: no lab needed."""

from __future__ import annotations

from rich.console import Console

from uspan.lab.cli import ping_matrix
from uspan.lab.status import NodeView, Pair, Snapshot


def test_ping_heading_is_one_line_above_a_small_matrix() -> None:
    names = ["n1", "n2", "n3"]
    snap = Snapshot(lab="lab", networks=1, discovery_running=True,
                    nodes=[NodeView(n, "uspan", None, False, True) for n in names])
    for a in names:
        for b in names:
            if a != b:
                snap.pairs[(a, b)] = Pair(a, b, "up", rtt_ms=None if b == "n3" else 0.5)
    console = Console(width=200, record=True, color_system=None)
    console.print(ping_matrix(snap, 3))
    lines = console.export_text().splitlines()
    assert lines[0] == "lab lab: ping over the mesh (3 each), average RTT", lines
    assert "0.50ms" in lines[5] and "fail" in lines[5], lines  # n1: to n2, to n3
