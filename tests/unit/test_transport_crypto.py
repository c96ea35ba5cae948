"""The batch transport AEAD: RFC 8439 known answers, and the compiled module
(uspan.wg._aead) giving byte for byte what the pyca fallback (aead_py) gives."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uspan.wg import aead_py, transport_crypto
from uspan.wg.endpoint import Endpoint
from uspan.wg.messages import padded_length

try:
    from uspan.wg import _aead
except ImportError:
    _aead = None  # type: ignore[assignment]

compiled = pytest.mark.skipif(_aead is None, reason="uspan.wg._aead was not built")
IMPLEMENTATIONS = [pytest.param(aead_py, id="python"),
                   pytest.param(_aead, id="compiled", marks=compiled)]


def test_compiled_module_is_used_when_required() -> None:
    """CI sets USPAN_REQUIRE_COMPILED=1 (scripts/test): a silent fallback fails here."""
    if os.environ.get("USPAN_REQUIRE_COMPILED") != "1":
        pytest.skip("USPAN_REQUIRE_COMPILED is not set")
    assert _aead is not None, "uspan.wg._aead did not build or import"
    assert transport_crypto.COMPILED and transport_crypto.Sealer is _aead.Sealer


# RFC 8439 A.2 test vector #2: ChaCha20 with key 00..01 and nonce 00..02 from block 1,
# which is the AEAD's ciphertext for that key and nonce (4 zero bytes and a little-endian
# counter, as WireGuard's), and A.4 test vector #2: the Poly1305 key of the same pair.
RFC_KEY = bytes(31) + b"\x01"
RFC_COUNTER = 2 << 56  # nonce 00000000 0000000000000002
RFC_PLAINTEXT = (
    b"Any submission to the IETF intended by the Contributor for publication as all or part"
    b" of an IETF Internet-Draft or RFC and any statement made within the context of an IETF"
    b' activity is considered an "IETF Contribution". Such statements include oral'
    b" statements in IETF sessions, as well as written and electronic communications made"
    b" at any time or place, which are addressed to"
)
RFC_CIPHERTEXT = bytes.fromhex(
    "a3fbf07df3fa2fde4f376ca23e82737041605d9f4f4f57bd8cff2c1d4b7955ec"
    "2a97948bd3722915c8f3d337f7d370050e9e96d647b7c39f56e031ca5eb6250d"
    "4042e02785ececfa4b4bb5e8ead0440e20b6e8db09d881a7c6132f420e527950"
    "42bdfa7773d8a9051447b3291ce1411c680465552aa6c405b7764d5e87bea85a"
    "d00f8449ed8f72d0d662ab052691ca66424bc86d2df80ea41f43abf937d3259d"
    "c4b2d0dfb48a6c9139ddd7f76966e928e635553ba76c5c879d7b35d49eb2e62b"
    "0871cdac638939e25e8a1e0ef9d5280fa8ca328b351c3c765989cbcf3daa8b6c"
    "cc3aaf9f3979c92b3720fc88dc95ed84a1be059c6499b9fda236e7e818b04b0b"
    "c39c1e876b193bfe5569753f88128cc08aaa9b63d1a16f80ef2554d7189c411f"
    "5869ca52c5b83fa36ff216b9c1d30062bebcfd2dc5bce0911934fda79a86f6e6"
    "98ced759c3ff9b6477338f3da4f9cd8514ea9982ccafb341b2384dd902f3d1ab"
    "7ac61dd29c6f21ba5b862f3730e37cfdc4fd806c22f221"
)
RFC_POLY1305_KEY = bytes.fromhex(
    "ecfa254f845f647473d3cb140da9e87606cb33066c447b87bc2666dde3fbb739")


def poly1305(key: bytes, message: bytes) -> bytes:
    """RFC 8439 2.5, written out to check the AEAD's tag."""
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    accumulator, prime = 0, (1 << 130) - 5
    for start in range(0, len(message), 16):
        block = int.from_bytes(message[start:start + 16] + b"\x01", "little")
        accumulator = (accumulator + block) * r % prime
    total = accumulator + int.from_bytes(key[16:], "little")
    return (total & ((1 << 128) - 1)).to_bytes(16, "little")


def test_poly1305_rfc8439_2_5_2() -> None:
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    tag = poly1305(key, b"Cryptographic Forum Research Group")
    assert tag.hex() == "a8061dc1305136c6c22b8baf0c0127a9"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_rfc8439_vectors(impl: ModuleType) -> None:
    # MTU 375: the 375-byte plaintext is sealed unpadded, as the vector has it.
    [datagram] = impl.Sealer(RFC_KEY).seal(7, RFC_COUNTER, [RFC_PLAINTEXT], 375)
    assert datagram[:16] == bytes([4, 0, 0, 0, 7, 0, 0, 0]) + RFC_COUNTER.to_bytes(8, "little")
    body, tag = datagram[16:-16], datagram[-16:]
    assert body == RFC_CIPHERTEXT
    lengths = (0).to_bytes(8, "little") + len(body).to_bytes(8, "little")  # no AAD
    assert tag == poly1305(RFC_POLY1305_KEY, body + bytes(-len(body) % 16) + lengths)
    assert impl.Opener(RFC_KEY).open([datagram]) == [RFC_PLAINTEXT]


