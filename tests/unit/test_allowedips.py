"""Cryptokey routing table: the kernel selftest cases, a brute-force model, and size."""

import gc
import ipaddress
import random
import struct
import sys
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uspan.wg import allowedips
from uspan.wg.allowedips import AllowedIPs, PrefixTexts
from uspan.wg.config import Network, Prefix
from uspan.wg.device import APPLY_STEP
from uspan.wg.prefix import of, texts


@dataclass(eq=True)
class Peer:
    """Stands in for a peer; eq=True makes it unhashable, as a mutable dataclass peer is."""

    name: str


def v4(a: int, b: int, c: int, d: int, length: int = 32) -> Prefix:
    return of(ipaddress.IPv4Network((bytes([a, b, c, d]), length), strict=False))


def v6(a: int, b: int, c: int, d: int, length: int = 128) -> Prefix:
    return of(ipaddress.IPv6Network((struct.pack(">4I", a, b, c, d), length), strict=False))


def net(text: str) -> Prefix:
    return of(ipaddress.ip_network(text, strict=False))


def raw4(a: int, b: int, c: int, d: int) -> bytes:
    return bytes([a, b, c, d])


def raw6(a: int, b: int, c: int, d: int) -> bytes:
    return struct.pack(">4I", a, b, c, d)


def test_kernel_selftest_table() -> None:
    # Inserts and lookups of drivers/net/wireguard/selftest/allowedips.c, which
    # wireguard-go's allowedips_test.go ports; several inserts carry host bits.
    a, b, c, d, e, f, g, h = (Peer(n) for n in "abcdefgh")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([v4(192, 168, 4, 0, 24)], a)
    t.insert([v4(192, 168, 4, 4, 32)], b)
    t.insert([v4(192, 168, 0, 0, 16)], c)
    t.insert([v4(192, 95, 5, 64, 27)], d)
    t.insert([v4(192, 95, 5, 65, 27)], c)  # same prefix after masking: moves d's to c
    t.insert([v6(0x26075300, 0x60006B00, 0, 0xC05F0543, 128)], d)
    t.insert([v6(0x26075300, 0x60006B00, 0, 0, 64)], c)
    t.insert([v4(0, 0, 0, 0, 0)], e)
    t.insert([v6(0, 0, 0, 0, 0)], e)
    t.insert([v6(0, 0, 0, 0, 0)], f)  # moves ::/0 from e to f
    t.insert([v6(0x24046800, 0, 0, 0, 32)], g)
    t.insert([v6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF, 64)], h)
    t.insert([v6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF, 128)], a)
    t.insert([v6(0x24446800, 0x40E40800, 0xDEAEBEEF, 0x0DEFBEEF, 128)], c)
    t.insert([v6(0x24446800, 0xF0E40800, 0xEEAEBEEF, 0, 98)], b)
    t.insert([v4(64, 15, 112, 0, 20)], g)
    t.insert([v4(64, 15, 123, 211, 25)], h)
    t.insert([v4(10, 0, 0, 0, 25)], a)
    t.insert([v4(10, 0, 0, 128, 25)], b)
    t.insert([v4(10, 1, 0, 0, 30)], a)
    t.insert([v4(10, 1, 0, 4, 30)], b)
    t.insert([v4(10, 1, 0, 8, 29)], c)
    t.insert([v4(10, 1, 0, 16, 29)], d)

    expected = [
        (a, raw4(192, 168, 4, 20)),
        (a, raw4(192, 168, 4, 0)),
        (b, raw4(192, 168, 4, 4)),
        (c, raw4(192, 168, 200, 182)),
        (c, raw4(192, 95, 5, 68)),
        (e, raw4(192, 95, 5, 96)),
        (d, raw6(0x26075300, 0x60006B00, 0, 0xC05F0543)),
        (c, raw6(0x26075300, 0x60006B00, 0, 0xC02E01EE)),
        (f, raw6(0x26075300, 0x60006B01, 0, 0)),
        (g, raw6(0x24046800, 0x40040806, 0, 0x1006)),
        (g, raw6(0x24046800, 0x40040806, 0x1234, 0x5678)),
        (f, raw6(0x240467FF, 0x40040806, 0x1234, 0x5678)),
        (f, raw6(0x24046801, 0x40040806, 0x1234, 0x5678)),
        (h, raw6(0x24046800, 0x40040800, 0x1234, 0x5678)),
        (h, raw6(0x24046800, 0x40040800, 0, 0)),
        (h, raw6(0x24046800, 0x40040800, 0x10101010, 0x10101010)),
        (a, raw6(0x24046800, 0x40040800, 0xDEADBEEF, 0xDEADBEEF)),
        (g, raw4(64, 15, 116, 26)),
        (g, raw4(64, 15, 127, 3)),
        (g, raw4(64, 15, 123, 1)),
        (h, raw4(64, 15, 123, 128)),
        (h, raw4(64, 15, 123, 129)),
        (a, raw4(10, 0, 0, 52)),
        (b, raw4(10, 0, 0, 220)),
        (a, raw4(10, 1, 0, 2)),
        (b, raw4(10, 1, 0, 6)),
        (c, raw4(10, 1, 0, 10)),
        (d, raw4(10, 1, 0, 20)),
    ]
    for number, (peer, address) in enumerate(expected, 1):
        assert t.lookup(address) is peer, f"case {number}: {address.hex()}"
    assert len(t) == 21
    assert t.prefixes(d) == [
        v6(0x26075300, 0x60006B00, 0, 0xC05F0543, 128),
        v4(10, 1, 0, 16, 29),
    ]
    assert t.prefixes(e) == [v4(0, 0, 0, 0, 0)]

    hosts = [(1, 0, 0, 0), (64, 0, 0, 0), (128, 0, 0, 0), (192, 0, 0, 0), (255, 0, 0, 0)]
    for host in hosts:
        t.insert([v4(*host)], a)
    for host in hosts:
        assert t.lookup(raw4(*host)) is a
    t.remove_value(a)
    for host in hosts:
        assert t.lookup(raw4(*host)) is e
    assert t.lookup(raw4(192, 168, 4, 20)) is c
    assert t.prefixes(a) == []

    for peer in (a, b, c, d, e, f, g, h):
        t.remove_value(peer)
    assert len(t) == 0
    assert t.lookup(raw4(10, 1, 0, 20)) is None
    assert t.lookup(raw6(0, 0, 0, 0)) is None


