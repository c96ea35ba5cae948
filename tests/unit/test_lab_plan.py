"""The lab's address plan, names and record: pure parts of ``uspan lab``."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from uspan.lab import plan
from uspan.lab.record import LabError, LabRecord, NodeRecord, Proc, load, names, resolve


def test_networks_use_documentation_ranges() -> None:
    assert [plan.v4(k, 7) for k in range(5)] == [
        "192.0.2.7", "198.51.100.7", "203.0.113.7", "198.18.0.7", "198.18.1.7"]
    assert plan.v6(0, 7) == "2001:db8:0::7" and plan.v6(1, 250) == "2001:db8:1::fa"
    for k in range(plan.MAX_NETWORKS):
        assert plan.v4_net(k).is_private and plan.v6_net(k).subnet_of(
            ipaddress.IPv6Network("2001:db8::/32"))


def test_network_of_endpoints() -> None:
    assert plan.network_of("192.0.2.3:51820", 2) == 0
    assert plan.network_of("198.51.100.3:51820", 2) == 1
    assert plan.network_of("[2001:db8:1::3]:51820", 2) == 1
    assert plan.network_of("198.19.3.2:51820", 2) is None  # a NAT node's inner address
    assert plan.network_of("203.0.113.1:1", 2) is None  # network 2 is not in this lab


def test_sizes_and_names_are_checked() -> None:
    plan.check_size(250, 8)
    with pytest.raises(plan.PlanError, match=r"too many nodes.*250"):
        plan.check_size(251, 1)
    with pytest.raises(plan.PlanError, match="choose 1 to 8"):
        plan.check_size(3, 9)
    with pytest.raises(plan.PlanError, match="bad lab name"):
        plan.check_name("Bad_Name")


def test_interface_names_fit_and_differ() -> None:
    assert plan.interface("lab", 3) == "ks-lab-3"
    long = [plan.interface("a-much-longer-n", i) for i in (1, 10, 250)]
    assert all(len(name) <= 15 for name in long) and len(set(long)) == 3
    assert plan.interface("a-much-longer-n", 1) != plan.interface("a-much-longer-m", 1)


def test_record_round_trip_and_lookup(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    record = LabRecord(name="x", root=str(tmp_path), networks=2, mtu=1420)
    record.nodes.append(NodeRecord("n1", 1, "uspan", None, "ks-x-1", "uspan-x-n1",
                                   proc=Proc(42, "123", ["uspan", "run"])))
    record.namespaces.append("uspan-x-sw")
    record.save()
    again = load(tmp_path, "x")
    assert again == record
    assert names(tmp_path) == ["x"] and resolve(tmp_path, None).name == "x"
    with pytest.raises(LabError, match="no node 'n2'"):
        again.node("n2")
    with pytest.raises(LabError, match="no lab named 'y'"):
        load(tmp_path, "y")


def test_nat_kinds_parse_and_easy_is_the_default() -> None:
    assert plan.parse_nat(["n1", "n2:hard", "n3:easy"]) == {
        "n1": "easy", "n2": "hard", "n3": "easy"}
    assert plan.NAT_KINDS["hard"] == ["--random-fully"]
    with pytest.raises(plan.PlanError, match="easy or hard"):
        plan.parse_nat(["n1:symmetric"])


def test_path_kind_of_a_pair() -> None:
    from uspan.lab.status import Pair, path_kind

    assert path_kind(Pair("n1", "n2", "up", "192.0.2.2:51820"), False) == "direct"
    assert path_kind(Pair("n1", "n2", "up", "192.0.2.2:51820"), True) == "punched"
    assert path_kind(Pair("n1", "n2", "up", "relay:192.0.2.254:3478"), True) == "relayed"
    assert path_kind(Pair("n1", "n2", "down", "192.0.2.2:51820"), True) is None
