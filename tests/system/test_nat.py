"""Nodes behind NAT routers in a lab (``uspan lab up --nat``): reflexive endpoints from
the discovery service, hole punching, recovery after the NATs forget their mappings, and
forged probe answers. Through the real CLI, in namespaces of the test's own lab."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.jsonstream import read_json_stream
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
    spec: dict[str, Any] = read_json_stream(done.stdout)[0]["spec"]
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
    log = lab.root / f"{lab.name}-ping.txt"
    with log.open("w") as out:
        ping = subprocess.Popen(["ip", "netns", "exec", f"uspan-{lab.name}-n1", "stdbuf",
                                 "-oL", "ping", "-D", "-n", "-i", "0.2", _address(lab, "n2")],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        time.sleep(2)
        flushed = time.time()
        for router in ("r1", "r2"):
            subprocess.run(["ip", "netns", "exec", f"uspan-{lab.name}-{router}", "conntrack",
                            "-F"], check=True, capture_output=True)

        def flowing_again() -> bool:
            replies = _replies(log.read_text())
            return bool(replies) and replies[-1] > max(flushed, time.time() - 2)

        time.sleep(3)
        poll(flowing_again, what="n1 -> n2 pings answered again after conntrack -F",
             timeout=60, interval=0.5)
    finally:
        ping.terminate()
        ping.wait(10)
    replies = _replies(log.read_text())
    last = max(t for t in replies if t <= flushed)
    after = [t for t in replies if t > flushed]
    gap = max(b - a for a, b in zip([last, *after][:-1], after, strict=True))
    print(f"n1 -> n2: the longest gap in ping replies after the NATs were flushed: {gap:.1f}s")
    lab.wait_full(timeout=30)
    lab.ping_all()

    # Answers to probes n1 never sent are ignored and counted; its endpoint stays.
    before = discovery_status(lab, "n1")["probes"]
    lab.run("exec", "n1", "--", sys.executable, "-c", FORGE)

    def counted() -> bool:  # the malformed one was sent last: wait for it too
        probes = discovery_status(lab, "n1")["probes"]
        return (probes["forged"] >= before["forged"] + 3
                and probes["malformed"] >= before["malformed"] + 1)

    poll(counted, what="forged and malformed answers counted", timeout=20, interval=0.2)
    after = discovery_status(lab, "n1")
    assert after["probes"]["malformed"] == before["malformed"] + 1
    assert after["reflexiveEndpoints"] == ["192.0.2.1:51820"]
    lab.ping_all()


def _address(lab: LabCli, node: str) -> str:
    nodes = {v["name"]: v for v in lab.status()["nodes"]}
    address: str = nodes[node]["address"]
    return address


def _replies(text: str) -> list[float]:
    """The wall times of the replies in ``ping -D`` output."""
    return [float(m) for m in re.findall(r"^\[(\d+\.\d+)\] \d+ bytes from", text, re.M)]


def test_a_hard_nat_maps_each_destination_anew_and_a_udp_block_leaves_no_reflexive_endpoint(
        labs: Any) -> None:  # noqa: F811  (the fixture imported above)
    lab = labs()
    # n2 can reach nobody over UDP: only the lab's relay (over TCP) brings its pairs up
    done = lab.run("up", "--nodes", "3", "--nat", "n1:hard", "--block-udp", "n2",
                   "--timeout", "90", check=False)
    assert done.returncode == 0, done.stdout
    poll(lambda: bool(discovery_status(lab, "n1")["reflexiveEndpoints"]),
         what="n1's reflexive endpoint", timeout=20, interval=0.5)
    [reflexive] = discovery_status(lab, "n1")["reflexiveEndpoints"]
    assert reflexive.startswith("192.0.2.1:") and reflexive != "192.0.2.1:51820"
    pairs = lab.pairs()
    # n1 reached n3 (it sent first); n3 sees n1 at the port n1's NAT chose for n3 alone
    poll(lambda: lab.pairs()[("n3", "n1")]["state"] == "up", what="n3 -> n1 up",
         timeout=40, interval=0.5)
    seen_by_n3 = lab.pairs()[("n3", "n1")]["endpoint"]
    assert seen_by_n3.startswith("192.0.2.1:") and seen_by_n3 != reflexive
    blocked = discovery_status(lab, "n2")
    assert blocked["reflexiveEndpoints"] == [] and blocked["probes"]["sent"] > 0
    assert blocked["probes"]["answered"] == 0
    assert all((pairs[(a, b)]["state"], pairs[(a, b)]["path"]) == ("up", "relayed")
               for a, b in (("n2", "n1"), ("n2", "n3")))
    label = lab.run("status", "--no-rtt").stdout
    assert "n1 hard-nat" in label and "n2 easy-nat no-udp" in label