def test_remove_value_with_nested_prefixes() -> None:
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([v4(192, 168, 0, 0, 16)], a)
    t.insert([v4(192, 168, 0, 0, 24)], a)
    t.remove_value(a)
    assert t.lookup(raw4(192, 168, 0, 1)) is None
    assert len(t) == 0


def test_hosts_differing_in_one_bit() -> None:
    # The kernel's 128 /128 inserts of all-ones addresses with one bit cleared.
    a, b = Peer("a"), Peer("b")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net("::/0")], b)
    ones = (1 << 128) - 1
    hosts = [ones ^ (1 << i) for i in range(128)]
    for host in hosts:
        t.insert([of(ipaddress.IPv6Network((host, 128)))], a)
    assert len(t) == 129
    for host in hosts:
        assert t.lookup(host.to_bytes(16, "big")) is a
    assert t.lookup(ones.to_bytes(16, "big")) is b
    t.remove_value(a)
    assert len(t) == 1
    assert t.lookup(hosts[5].to_bytes(16, "big")) is b


def test_networks_are_masked_and_in_insertion_order() -> None:
    # The kernel selftest's read-back of a peer's nodes.
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([v4(192, 95, 5, 93, 27)], a)
    t.insert([v6(0x26075300, 0x60006B00, 0, 0xC05F0543, 128)], a)
    t.insert([v4(10, 1, 0, 20, 29)], a)
    t.insert([v6(0x26075300, 0x6D8A6BF8, 0xDAB1F1DF, 0xC05F1523, 83)], a)
    t.insert([v6(0x26075300, 0x6D8A6BF8, 0xDAB1F1DF, 0xC05F1523, 21)], a)
    assert t.prefixes(a) == [
        net("192.95.5.64/27"),
        net("2607:5300:6000:6b00::c05f:543/128"),
        net("10.1.0.16/29"),
        v6(0x26075300, 0x6D8A6BF8, 0xDAB1E000, 0, 83),
        net("2607:5000::/21"),
    ]
    assert texts(t.prefixes(a))[3] == "2607:5300:6d8a:6bf8:dab1:e000::/83"


def test_families_are_separate() -> None:
    four, six = Peer("4"), Peer("6")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net("0.0.0.0/0")], four)
    assert t.lookup(bytes(16)) is None
    assert t.lookup(bytes(4)) is four
    t.insert([net("::/0")], six)
    assert t.lookup(bytes(16)) is six
    assert t.lookup(bytes(4)) is four
    # An IPv4-mapped IPv6 address is IPv6 here, as on the wire.
    assert t.lookup(ipaddress.ip_address("::ffff:10.0.0.1").packed) is six
    assert t.remove([net("0.0.0.0/0")], four)
    assert t.lookup(raw4(8, 8, 8, 8)) is None
    assert t.lookup(bytes(16)) is six


def test_lookup_accepts_memoryview_and_ignores_other_lengths() -> None:
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net("0.0.0.0/0")], a)
    t.insert([net("::/0")], a)
    header = memoryview(bytes(12) + raw4(10, 0, 0, 1) + raw4(10, 0, 0, 2))
    assert t.lookup(header[12:16]) is a
    assert t.lookup(b"") is None
    assert t.lookup(bytes(5)) is None
    assert t.lookup(bytes(15)) is None


def test_moving_a_prefix_between_peers() -> None:
    a, b = Peer("a"), Peer("b")
    t: AllowedIPs[Peer] = AllowedIPs()
    moved = net("10.0.0.0/24")
    t.insert([moved], a)
    t.insert([net("10.9.0.0/16")], a)
    t.insert([net("10.0.0.0/24")], b)
    assert t.lookup(raw4(10, 0, 0, 7)) is b
    assert t.prefixes(a) == [net("10.9.0.0/16")]
    assert t.prefixes(b) == [moved]
    assert len(t) == 2
    assert not t.remove([moved], a)
    assert t.lookup(raw4(10, 0, 0, 7)) is b
    assert t.remove([moved], b)
    assert not t.remove([moved], b)
    assert t.lookup(raw4(10, 0, 0, 7)) is None
    assert t.prefixes(b) == []
    assert len(t) == 1


def test_reinserting_keeps_one_entry_and_its_place() -> None:
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    first, second = net("10.0.0.0/8"), net("fd00::/8")
    t.insert([first], a)
    t.insert([second], a)
    t.insert([net("10.1.2.3/8")], a)
    assert t.prefixes(a) == [first, second]
    assert len(t) == 2


