"""What ``uspan lab ping`` prints, from a snapshot: no lab needed."""

from __future__ import annotations

import re

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


def test_json_keys_are_camel_case() -> None:
    snap = Snapshot(lab="lab", networks=1, discovery_running=True,
                    nodes=[NodeView("n1", "uspan", "hard", True, True, public_key="k")])
    snap.pairs[("n1", "n2")] = Pair("n1", "n2", "up", rtt_ms=0.5)
    status = snap.to_json()
    objects = [status, status["discovery"], status["nodes"][0], status["pairs"][0],
               *snap.ping_json()]
    keys = {key for item in objects for key in item}
    assert {"blockUdp", "publicKey", "rttMs", "pairsUp"} <= keys
    assert [key for key in keys if not re.fullmatch(r"[a-z]+(?:[A-Z][a-z]*)*", key)] == []
    assert status["nodes"][0]["blockUdp"] is True and snap.ping_json()[0]["rttMs"] == 0.5
