"""The compiled GRO merge (uspan.daemon._segment.coalesce) against gso's Python path:
the same (virtio_net_hdr, packet) pairs for random batches of many flows, mangled."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_gso import (
    ACK,
    CWR,
    FIN,
    PSH,
    SYN,
    TS_OPTIONS,
    URG,
    one_by_one,
    stream,
    tcp_packet,
    udp_packet,
)
from tests.unit.test_segment import _segment, compiled
from uspan.daemon import gso

SOURCES4 = [bytes([10, 1, 0, n]) for n in (1, 2)]
SOURCES6 = [bytes(15) + bytes([n]) for n in (1, 2)]


_IP4: list[dict[str, object]] = [{"ttl": 63}, {"tos": 4}, {"df": True}, {"ident": 0x4105}]
_IP6: list[dict[str, object]] = [{"hops": 1}, {"tc": 1}, {"flow": 0x12345}]
_TCP: list[dict[str, object]] = [{"ack": 78}, {"window": 1}, {"flags": ACK | PSH},
                                 {"flags": ACK | URG}, {"seq": 1}]
CHANGES = {(v6, tcp): (_IP6 if v6 else _IP4) + (_TCP if tcp else [])
           for v6 in (False, True) for tcp in (False, True)}


@st.composite
def flow_packets(draw: st.DrawFn) -> list[bytes]:
    """One flow's segments in order: TCP or UDP, IPv4 or IPv6, the IPv4 ID incrementing,
    fixed under DF or random, with or without options, equal sizes but the last."""
    v6, tcp = draw(st.booleans()), draw(st.booleans())
    count = draw(st.integers(1, 150 if not tcp else 60))  # UDP: past its 64 cap
    size = draw(st.sampled_from([1, 2, 7, 64, 1000, 1368, 1400]))
    last = draw(st.integers(1, size))
    sport = draw(st.sampled_from([40000, 40001]))
    ip: dict[str, object] = {"src": draw(st.sampled_from(SOURCES6 if v6 else SOURCES4))}
    id_mode = "v6" if v6 else draw(st.sampled_from(["increment", "fixed", "mixed", "random"]))
    df = draw(st.booleans())
    changes = draw(st.sampled_from([0.0, 0.1]))  # a field changed, checksums right
    options = draw(st.sampled_from([b"", TS_OPTIONS])) if tcp else b""
    seq = draw(st.sampled_from([1000, 0xFFFFFFFF - 3000]))
    rng = random.Random(draw(st.integers(0, 2**32)))
    out = []
    for i in range(count):
        length = last if i == count - 1 else size
        payload = random.Random(i).randbytes(length)
        fields = dict(ip)
        if not v6:
            mode = rng.choice(["increment", "fixed"]) if id_mode == "mixed" else id_mode
            fields["ident"] = {"increment": 0xFFF0 + i, "fixed": 0xFFF0}.get(
                mode, rng.randrange(0x10000)) & 0xFFFF
            fields["df"] = df
        if rng.random() < changes:
            fields.update(rng.choice(CHANGES[(v6, tcp)]))
        if tcp:
            fields.setdefault("seq", (seq + i * size) & 0xFFFFFFFF)
            out.append(tcp_packet(payload, v6=v6, options=options, sport=sport, **fields))
        else:
            out.append(udp_packet(payload, v6=v6, sport=sport, **fields))
    return out


def mangle(packet: bytes, how: str, rng: random.Random) -> bytes:
    out = bytearray(packet)
    if how == "byte":  # a header field or the payload: checksum, TTL, ports, lengths...
        at = rng.randrange(min(len(out), 80)) if rng.random() < 0.8 else rng.randrange(len(out))
        out[at] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del out[rng.randrange(len(out)) :]
    elif how == "flags" and out[0] >> 4 in (4, 6):
        at = (40 if out[0] >> 4 == 6 else 20) + 13
        if at < len(out):
            out[at] = rng.choice([ACK | PSH, ACK | FIN, ACK | URG, SYN, ACK | CWR, 0])
    elif how == "garbage":
        return rng.randbytes(rng.randrange(60))
    return bytes(out)


@st.composite
def batches(draw: st.DrawFn) -> list[bytes]:
    """Flows interleaved in runs, some packets mangled, reordered or repeated."""
    flows = draw(st.lists(flow_packets(), min_size=1, max_size=4))
    rng = random.Random(draw(st.integers(0, 2**32)))
    out: list[bytes] = []
    while any(flows):
        flow = rng.choice([f for f in flows if f])
        take = rng.randrange(1, len(flow) + 1)
        out.extend(flow[:take])
        del flow[:take]
    rate = draw(st.sampled_from([0.0, 0.02, 0.2]))
    for i in range(len(out)):
        if rng.random() < rate:
            how = rng.choice(["byte", "truncate", "flags", "garbage", "swap", "repeat"])
            if how == "swap" and i + 1 < len(out):
                out[i], out[i + 1] = out[i + 1], out[i]
            elif how == "repeat":
                out.insert(rng.randrange(len(out)), out[i])
            else:
                out[i] = mangle(out[i], how, rng)
    return out


@compiled
@settings(max_examples=500, deadline=None)
@given(batches(), st.booleans())
def test_compiled_coalesce_is_the_python_coalesce(packets: list[bytes], udp: bool) -> None:
    assert _segment is not None
    ours = _segment.coalesce(packets, udp)
    assert ours == gso._coalesce_python(packets, udp)
    assert all(type(vnet) is bytes and type(packet) is bytes for vnet, packet in ours)


@compiled
def test_compiled_coalesce_takes_any_bytes_like_sequence() -> None:
    assert _segment is not None
    parts = stream(6, 1000, options=TS_OPTIONS)
    expected = _segment.coalesce(parts, False)
    assert len(expected) == 1
    assert _segment.coalesce(tuple(bytearray(p) for p in parts), False) == expected
    assert _segment.coalesce([memoryview(p) for p in parts], False) == expected
    assert _segment.coalesce([], False) == []
    with pytest.raises(TypeError):
        _segment.coalesce([parts[0], 5], False)


def test_a_stretch_of_equal_segments_joins_its_flows_open_run() -> None:
    """A flow's equal-length segments after another flow's packet continue the flow's
    run, as merging one by one (and the kernel's GRO) does, on both paths."""
    a = stream(10, 1000, options=TS_OPTIONS)
    parts = [*a[:4], tcp_packet(bytes(1000), sport=40001), *a[4:]]
    assert gso._coalesce_python(parts, False) == one_by_one(parts)
    assert len(one_by_one(parts)) == 2
    if _segment is not None:
        assert _segment.coalesce(parts, False) == one_by_one(parts)


@compiled
def test_compiled_coalesce_of_thousands_of_flows_is_the_python_coalesce() -> None:
    """Many interleaved flows (the C flow table: collisions, probing, a flow's slot
    reused after a pure ACK ends its run): the same pairs, in the same order."""
    assert _segment is not None
    rng = random.Random(7)
    flows = [stream(4, 200, sport=1024 + n, v6=n % 2 == 0) for n in range(3000)]
    for n in range(0, 3000, 5):
        flows[n].insert(2, tcp_packet(b"", seq=1400, sport=1024 + n, v6=n % 2 == 0))
    packets: list[bytes] = []
    while flows:
        flow = flows[rng.randrange(len(flows))]
        packets.append(flow.pop(0))
        if not flow:
            flows.remove(flow)
    ours = _segment.coalesce(packets, False)
    assert ours == gso._coalesce_python(packets, False)
    assert len(ours) == 2400 + 600 * 3  # one run per flow; or a run, the ACK, a run