def test_remove_of_absent_prefix_and_unknown_value() -> None:
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    assert not t.remove([net("10.0.0.0/8")], a)
    t.remove_value(a)
    t.insert([net("10.0.0.0/8")], a)
    assert not t.remove([net("10.0.0.0/9")], a)
    assert not t.remove([net("10.0.0.0/8")], Peer("a"))  # equal, not the same
    assert t.lookup(raw4(10, 200, 0, 1)) is a


def test_none_value_is_refused() -> None:
    t: AllowedIPs[None] = AllowedIPs()
    with pytest.raises(ValueError, match="not None"):
        t.insert([net("10.0.0.0/8")], None)
    assert len(t) == 0


class _Model:
    """Brute force: a dict of prefixes, and a linear scan for the longest match."""

    def __init__(self) -> None:
        self.routes: dict[tuple[int, int, int], tuple[Network, Peer]] = {}

    def insert(self, network: Network, peer: Peer) -> None:
        key = (network.version, int(network.network_address), network.prefixlen)
        if key in self.routes and self.routes[key][1] is peer:
            return
        self.routes.pop(key, None)  # a moved prefix goes to the end of its new owner's list
        self.routes[key] = (network, peer)

    def remove(self, network: Network, peer: Peer) -> bool:
        key = (network.version, int(network.network_address), network.prefixlen)
        if key in self.routes and self.routes[key][1] is peer:
            del self.routes[key]
            return True
        return False

    def remove_value(self, peer: Peer) -> None:
        self.routes = {k: v for k, v in self.routes.items() if v[1] is not peer}

    def lookup(self, address: bytes) -> Peer | None:
        version = {4: 4, 16: 6}[len(address)]
        width = len(address) * 8
        number = int.from_bytes(address, "big")
        best, best_length = None, -1
        for (family, network, length), (_, peer) in self.routes.items():
            if family != version:
                continue
            mask = ((1 << length) - 1) << (width - length)
            if number & mask == network and length > best_length:
                best, best_length = peer, length
        return best

    def prefixes(self, peer: Peer) -> list[Prefix]:
        return [of(network) for network, owner in self.routes.values() if owner is peer]


def _mutate(rng: random.Random, address: int, width: int) -> int:
    """Keep a random-length leading part of ``address`` and randomize the rest."""
    keep = rng.randrange(width)
    low = (1 << (width - keep)) - 1
    return (address & ~low) | (rng.getrandbits(width) & low)