def _tamper(datagrams: list[bytes], flips: list[tuple[int, int]]) -> list[bytes]:
    """Flip one bit at (datagram, byte position) for each pair, past the header."""
    out = list(datagrams)
    for which, position in flips:
        if out:
            i = which % len(out)
            data = bytearray(out[i])
            data[16 + position % (len(data) - 16)] ^= 1 << (position % 8)
            out[i] = bytes(data)
    return out


_MTU = 1420
_packets = st.lists(
    st.one_of(st.binary(max_size=64),
              st.integers(_MTU - 20, _MTU + 20).map(lambda n: b"\xab" * n)),
    max_size=12)


@compiled
@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), index=st.integers(0, 2**32 - 1),
       counter=st.integers(0, 2**64 - 13), packets=_packets,
       mtu=st.sampled_from([0, 15, 16, 17, 1280, _MTU, _MTU + 1]),
       flips=st.lists(st.tuples(st.integers(0, 99), st.integers(0, 10**6)), max_size=3))
def test_compiled_and_python_agree(key: bytes, index: int, counter: int, packets: list[bytes],
                                   mtu: int, flips: list[tuple[int, int]]) -> None:
    assert _aead is not None
    sealed = _aead.Sealer(key).seal(index, counter, packets, mtu)
    assert sealed == aead_py.Sealer(key).seal(index, counter, packets, mtu)
    for datagram, packet in zip(sealed, packets, strict=True):
        assert len(datagram) == 32 + padded_length(len(packet), mtu)
    opened = _aead.Opener(key).open(sealed)
    assert opened == [p.ljust(padded_length(len(p), mtu), b"\0") for p in packets]
    tampered = _tamper(sealed, flips)
    results = _aead.Opener(key).open(tampered)
    assert results == aead_py.Opener(key).open(tampered)
    for original, changed, result in zip(sealed, tampered, results, strict=True):
        assert (result is None) == (original[16:] != changed[16:])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bad_input_is_refused_alike(impl: ModuleType) -> None:
    refusals: list[tuple[type[Exception], Callable[[], object]]] = [
        (ValueError, lambda: impl.Sealer(bytes(31))),
        (ValueError, lambda: impl.Opener(bytes(33))),
        (ValueError, lambda: impl.Opener(bytes(32)).open([bytes(31)])),
        (OverflowError, lambda: impl.Sealer(bytes(32)).seal(0, 2**64 - 1, [b"", b""], 0)),
        (OverflowError, lambda: impl.Sealer(bytes(32)).seal(0, -1, [b""], 0)),
        (OverflowError, lambda: impl.Sealer(bytes(32)).seal(2**32, 0, [b""], 0)),
    ]
    for error, call in refusals:
        with pytest.raises(error):
            call()
    # The last counter there is; buffers other than bytes; an empty batch.
    sealer = impl.Sealer(bytes(32))
    assert len(sealer.seal(0, 2**64 - 1, [bytearray(3)], 0)[0]) == 35
    assert impl.Opener(bytes(32)).open([memoryview(sealer.seal(1, 2, [b"x"], 64)[0])]) == [
        b"x".ljust(16, b"\0")]
    assert sealer.seal(0, 0, [], _MTU) == [] and impl.Opener(bytes(32)).open([]) == []


@compiled
def test_key_is_not_in_the_repr() -> None:
    assert _aead is not None
    key = bytes(range(32))
    for obj in (_aead.Sealer(key), _aead.Opener(key)):
        assert key.hex() not in repr(obj) and not hasattr(obj, "key")


def _inner(plaintext: bytes) -> tuple[bytes, bytes] | None:
    """What Device.receive checks of one plaintext: (packet, inner source), or None."""
    version, size = plaintext[0] >> 4, len(plaintext)
    if version == 4 and size >= 20:
        total, source, minimum = int.from_bytes(plaintext[2:4], "big"), plaintext[12:16], 20
    elif version == 6 and size >= 40:
        total, source, minimum = 40 + int.from_bytes(plaintext[4:6], "big"), plaintext[8:24], 40
    else:
        return None
    return (plaintext[:total], source) if minimum <= total <= size else None


