"""Nodes behind NAT routers in a lab (``uspan lab up --nat``): reflexive endpoints from
the discovery service, hole punching, recovery after the NATs forget their mappings, and
forged probe answers. Through the real CLI, in namespaces of the test's own lab."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.system.test_lab import LabCli, labs  # noqa: F401  (the fixture)
from uspan.testbed import poll

pytestmark = pytest.mark.system
USPAN_BIN = str(Path(sys.executable).parent / "uspan")

FORGE = r"""
import socket
from uspan.discovery.reflect import encode_answer
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):  # answers to probes never sent: the nonce is a guess
    sock.sendto(encode_answer(b"\x42" * 16, "192.0.2.66", 666), ("127.0.0.1", 51820))
sock.sendto(b"\xffPRA" + b"\x00" * 8, ("127.0.0.1", 51820))  # malformed
"""


def discovery_status(lab: LabCli, node: str) -> dict[str, Any]:
    done = lab.run("exec", node, "--", USPAN_BIN, "get", "discoverystatus", "-o", "json")
    spec: dict[str, Any] = json.loads(done.stdout)[0]["spec"]
    return spec




def test_two_nodes_behind_easy_nats_punch_through_recover_and_ignore_forged_answers(
        labs: Any) -> None:  # noqa: F811  (the fixture imported above)
    lab = labs()
    started = time.monotonic()
    lab.run("up", "--nodes", "2", "--nat", "n1", "n2:easy", "--timeout", "60")
    print(f"two easy-NAT nodes: every pair up {time.monotonic() - started:.1f}s after "
          "`lab up` began")
    pairs = lab.pairs()
    for a, b, router in (("n1", "n2", "192.0.2.2"), ("n2", "n1", "192.0.2.1")):
        pair = pairs[(a, b)]
        # the peer's reflexive endpoint (its router's mapping), no relay in between
        assert (pair["state"], pair["path"], pair["endpoint"]) == (
            "up", "punched", f"{router}:51820"), pair
    assert discovery_status(lab, "n1")["reflexiveEndpoints"] == ["192.0.2.1:51820"]
    lab.ping_all()

    # The NATs forget every mapping while traffic flows: the pair must come back.
    ping = subprocess.Popen(
        [USPAN_BIN, "lab", "exec", "--root", str(lab.root), "--name", lab.name, "n1",
         "--", "ping", "-q", "-i", "0.5", _address(lab, "n2")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        flushed, flushed_wall = time.monotonic(), time.time()
        for router in ("r1", "r2"):
            subprocess.run(["ip", "netns", "exec", f"uspan-{lab.name}-{router}", "conntrack",
                            "-F"], check=True, capture_output=True)

        def handshake_after_flush() -> bool:
            p = lab.pairs()
            return all(p[k]["state"] == "up" for k in (("n1", "n2"), ("n2", "n1"))) and (
                _latest_handshake(lab, "n1") > flushed_wall)

        poll(handshake_after_flush, what="n1 <-> n2 up again after conntrack -F",
             timeout=60, interval=0.5)
        print(f"n1 <-> n2 handshaking again {time.monotonic() - flushed:.1f}s after the "
              "NATs were flushed")
    finally:
        ping.terminate()
        ping.wait(10)
    lab.ping_all()

    # Answers to probes n1 never sent are ignored and counted; its endpoint stays.
    before = discovery_status(lab, "n1")["probes"]
    lab.run("exec", "n1", "--", sys.executable, "-c", FORGE)
    poll(lambda: discovery_status(lab, "n1")["probes"]["forged"] >= before["forged"] + 3,
         what="forged answers counted", timeout=10, interval=0.2)
    after = discovery_status(lab, "n1")
    assert after["probes"]["malformed"] == before["malformed"] + 1
    assert after["reflexiveEndpoints"] == ["192.0.2.1:51820"]
    lab.ping_all()


def _address(lab: LabCli, node: str) -> str:
    nodes = {v["name"]: v for v in lab.status()["nodes"]}
    address: str = nodes[node]["address"]
    return address


def _latest_handshake(lab: LabCli, node: str) -> int:
    """The wall time of ``node``'s latest handshake with any peer (``wg show``)."""
    out = lab.run("exec", node, "--", "wg", "show", "all", "latest-handshakes").stdout
    return max(int(line.split()[-1]) for line in out.splitlines())