def test_random_tables_match_brute_force_model() -> None:
    # Shaped like the kernel's randomized selftest: random routes, routes sharing
    # random-length prefixes with them, queries near them, then peers removed one by one.
    rng = random.Random(2017)
    peers = [Peer(str(i)) for i in range(8)]
    table: AllowedIPs[Peer] = AllowedIPs()
    model = _Model()
    queries: list[bytes] = []
    for network_type, width in ((ipaddress.IPv4Network, 32), (ipaddress.IPv6Network, 128)):
        for _ in range(200):
            base = rng.getrandbits(width)
            for address in [base] + [_mutate(rng, base, width) for _ in range(9)]:
                network = network_type((address, rng.randint(0, width)), strict=False)
                peer = rng.choice(peers)
                table.insert([of(network)], peer)
                model.insert(network, peer)
                queries.append(address.to_bytes(width // 8, "big"))
                queries.append(_mutate(rng, address, width).to_bytes(width // 8, "big"))
        queries += [rng.getrandbits(width).to_bytes(width // 8, "big") for _ in range(200)]
    assert len(table) == len(model.routes) > 3500
    sample = rng.sample(queries, 600)
    for round_number, peer in enumerate([*peers, None]):
        for address in sample:
            assert table.lookup(address) is model.lookup(address), (round_number, address.hex())
        for owner in peers:
            assert table.prefixes(owner) == model.prefixes(owner)
        if peer is not None:
            table.remove_value(peer)
            model.remove_value(peer)
            assert len(table) == len(model.routes)
    assert len(table) == 0


_PEERS = [Peer(str(i)) for i in range(3)]
# A small address space (a few top bits vary) so operations overlap and collide.
_ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "remove", "remove_value"]),
        st.integers(0, len(_PEERS) - 1),
        st.sampled_from([4, 6]),
        st.integers(0, 15),
        st.integers(0, 6),
    ),
    max_size=60,
)


def _network(version: int, top: int, length: int) -> Network:
    if version == 4:
        return ipaddress.IPv4Network((top << 28, length), strict=False)
    return ipaddress.IPv6Network((top << 124, length), strict=False)


@settings(max_examples=300, deadline=None)
@given(ops=_ops)
def test_operation_sequences_match_model(ops: list[tuple[str, int, int, int, int]]) -> None:
    table: AllowedIPs[Peer] = AllowedIPs()
    model = _Model()
    for op, index, version, top, length in ops:
        peer, network = _PEERS[index], _network(version, top, length)
        if op == "insert":
            table.insert([of(network)], peer)
            model.insert(network, peer)
        elif op == "remove":
            assert table.remove([of(network)], peer) == model.remove(network, peer)
        else:
            table.remove_value(peer)
            model.remove_value(peer)
    assert_matches(table, model, lookups=True)


def assert_matches(table: AllowedIPs[Peer], model: _Model, *, lookups: bool) -> None:
    """The same size, owners' prefixes in the same order, and (``lookups``) routes."""
    assert len(table) == len(model.routes)
    for peer in _PEERS:
        assert table.prefixes(peer) == model.prefixes(peer)
    for top in range(16 if lookups else 0):
        for address in ((top << 28).to_bytes(4, "big"), (top << 124).to_bytes(16, "big")):
            assert table.lookup(address) is model.lookup(address)


def test_one_peer_with_130000_prefixes_and_40_small_peers() -> None:
    big, default = Peer("big"), Peer("default")
    small = [Peer(f"small{i}") for i in range(40)]
    table: AllowedIPs[Peer] = AllowedIPs()
    table.insert([net("0.0.0.0/0")], default)
    # 100,000 /32 hosts in 10.0.0.0/8 and 30,000 /24 networks in 11.0.0.0/8 and up.
    hosts = [ipaddress.IPv4Network(((10 << 24) + i * 7, 32)) for i in range(100_000)]
    nets = [ipaddress.IPv4Network(((11 << 24) + (i << 8), 24)) for i in range(30_000)]
    for network in hosts + nets:
        table.insert([of(network)], big)
    # Each small peer: a /16 under big's /32s, and 51 IPv6 /64s in its own /48.
    for i, peer in enumerate(small):
        table.insert([of(ipaddress.IPv4Network(((10 << 24) + (i << 16), 16)))], peer)
        for j in range(51):
            table.insert([of(ipaddress.IPv6Network(((0xFD00 << 112) + (i << 80) + (j << 64), 64)))],
                         peer)
    assert len(table) == 1 + 130_000 + 40 * 52
    assert len(table.prefixes(big)) == 130_000
    assert table.prefixes(big)[:2] == [of(host) for host in hosts[:2]]
    assert all(len(table.prefixes(peer)) == 52 for peer in small)

    rng = random.Random(130)
    for network in rng.sample(hosts, 2000):
        assert table.lookup(network.network_address.packed) is big
        neighbour = int(network.network_address) + 1
        owner = small[(neighbour >> 16) & 0xFF] if (neighbour >> 16) & 0xFF < 40 else default
        assert table.lookup(neighbour.to_bytes(4, "big")) is owner
    for network in rng.sample(nets, 2000):
        assert table.lookup((int(network.network_address) + 200).to_bytes(4, "big")) is big
    for i, peer in enumerate(small):
        inside = (0xFD00 << 112) + (i << 80) + (rng.randrange(51) << 64) + 1
        assert table.lookup(inside.to_bytes(16, "big")) is peer
    assert table.lookup(((0xFD00 << 112) + (99 << 80)).to_bytes(16, "big")) is None

    table.remove_value(big)
    assert len(table) == 1 + 40 * 52
    assert table.lookup(hosts[0].network_address.packed) is small[0]
    assert table.lookup(nets[0].network_address.packed) is default


def pieces(t: AllowedIPs[Peer], peer: Peer, step: int = 2) -> list[bytes]:
    """Read an owner's lines as get=1 does: piece after piece."""
    snapshot = t.texts(peer)
    assert isinstance(snapshot, PrefixTexts)
    return [piece for _, piece in snapshot.lines(step)]


def read_whole(t: AllowedIPs[Peer], peer: Peer, step: int = 2) -> list[str]:
    """The texts of an owner's lines read as get=1 does (a small owner's: at once)."""
    snapshot = t.texts(peer)
    if not isinstance(snapshot, PrefixTexts):
        return list(snapshot)
    lines = b"".join(pieces(t, peer, step)).decode().splitlines()
    assert all(line.startswith("allowed_ip=") for line in lines)
    return [line.removeprefix("allowed_ip=") for line in lines]


def test_text_read_whole_is_kept_until_the_prefixes_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allowedips, "KEEP_TEXT_AT", 1)
    monkeypatch.setattr(allowedips, "RENDER_AT_ONCE", 0)
    a, b = Peer("a"), Peer("b")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net("10.0.0.0/8"), net("fd00::/8"), net("10.1.0.0/16")], a)
    assert read_whole(t, a) == ["10.0.0.0/8", "fd00::/8", "10.1.0.0/16"]
    kept = t.texts(a)
    (lines,) = pieces(t, a)
    assert lines == b"allowed_ip=10.0.0.0/8\nallowed_ip=fd00::/8\nallowed_ip=10.1.0.0/16\n"
    assert pieces(t, a)[0] is lines  # no rendering any more: the lines read before
    for change, expected in [
        (lambda: t.insert([net("10.2.0.0/16")], a),
         ["10.0.0.0/8", "fd00::/8", "10.1.0.0/16", "10.2.0.0/16"]),
        (lambda: t.remove([net("fd00::/8")], a), ["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"]),
        (lambda: t.insert([net("10.1.0.0/16")], b), ["10.0.0.0/8", "10.2.0.0/16"]),  # taken
        (lambda: t.remove_value(a, 1), ["10.2.0.0/16"]),
    ]:
        change()
        assert list(t.texts(a)) == expected
        assert read_whole(t, a) == expected
        assert t.texts(a) == expected
    assert kept == ["10.0.0.0/8", "fd00::/8", "10.1.0.0/16"]  # a snapshot never changes
    t.remove_value(a)
    assert t.texts(a) == []