def _ip(version: int, source: int, payload: int, padding: int, claimed: int) -> bytes:
    if version == 4:
        total = 20 + payload + claimed
        header = bytes([0x45, 0, total >> 8 & 0xFF, total & 0xFF]) + bytes(8)
        packet = header + bytes([10, 0, 0, source]) + bytes([10, 0, 0, 9])
    else:
        length = payload + claimed
        packet = (bytes([0x60, 0, 0, 0, length >> 8 & 0xFF, length & 0xFF, 17, 64])
                  + bytes(15) + bytes([source]) + bytes(16))
    return packet + b"\x5a" * payload + bytes(padding)


_plaintexts = st.lists(st.one_of(
    st.builds(_ip, st.sampled_from([4, 6]), st.integers(1, 2), st.integers(0, 40),
              st.integers(0, 15), st.sampled_from([0, 0, 0, 1, -1, -30])),
    st.binary(min_size=1, max_size=50)), min_size=1, max_size=8)


@compiled
@settings(max_examples=300, deadline=None)
@given(plaintexts=_plaintexts)
def test_strip_is_the_per_packet_check_at_once(plaintexts: list[bytes]) -> None:
    assert _aead is not None
    expected = [_inner(plaintext) for plaintext in plaintexts]
    result = _aead.strip(plaintexts)
    at_once = None not in expected and len({source for _, source in expected}) == 1
    if at_once:
        assert result == ([packet for packet, _ in expected], expected[0][1])
    else:
        assert result is None
    assert aead_py.strip(plaintexts) is None  # the fallback checks one by one


@compiled
def test_a_batch_list_changed_by_its_own_items_is_read_as_it_was() -> None:
    """Reading a non-bytes item can run Python code that clears the caller's list: the
    compiled module works on its own copy (it read freed memory before)."""
    assert _aead is not None
    victims: list[object] = []

    class Clears:
        def __iter__(self) -> Iterator[int]:
            victims.clear()
            return iter([0] * 32)

    victims.extend([Clears()] + [bytes(32)] * 1000)
    assert _aead.Opener(bytes(32)).open(victims) == [None] * 1001  # type: ignore[arg-type]
    assert victims == []


def _destination(packet: bytes) -> bytes:
    """What Device.send routes a packet by, one packet at a time (b"": dropped)."""
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(packet) >= 20:
        return bytes(packet[16:20])
    if version == 6 and len(packet) >= 40:
        return bytes(packet[24:40])
    return b""


_routed = st.lists(st.tuples(st.sampled_from([
    bytes([0x45]) + bytes(15) + bytes([10, 0, 0, 2]),
    bytes([0x45]) + bytes(15) + bytes([10, 0, 0, 3]) + b"tcp",
    bytes([0x60]) + bytes(23) + bytes(15) + b"\x02" + bytes(8),
    bytes([0x60]) + bytes(23) + bytes(15) + b"\x03",  # short of the whole IPv6 header
    bytes([0x45]) + bytes(18),  # short of the whole IPv4 header
    b"", b"\x10" * 40,
]), st.sampled_from([bytes, bytearray, memoryview])), max_size=20)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=300, deadline=None)
@given(packets=_routed)
def test_inner_runs_are_the_per_packet_destinations(impl: ModuleType,
                                                    packets: list[tuple[bytes, type]]) -> None:
    """Runs of equal destinations, in order, that expand to each packet's own."""
    batch = [kind(packet) for packet, kind in packets]
    runs = impl.inner_runs(batch)
    expanded = [destination for destination, count in runs for _ in range(count)]
    assert expanded == [_destination(packet) for packet, _ in packets]
    assert all(count > 0 for _, count in runs)
    assert all(a[0] != b[0] for a, b in itertools.pairwise(runs))  # no two could be one


_HERE, _THERE = Endpoint("192.0.2.1", 51820), Endpoint("192.0.2.9", 51820)
_datagrams = st.lists(st.one_of(
    st.tuples(st.sampled_from([1, 2]), st.sampled_from([0, 1, 2, 5, 2**64 - 1]),
              st.sampled_from([0, 16, 1424]), st.sampled_from([0, 1, 2])).map(
        lambda m: (bytes([4, 0, 0, 0, m[0], 0, 0, 0]) + m[1].to_bytes(8, "little")
                   + bytes(16 + m[2]), m[3])),
    st.tuples(st.sampled_from([
        bytes([1, 0, 0, 0]) + bytes(144), bytes([2, 0, 0, 0]) + bytes(88),
        bytes([3, 0, 0, 0]) + bytes(60), bytes([4, 0, 0, 0]) + bytes(27), b"\x04\0\0",
        b"", bytes([5, 0, 0, 0]) + bytes(40), bytes([1, 0, 1, 0]) + bytes(40)]),
        st.just(0))), max_size=20)


