"""uspan.node.routing against the real kernel, in a namespace of the test's own."""

from __future__ import annotations

import ipaddress

import pytest

from uspan.node.routing import RULE_PRIORITY, MeshRouting, RoutingError
from uspan.testbed import Lab, Namespace

pytestmark = pytest.mark.system


@pytest.fixture
def ns(lab: Lab) -> Namespace:
    return lab.namespace("rt")


def show(ns: Namespace, *args: str) -> str:
    return ns.ip(*args).stdout


def test_rules_routes_and_address_follow_the_peers_and_vanish_on_close(
        lab: Lab, ns: Namespace) -> None:
    name = lab.interface_name()
    ns.ip("tuntap", "add", "mode", "tun", "name", name)
    routing = MeshRouting(name, table=181, fwmark=0x20, netns=ns.name)
    try:
        routing.bring_up(ipaddress.ip_interface("fd7f:175a:b97c:5602::1/64"), 1380)
        for family in ("-4", "-6"):
            rules = show(ns, family, "rule")
            assert f"{RULE_PRIORITY}:\tnot from all fwmark 0x20/0x20 lookup 181" in rules
        assert "mtu 1380" in show(ns, "link", "show", name)
        assert "fd7f:175a:b97c:5602::1/64" in show(ns, "addr", "show", name)
        peer6 = ipaddress.ip_network("fd7f:175a:b97c:5602::2/128")
        node4 = ipaddress.ip_network("192.0.2.2/32")
        assert routing.sync_routes([peer6, node4]) == (2, 0)
        assert routing.sync_routes([peer6, node4]) == (0, 0)
        assert f"192.0.2.2 dev {name}" in show(ns, "-4", "route", "show", "table", "181")
        # A peer going down: its node address bypasses the mesh again.
        assert routing.sync_routes([peer6]) == (0, 1)
        assert show(ns, "-4", "route", "show", "table", "181").strip() == ""
        assert f"fd7f:175a:b97c:5602::2 dev {name}" in show(
            ns, "-6", "route", "show", "table", "181")
        routing.set_mtu(1420)
        assert "mtu 1420" in show(ns, "link", "show", name)
    finally:
        routing.close()
    assert "lookup 181" not in show(ns, "-6", "rule") + show(ns, "-4", "rule")
    assert show(ns, "-6", "route", "show", "table", "181").strip() == ""
    assert "fd7f:175a" not in show(ns, "addr", "show", name)


def test_missing_interface_is_named(lab: Lab, ns: Namespace) -> None:
    routing = MeshRouting("nosuchif0", netns=ns.name)
    try:
        with pytest.raises(RoutingError, match="nosuchif0"):
            routing.bring_up(ipaddress.ip_interface("fd00::1/64"), 1420)
    finally:
        routing.close()