def test_a_small_peers_text_is_not_kept() -> None:
    """Kept, a one-prefix peer's text cost ~390 bytes: 7.8 MB for 20,000 peers after
    one ``wg show``, to save a microsecond of rendering each."""
    t: AllowedIPs[Peer] = AllowedIPs()
    peers = [Peer(str(i)) for i in range(3)]
    for i, peer in enumerate(peers):
        t.insert([net(f"10.0.0.{i}/32")], peer)
        assert read_whole(t, peer) == [f"10.0.0.{i}/32"]
    assert all(t._owned[id(peer)].texts is None for peer in peers)
    big = Peer("big")
    t.insert([net(f"10.1.{i >> 8}.{i & 255}/32") for i in range(allowedips.KEEP_TEXT_AT)], big)
    read_whole(t, big, step=64)
    assert t._owned[id(big)].texts


def test_a_small_peers_snapshot_is_its_text_at_once() -> None:
    """A snapshot object per peer, its holds and their release were 60 % of the CPU of
    a ``get`` of 20,000 one-prefix peers: a peer with a few prefixes is rendered at once."""
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net("10.0.0.0/8"), net("fd00::/8")], a)
    snapshot = t.texts(a)
    assert type(snapshot) is list and snapshot == ["10.0.0.0/8", "fd00::/8"]
    assert t._owned[id(a)].held is None  # nothing to release
    t.insert([net("10.2.0.0/16")], a)
    assert snapshot == ["10.0.0.0/8", "fd00::/8"]


def test_a_step_of_a_get_renders_at_most_a_pieces_worth_at_once() -> None:
    """A get's snapshot is taken INFO_STEP peers a step: a peer with a few hundred routes
    rendered at once made one step of 16,000 prefixes (18-49 ms)."""
    from uspan.wg.device import INFO_STEP
    from uspan.wg.uapi import GET_PIECE_LINES

    assert INFO_STEP * allowedips.RENDER_AT_ONCE <= GET_PIECE_LINES
    a, b = Peer("a"), Peer("b")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net(f"10.0.{i}.0/24") for i in range(allowedips.RENDER_AT_ONCE)], a)
    t.insert([net(f"10.1.{i}.0/24") for i in range(allowedips.RENDER_AT_ONCE + 1)], b)
    assert type(t.texts(a)) is list
    assert type(t.texts(b)) is not list  # rendered as the get's pieces are read


def test_a_snapshot_read_after_a_change_is_not_kept() -> None:
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net("10.0.0.0/8"), net("10.1.0.0/16")], a)
    snapshot = t.texts(a)
    t.insert([net("10.2.0.0/16")], a)
    assert snapshot[0:2] == ["10.0.0.0/8", "10.1.0.0/16"]  # the old state, read whole
    assert t.texts(a)[0] is not t.texts(a)[0]  # rendered at each read
    assert read_whole(t, a) == ["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"]
    assert t.texts(a) == ["10.0.0.0/8", "10.1.0.0/16", "10.2.0.0/16"]


def test_a_change_renders_again_only_the_segments_it_touched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allowedips, "SHARD_AT", 2)
    monkeypatch.setattr(allowedips, "KEEP_TEXT_AT", 1)
    monkeypatch.setattr(allowedips, "RENDER_AT_ONCE", 0)
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net(f"10.0.0.{i}/32") for i in range(6)], a)  # segments of 2
    before = t.texts(a)
    assert read_whole(t, a, step=3) == [f"10.0.0.{i}/32" for i in range(6)]
    kept = pieces(t, a)
    t.remove([net("10.0.0.2/32")], a)
    after = pieces(t, a)
    assert [one is kept[i] for i, one in enumerate(after)] == [True, False, True]
    assert after[1] == b"allowed_ip=10.0.0.3/32\n"
    assert list(before) == [f"10.0.0.{i}/32" for i in range(6)]  # a snapshot never changes


# Batches of a few prefixes each, of both families and mixed lengths (several tables in
# one batch, or one: the bulk path), with repeats, from a small space so peers collide.
_batch_ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "remove"]),
        st.integers(0, len(_PEERS) - 1),
        st.lists(st.tuples(st.sampled_from([4, 4, 6]), st.integers(0, 15),
                           st.sampled_from([0, 3, 6, 6, 6])), max_size=12),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(ops=_batch_ops)
def test_batches_match_the_model_prefix_by_prefix(
        ops: list[tuple[str, int, list[tuple[int, int, int]]]]) -> None:
    """A batch (what the UAPI gives insert and remove) has the effect of its prefixes one
    at a time, in order: takeovers from other peers, removes of prefixes that others
    own (ignored), repeats, and each owner's order of prefixes."""
    table: AllowedIPs[Peer] = AllowedIPs()
    model = _Model()
    for op, index, batch in ops:
        peer = _PEERS[index]
        networks = [_network(version, top, length) for version, top, length in batch]
        if op == "insert":
            table.insert([of(network) for network in networks], peer)
            for network in networks:
                model.insert(network, peer)
        else:
            removed = sum(model.remove(network, peer) for network in networks)
            assert table.remove([of(network) for network in networks], peer) == removed
        assert_matches(table, model, lookups=False)
    assert_matches(table, model, lookups=True)


def _dict_sizes(table: AllowedIPs[Peer]) -> list[tuple[int, bool]]:
    """Each dict that grows with the prefixes: (its size, whether it may pass SHARD_AT:
    a routing shard as split as SHARD_DEPTH allows)."""
    sizes = [(len(shard), depth == allowedips.SHARD_DEPTH)
             for one in table._tables.values()
             for shard, depth in zip(one.shards, one.depths, strict=True)]
    sizes += [(len(segment), False) for owner in table._owned.values()
              for segment in owner.segments]
    return sizes