def _reference_runs(pairs: list[tuple[bytes, Endpoint]]) -> list[tuple[object, ...]]:
    """Device.receive's grouping one datagram at a time: (index, counters, sources)."""
    runs: list[tuple[int, list[int], list[Endpoint]]] = []
    for data, source in pairs:
        if len(data) >= 32 and data[:4] == bytes([4, 0, 0, 0]):
            index = int.from_bytes(data[4:8], "little")
            if not runs or runs[-1][0] != index:
                runs.append((index, [], []))
            runs[-1][1].append(int.from_bytes(data[8:16], "little"))
            runs[-1][2].append(source)
    return [(index, counters, sources, counters[0],
             counters == list(range(counters[0], counters[0] + len(counters)))
             and all(source is sources[0] for source in sources))
            for index, counters, sources in runs]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@settings(max_examples=300, deadline=None)
@given(datagrams=_datagrams, counters=st.sampled_from(["as drawn", "consecutive"]))
def test_transport_runs_sort_a_batch_as_one_by_one(
        impl: ModuleType, datagrams: list[tuple[bytes, int]], counters: str) -> None:
    """Runs by receiver index with their first counter and whether they are in order from
    one source (an equal source that is another object is not); handshake messages kept
    whole, in order; short ones and unknown types counted."""
    sources = [_HERE, _THERE, Endpoint("192.0.2.1", 51820)]  # the last equals _HERE
    pairs, next_counter = [], 7
    for data, which in datagrams:
        if counters == "consecutive" and len(data) >= 32 and data[0] == 4:
            data = data[:8] + next_counter.to_bytes(8, "little") + data[16:]
            next_counter += 1
        pairs.append((data, sources[which]))
    runs, handshakes, bad_length, bad_type = impl.transport_runs(pairs)
    expected = _reference_runs(pairs)
    assert [(index, [int.from_bytes(m[8:16], "little") for m in messages], sources_, first,
             in_order) for index, messages, sources_, first, in_order in runs] == expected
    for _, messages, sources_, _, _ in runs:
        assert all(source in sources for source in sources_) and len(messages) == len(sources_)
    assert handshakes == [pair for pair in pairs if pair[0][:1] in (b"\1", b"\2", b"\3")
                          and pair[0][1:4] == bytes(3)]
    transport = sum(len(run[1]) for run in runs)
    assert bad_length == sum(len(d) < 4 or (d[:4] == bytes([4, 0, 0, 0]) and len(d) < 32)
                             for d, _ in pairs)
    assert transport + len(handshakes) + bad_length + bad_type == len(pairs)


class _Pair(NamedTuple):
    data: bytes
    source: Endpoint


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("kind", [_Pair._make, list], ids=["namedtuple", "list"])
def test_transport_runs_unpack_any_pair(impl: ModuleType,
                                        kind: Callable[[tuple[bytes, Endpoint]], object]
                                        ) -> None:
    """A datagram is unpacked as ``data, source = datagram`` unpacks it: a tuple subclass
    (a NamedTuple is a tuple[bytes, Endpoint]) or a list is a pair too, and a handshake's
    pair comes back as the object it was; one of another size is a ValueError."""
    transport = bytes([4, 0, 0, 0, 1, 0, 0, 0]) + (7).to_bytes(8, "little") + bytes(16)
    initiation = bytes([1, 0, 0, 0]) + bytes(144)
    pairs = [kind((transport, _HERE)), kind((initiation, _THERE)),
             kind((b"\x05\0\0\0", _HERE))]
    runs, handshakes, bad_length, bad_type = impl.transport_runs(pairs)
    assert runs == [(1, [transport], [_HERE], 7, True)]
    assert len(handshakes) == 1 and handshakes[0] is pairs[1]
    assert (bad_length, bad_type) == (0, 1)
    with pytest.raises(ValueError):
        impl.transport_runs([(transport, _HERE, None)])
    with pytest.raises(ValueError):
        impl.transport_runs([[transport]])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_pair_that_clears_the_batch_is_read_as_it_was(impl: ModuleType) -> None:
    """Unpacking a pair that is not a tuple runs its ``__iter__``, which may drop it from
    the caller's list: the pair stays alive (and comes back as a handshake's)."""
    initiation = bytes([1, 0, 0, 0]) + bytes(144)
    victims: list[object] = []

    class Clears:
        def __iter__(self) -> Iterator[object]:
            victims.clear()
            return iter([initiation, _HERE])

    victims.extend([Clears()] + [(initiation, _HERE)] * 100)
    for _ in range(3):  # a freed pair would be reused (or caught by a sanitizer) by now
        runs, handshakes, bad_length, bad_type = impl.transport_runs(victims)
        assert (runs, bad_length, bad_type) == ([], 0, 0)
        assert len(handshakes) == 1 and type(handshakes[0]).__name__ == "Clears"
        assert list(handshakes[0]) == [initiation, _HERE] and victims == []
        victims.extend([handshakes.pop()] + [(initiation, _HERE)] * 100)