def _distinct(shards: list[dict[Prefix, Peer]]) -> int:
    return len({id(shard) for shard in shards})


def _shards_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of at most 3 prefixes from one per table, split by the bits from bit 1."""
    monkeypatch.setattr(allowedips, "SHARD_AT", 3)
    monkeypatch.setattr(allowedips, "SHARD_START", 0)
    monkeypatch.setattr(allowedips, "SHARD_SHIFT", 1)
    monkeypatch.setattr(allowedips, "SHARD_DEPTH", 4)


# Long prefixes over 7 low bits, so shards fill, split and empty, in batches.
_sharded_ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "insert", "remove", "remove_value"]),
        st.integers(0, len(_PEERS) - 1),
        st.sampled_from([4, 6]),
        st.lists(st.tuples(st.integers(0, 127), st.integers(0, 2)), min_size=1, max_size=12),
    ),
    max_size=40,
)


@pytest.mark.parametrize("split_step", [None, 1])  # 1: every split spans calls
@settings(max_examples=300, deadline=None)
@given(ops=_sharded_ops)
def test_sharded_tables_match_model_and_no_dict_passes_the_threshold(
        split_step: int | None, ops: list[tuple[str, int, int, list[tuple[int, int]]]]) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        _shards_small(monkeypatch)
        if split_step is not None:  # changes to a shard while it splits reach its halves
            monkeypatch.setattr(allowedips, "SPLIT_STEP", split_step)
        _sharded_run(ops)


def _sharded_run(ops: list[tuple[str, int, int, list[tuple[int, int]]]]) -> None:
    table: AllowedIPs[Peer] = AllowedIPs()
    model = _Model()

    def _shards() -> dict[int, list[dict[Prefix, Peer]]]:
        return {tag: list(one.shards) for tag, one in table._tables.items()}

    for op, index, version, hosts in ops:
        peer, width = _PEERS[index], 32 if version == 4 else 128
        # Snapshots of the texts before the change, some of them read whole (kept).
        snapshots = [(table.texts(one), texts(model.prefixes(one))) for one in _PEERS]
        largest_before = max((size for size, _ in _dict_sizes(table)), default=0)
        shards_before = _shards()
        assert read_whole(table, peer) == snapshots[index][1]
        networks = [ipaddress.ip_network(((10 << (width - 8)) | host, width - cut), strict=False)
                    for host, cut in hosts]
        if op == "insert":
            table.insert([of(network) for network in networks], peer)
            for network in networks:
                model.insert(network, peer)
        elif op == "remove":
            owned = sum(model.remove(network, peer) for network in dict.fromkeys(networks))
            assert table.remove([of(network) for network in networks], peer) == owned
        else:
            table.remove_value(peer, len(hosts))
            for network in model.prefixes(peer)[:len(hosts)]:
                model.remove(ipaddress.ip_network(texts([network])[0]), peer)
        # A call splits each table's shards once at most (one more distinct shard, the
        # directory doubled at most), and a shard grows by one batch at most.
        largest = max((size for size, _ in _dict_sizes(table)), default=0)
        assert largest <= max(3, largest_before) + len(hosts)
        for tag, shards in _shards().items():
            before = shards_before.get(tag, [{}])
            assert len(shards) <= 2 * len(before)
            assert _distinct(shards) <= _distinct(before) + 1
        assert_matches(table, model, lookups=False)
        assert [list(snapshot) for snapshot, _ in snapshots] == [text for _, text in snapshots]
        assert [list(table.texts(one)) for one in _PEERS] == [
            texts(model.prefixes(one)) for one in _PEERS]
        for host, _ in hosts:
            address = ((10 << (width - 8)) | host).to_bytes(width // 8, "big")
            assert table.lookup(address) is model.lookup(address)


def test_a_growing_table_splits_before_any_dict_passes_the_threshold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 100,000 /32s in the daemon's batches of 256 with shards of 1,024 (from 4): after
    # every batch no dict holds more than 1,024 by much, and every host still routes.
    monkeypatch.setattr(allowedips, "SHARD_AT", 1024)
    monkeypatch.setattr(allowedips, "SHARD_START", 2)
    big, other = Peer("big"), Peer("other")
    table: AllowedIPs[Peer] = AllowedIPs()
    hosts = [(10 << 24) + i * 7 for i in range(100_000)]  # a stride, not a run
    largest = 0
    for start in range(0, len(hosts), 256):
        table.insert([of(ipaddress.IPv4Network(host)) for host in hosts[start:start + 256]], big)
        # (in C: _dict_sizes over a directory of thousands of entries after each of
        # 6,250 inserts took 25 s alone, past the 120 s timeout on a loaded machine)
        largest = max(largest, *(max(map(len, one.shards)) for one in table._tables.values()),
                      *map(len, next(iter(table._owned.values())).segments))
    # One split a call: shards past SHARD_AT that filled together wait their turn.
    assert largest <= 1024 + 2 * 256
    assert max(len(shard) for shard in table._tables[of(
        ipaddress.IPv4Network(hosts[0])) >> 32].shards) <= 1024 + 2 * 256
    assert len(table._tables[of(ipaddress.IPv4Network(hosts[0])) >> 32].shards) >= 128
    table.insert([of(ipaddress.IPv4Network(hosts[5]))], other)
    assert [table.lookup(raw4(*host.to_bytes(4, "big"))) for host in hosts[:8]] == [
        big] * 5 + [other] + [big] * 2
    assert table.prefixes(big)[:6] == [of(ipaddress.IPv4Network(h)) for h in hosts[:5] + hosts[6:7]]
    assert table.prefixes(big)[-1] == of(ipaddress.IPv4Network(hosts[-1]))
    (one,) = [one for one in table._tables.values() if one.size > 1]
    while table.remove_value(big, 256):
        assert max(size for size, _ in _dict_sizes(table)) <= 1024
        # An emptied shard is a new dict: none keeps its keys' memory to free at the end.
        assert all(sys.getsizeof(shard) < 200 for shard in one.shards if not shard)
    assert len(table) == 1


def test_splits_a_step_at_a_time_keep_up_with_a_growing_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # At the daemon's ratios (an insert of APPLY_STEP copies SPLIT_STEP of a shard that
    # splits past SHARD_AT), scaled down 16 times: while shards wait for their turn to
    # split they never reach 4/3 of SHARD_AT, where their dict would resize in one step.
    scale = 16
    monkeypatch.setattr(allowedips, "SHARD_AT", allowedips.SHARD_AT // scale)
    monkeypatch.setattr(allowedips, "SPLIT_STEP", allowedips.SPLIT_STEP // scale)
    monkeypatch.setattr(allowedips, "SHARD_START", 2)
    batch = APPLY_STEP // scale
    table: AllowedIPs[Peer] = AllowedIPs()
    hosts = [(10 << 24) + i * 7 for i in range(100_000)]
    largest = 0
    for start in range(0, len(hosts), batch):
        table.insert([of(ipaddress.IPv4Network(host)) for host in hosts[start:start + batch]],
                     Peer("big"))
        # (in C: _dict_sizes over a directory of thousands of entries after each of
        # 6,250 inserts took 25 s alone, past the 120 s timeout on a loaded machine)
        largest = max(largest, *(max(map(len, one.shards)) for one in table._tables.values()),
                      *map(len, next(iter(table._owned.values())).segments))
    assert largest < allowedips.SHARD_AT * 4 // 3
    assert all(table.lookup(host.to_bytes(4, "big")) == Peer("big") for host in hosts)


def test_a_small_owner_is_one_object_for_the_collector() -> None:
    # 20,000 peers of a prefix or two (issue 14): one tracked object each, as before
    # segments, also after their prefixes are read (by item or in full).
    peers = [Peer(str(i)) for i in range(2000)]
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([v4(10, 0, 0, 1)], peers[0])
    gc.collect()
    before = len(gc.get_objects())
    for i, peer in enumerate(peers[1:], 1):
        t.insert([v4(10, 1, i >> 8, i & 255), v6(0xFD00_0000, 0, i, 1)], peer)
    for peer in peers:
        assert t.texts(peer)[0].startswith("10.")
        assert len(list(t.texts(peer))) == len(t.prefixes(peer))
    gc.collect()
    assert len(gc.get_objects()) - before <= len(peers) + 200  # and the v6 table's shards


def test_a_dropped_snapshot_no_longer_holds_the_segments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A held segment is copied before it changes; once the get's snapshot is gone a
    # change edits the segments in place (a 1M owner's were all copied in one step).
    monkeypatch.setattr(allowedips, "SHARD_AT", 2)
    a = Peer("a")
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([net(f"10.0.0.{i}/32") for i in range(6)], a)
    (owner,) = t._owned.values()
    snapshot = t.texts(a)
    assert isinstance(snapshot, PrefixTexts)
    reading = snapshot.lines(1)
    assert [next(reading)[1] for _ in range(3)] == [
        f"allowed_ip=10.0.0.{i}/32\n".encode() for i in range(3)]  # 1 segment and a half
    held = list(owner.segments)
    t.remove([net("10.0.0.0/32"), net("10.0.0.3/32")], a)
    assert owner.segments[0] is held[0]  # read whole: released
    assert owner.segments[1] is not held[1]  # copied: the snapshot still reads it
    assert snapshot[:] == [f"10.0.0.{i}/32" for i in range(6)]
    assert len(list(reading)) == 3
    assert owner.held is None  # each segment read whole
    snapshot = t.texts(a)
    del snapshot
    assert owner.held is None
    segments = list(owner.segments)
    t.remove([net("10.0.0.5/32")], a)
    assert [one is segments[i] for i, one in enumerate(owner.segments)] == [True] * 3
    assert t.texts(a) == ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.4/32"]


def test_v6_hosts_that_differ_far_above_their_low_bits_spread_over_shards() -> None:
    # fd00:0:0:N::1/128: the low bits of the prefix are all alike (they shared one shard,
    # and splitting it cascaded through the directory).
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert([v6(0xFD00_0000, 0, n, 1) for n in range(4096)], Peer("a"))
    (table,) = t._tables.values()
    assert len(table.shards) == 1 << allowedips.SHARD_START
    assert max(map(len, table.shards)) <= 3 * 4096 >> allowedips.SHARD_START
    assert t.lookup(raw6(0xFD00_0000, 0, 4095, 1)) == Peer("a")


def test_an_insert_splits_a_shard_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prefixes whose shard hash is alike can not be split apart: an insert splits one
    # shard once, never the whole way down the directory in one step.
    monkeypatch.setattr(allowedips, "SHARD_AT", 4)
    monkeypatch.setattr(allowedips, "SHARD_START", 0)
    alike = [(i * allowedips.SHARD_SPREAD) << allowedips.SHARD_SHIFT for i in range(1, 17)]
    t: AllowedIPs[Peer] = AllowedIPs()
    for count in range(1, 5):
        t.insert([of(ipaddress.IPv4Network(host)) for host in alike[:4 * count]], Peer("a"))
        (table,) = t._tables.values()
        assert len(table.shards) == 1 << (count - 1)
    assert [t.lookup(host.to_bytes(4, "big")) for host in alike] == [Peer("a")] * 16


def test_a_big_shard_is_split_a_step_an_insert_and_routes_all_along(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A split moved half of a full shard (8,000 of 16,000 entries) in one call: 3-5 ms
    # in one step of a set. Now each insert copies at most SPLIT_STEP of its entries,
    # and every prefix routes to its value after each call.
    monkeypatch.setattr(allowedips, "SHARD_START", 0)  # one shard: it fills first
    full, step = allowedips.SHARD_AT, allowedips.SPLIT_STEP
    peers = [Peer("a"), Peer("b")]
    t: AllowedIPs[Peer] = AllowedIPs()
    hosts = list(range(10 << 24, (10 << 24) + full + 20 * 256))
    t.insert([of(ipaddress.IPv4Network(h)) for h in hosts[:full]], peers[0])
    (table,) = t._tables.values()

    def expected(index: int) -> Peer | None:
        if index < full:
            return peers[0]
        batch, offset = divmod(index - full, 256)
        return None if batch % 2 and offset < 8 else peers[batch % 2]

    copied = [0]
    for start in range(full, len(hosts), 256):
        batch = [of(ipaddress.IPv4Network(h)) for h in hosts[start:start + 256]]
        before = table.splitting.pos if table.splitting else 0
        t.insert(batch, peers[(start - full) // 256 % 2])
        t.remove(batch[:8], peers[1])  # changes while it splits reach its halves
        if table.splitting is not None:
            assert table.splitting.pos - before <= step
            copied.append(table.splitting.pos)
        for index in range(0, start + 256, 61):
            assert t.lookup(hosts[index].to_bytes(4, "big")) is expected(index), index
    assert len(copied) > full // step - 1  # the split spanned that many inserts
    assert len({id(shard) for shard in table.shards}) == 2  # and it is done
    assert all(t.lookup(host.to_bytes(4, "big")) is expected(index)
               for index, host in enumerate(hosts))


def test_a_stamp_changes_with_every_change_of_a_values_prefixes() -> None:
    """What a get keeps of a peer's text is kept by this stamp: the same stamp must mean
    the same prefixes, even after a value lost them all and got others."""
    t: AllowedIPs[str] = AllowedIPs()
    assert t.stamp("a") == 0
    seen = []
    t.insert([net("10.0.0.0/8")], "a")
    seen.append(t.stamp("a"))
    assert t.stamp("a") == t.stamp("a")  # reading changes nothing
    t.insert([net("10.1.0.0/16")], "a")
    seen.append(t.stamp("a"))
    t.insert([net("10.1.0.0/16")], "b")  # taken over by another value
    seen.append(t.stamp("a"))
    t.remove([net("10.0.0.0/8")], "a")
    assert t.stamp("a") == 0
    t.insert([net("10.0.0.0/8")], "a")  # its first prefixes again, a new owner
    seen.append(t.stamp("a"))
    t.remove_value("a")
    assert t.stamp("a") == 0 and t.stamp("b") not in (0, *seen)
    assert len(set(seen)) == len(seen) and 0 not in seen


def test_a_sorted_slice_across_runs_is_cut_at_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A set's slices of consecutive /32s that are not aligned to a run of
    2**SHARD_SHIFT go shard by shard as the runs cut them, with a shard index per run
    rather than per prefix, and change the table as prefix-by-prefix calls do."""
    hosts = [of(ipaddress.ip_network(f"10.0.{i >> 8}.{i & 255}/32")) for i in range(2000)]
    a, b = _PEERS[0], _PEERS[1]
    table: AllowedIPs[Peer] = AllowedIPs()
    model: AllowedIPs[Peer] = AllowedIPs()
    indexed = 0
    index = allowedips._Table.index

    def counted(self: allowedips._Table[Peer], prefix: Prefix) -> int:
        nonlocal indexed
        indexed += 1
        return index(self, prefix)

    monkeypatch.setattr(allowedips._Table, "index", counted)
    for start in range(100, 2000, APPLY_STEP):
        table.insert(hosts[start:start + APPLY_STEP], a)
    assert indexed < 30  # 8 slices of at most 2 runs; 1,900 before
    monkeypatch.setattr(allowedips._Table, "index", index)
    for host in hosts[100:]:
        model.insert([host], a)
    table.insert(hosts[700:900], b)  # a takeover across runs
    model.insert(hosts[700:900], b)
    for start in range(50, 2000, APPLY_STEP):  # some absent, some b's
        assert table.remove(hosts[start:start + APPLY_STEP], a) == sum(
            model.remove([host], a) for host in hosts[start:start + APPLY_STEP])
    for i in range(2000):
        address = bytes([10, 0, i >> 8, i & 255])
        assert table.lookup(address) is model.lookup(address)
    assert len(table) == len(model) == 200
