import contextlib
import ipaddress

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from uspan.mesh.affiliate import (
    Affiliate,
    AffiliateDecodeError,
    KubeSpanInfo,
    decode_affiliate,
    decode_endpoint,
    encode_affiliate,
    encode_endpoint,
    local_affiliate,
    publishable_addresses,
    publishable_endpoints,
)
from uspan.mesh.config import KubeSpanConfig
from uspan.mesh.filters import EndpointFilters
from uspan.wg.endpoint import Endpoint

ip = ipaddress.ip_address

AFFILIATE = Affiliate(
    node_id="7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC",
    hostname="node-1.example",
    nodename="node-1",
    addresses=(ip("192.0.2.10"), ip("2001:db8::10")),
    kubespan=KubeSpanInfo(
        public_key=bytes(range(32)),
        address=ipaddress.IPv6Address("fd7f:175a:b97c:5602::1"),
        additional_prefixes=(ipaddress.ip_network("10.244.1.0/24"),),
        endpoints=(Endpoint("192.0.2.10", 51820), Endpoint("2001:db8::10", 51820)),
    ),
)


def test_round_trip() -> None:
    assert decode_affiliate(encode_affiliate(AFFILIATE)) == AFFILIATE


def test_data_must_name_the_affiliate_it_is_stored_under() -> None:
    data = encode_affiliate(AFFILIATE)
    assert decode_affiliate(data, AFFILIATE.node_id) == AFFILIATE
    with pytest.raises(AffiliateDecodeError, match="stored under affiliate 'other'"):
        decode_affiliate(data, "other")


def test_round_trip_without_kubespan() -> None:
    plain = Affiliate(node_id="n", hostname="h", nodename="n")
    assert decode_affiliate(encode_affiliate(plain)) == plain


def test_endpoint_blobs_are_small() -> None:
    assert len(encode_endpoint(Endpoint("192.0.2.1", 51820))) == 6
    assert len(encode_endpoint(Endpoint("2001:db8::1", 1))) == 18
    for endpoint in (Endpoint("192.0.2.1", 51820), Endpoint("2001:db8::1", 1)):
        assert decode_endpoint(encode_endpoint(endpoint)) == endpoint
    with pytest.raises(AffiliateDecodeError):
        decode_endpoint(b"\x01\x02\x03\x04\x00\x00")
    with pytest.raises(AffiliateDecodeError):
        decode_endpoint(b"\x01")
    for host in ("0.0.0.0", "224.0.0.1", "::"):
        with pytest.raises(AffiliateDecodeError, match="unicast"):
            decode_endpoint(ipaddress.ip_address(host).packed + b"\x00\x01")


def mutate(**changes: object) -> bytes:
    document = msgpack.unpackb(encode_affiliate(AFFILIATE))
    for key, value in changes.items():
        if key.startswith("ks_"):
            document["kubespan"][key[3:]] = value
        else:
            document[key] = value
    return msgpack.packb(document)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "not msgpack"),
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "expected a map"),
        (encode_affiliate(AFFILIATE) + b"\x00", "not msgpack"),
        (mutate(v=2), "version"),
        (mutate(v=True), "version"),
        (mutate(id=""), "empty"),
        (mutate(id="x" * 257), "id"),
        (mutate(hostname=5), "hostname"),
        (mutate(nodename="a\nb"), "printable"),
        (msgpack.packb({"v": 1, "id": "n"}), "missing"),
        (mutate(**{f"x{i}": 0 for i in range(60)}), "keys, more than 64"),
        (mutate(addresses=[b"\x01\x02\x03"]), "addresses"),
        (mutate(addresses=[b"\x01\x02\x03\x04"] * 65), "more than 64"),
        (mutate(ks_key=b"short"), "kubespan.key"),
        (mutate(ks_address=b"\x01\x02\x03\x04"), "IPv6"),
        (mutate(ks_prefixes=[[b"\x0a\x00\x00\x01", 24]]), "host bits"),
        (mutate(ks_prefixes=[[b"\x0a\x00\x00\x00", 33]]), "prefixes"),
        (mutate(ks_prefixes=[[b"\x0a\x00\x00\x00", "24"]]), "integer"),
        (mutate(ks_prefixes=[b"x"]), "pairs"),
        (mutate(ks_endpoints=["1.2.3.4:5"]), "bytes"),
        (mutate(kubespan=[]), "expected a map"),
        (b"\x00" * 5000, "more than"),
        (msgpack.packb({1: 2}), "not msgpack"),
    ],
)
def test_bad_data_is_a_specific_error(data: bytes, problem: str) -> None:
    with pytest.raises(AffiliateDecodeError, match=problem):
        decode_affiliate(data)


def test_keys_from_a_newer_member_are_skipped() -> None:
    """Like protobuf's unknown fields in KubeSpan: additions never cut members apart."""
    newer = mutate(future="x", ks_future=[1, 2])
    assert decode_affiliate(newer) == decode_affiliate(encode_affiliate(AFFILIATE))
    bare = msgpack.unpackb(encode_affiliate(AFFILIATE))
    del bare["kubespan"]["endpoints"]
    with pytest.raises(AffiliateDecodeError, match=r"kubespan: missing \['endpoints'\]"):
        decode_affiliate(msgpack.packb(bare))


@given(st.binary(max_size=300))
def test_hostile_bytes_never_escape_as_other_errors(data: bytes) -> None:
    with contextlib.suppress(AffiliateDecodeError):
        decode_affiliate(data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["v", "id", "kubespan", "key", "x"]), children, max_size=6
        )
    ),
    max_leaves=20,
)


@given(msgpack_values)
def test_hostile_documents_never_escape_as_other_errors(value: object) -> None:
    with contextlib.suppress(AffiliateDecodeError):
        decode_affiliate(msgpack.packb(value))


def unicast(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (address.is_unspecified or address.is_multicast)


@given(
    st.builds(
        Affiliate,
        node_id=st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1),
        hostname=st.text(st.characters(codec="ascii", categories=["L"]), max_size=20),
        nodename=st.text(st.characters(codec="ascii", categories=["L"]), max_size=20),
        addresses=st.lists(st.ip_addresses(), max_size=5).map(tuple),
        kubespan=st.none()
        | st.builds(
            KubeSpanInfo,
            public_key=st.binary(min_size=32, max_size=32),
            address=st.ip_addresses(v=6),
            additional_prefixes=st.lists(
                st.ip_addresses(v=4).map(lambda a: ipaddress.ip_network((a, 24), strict=False)),
                max_size=3,
            ).map(tuple),
            endpoints=st.lists(
                st.builds(
                    lambda a, p: Endpoint(str(a), p),
                    st.ip_addresses().filter(unicast),
                    st.integers(1, 65535),
                ),
                max_size=4,
            ).map(tuple),
        ),
    )
)
def test_any_affiliate_round_trips(affiliate: Affiliate) -> None:
    decoded = decode_affiliate(encode_affiliate(affiliate))
    assert decoded.node_id == affiliate.node_id
    assert decoded.addresses == affiliate.addresses
    if affiliate.kubespan is not None:
        assert decoded.kubespan is not None
        assert decoded.kubespan.public_key == affiliate.kubespan.public_key
        assert [str(e) for e in decoded.kubespan.endpoints] == [
            str(Endpoint.parse(str(e))) for e in affiliate.kubespan.endpoints
        ]


def test_publishable_addresses_skip_local_and_kubespan() -> None:
    subnet = ipaddress.IPv6Network("fd7f:175a:b97c:5602::/64")
    addresses = [
        ip("127.0.0.1"),
        ip("192.0.2.1"),
        ip("169.254.1.1"),
        ip("fe80::1"),
        ip("fd7f:175a:b97c:5602::5"),
        ip("2001:db8::1"),
        ip("192.0.2.1"),
        ip("::"),
    ]
    assert publishable_addresses(addresses, subnet) == (ip("192.0.2.1"), ip("2001:db8::1"))


def test_publishable_endpoints_apply_filters_to_everything() -> None:
    filters = EndpointFilters.parse(["0.0.0.0/0", "!10.0.0.0/8"])
    endpoints = publishable_endpoints(
        [ip("192.0.2.1"), ip("10.1.1.1"), ip("2001:db8::1")],
        51820,
        [Endpoint("203.0.113.9", 4000), Endpoint("10.9.9.9", 4000), Endpoint("192.0.2.1", 51820)],
        filters,
    )
    assert [str(e) for e in endpoints] == ["192.0.2.1:51820", "203.0.113.9:4000"]


def test_reflexive_endpoints_come_after_the_addresses_and_before_announced_ones() -> None:
    endpoints = publishable_endpoints(
        [ip("10.1.1.1")], 51820, [Endpoint("192.0.2.9", 4000)], EndpointFilters(),
        reflexive=[Endpoint("203.0.113.7", 40001), Endpoint("10.1.1.1", 51820)])
    assert [str(e) for e in endpoints] == [
        "10.1.1.1:51820", "203.0.113.7:40001", "192.0.2.9:4000"]


def test_no_filters_publish_everything() -> None:
    endpoints = publishable_endpoints([ip("10.1.1.1"), ip("2001:db8::1")], 5, [], EndpointFilters())
    assert [str(e) for e in endpoints] == ["10.1.1.1:5", "[2001:db8::1]:5"]


def test_exclude_only_filters() -> None:
    filters = EndpointFilters.parse(["!192.168.0.0/16"])
    assert filters.allows(ip("10.0.0.1"))
    assert not filters.allows(ip("192.168.1.1"))
    assert filters.allows(ip("2001:db8::1"))


KS_ADDRESS = ipaddress.IPv6Address("fd7f:175a:b97c:5602::1")


def local(config: KubeSpanConfig, prefixes: tuple[str, ...] = ()) -> Affiliate:
    return local_affiliate(
        node_id="n0",
        hostname="h0.example",
        nodename="h0",
        addresses=[ip("192.0.2.1"), ip("127.0.0.1"), KS_ADDRESS, ip("10.0.0.1")],
        kubespan=config,
        public_key=b"k" * 32,
        kubespan_address=KS_ADDRESS,
        additional_prefixes=[ipaddress.ip_network(p) for p in prefixes],
    )


def test_local_affiliate_with_kubespan() -> None:
    config = KubeSpanConfig(
        enabled=True,
        port=5000,
        endpoint_filters=("!10.0.0.0/8",),
        advertise_endpoints=(Endpoint("203.0.113.1", 6000),),
    )
    mine = local(config, ("10.244.0.0/24",))
    assert mine.addresses == (ip("192.0.2.1"), ip("10.0.0.1"))  # filters: endpoints only
    assert mine.kubespan is not None
    assert mine.kubespan.address == KS_ADDRESS
    assert [str(e) for e in mine.kubespan.endpoints] == ["192.0.2.1:5000", "203.0.113.1:6000"]
    assert mine.kubespan.additional_prefixes == (ipaddress.ip_network("10.244.0.0/24"),)
    assert decode_affiliate(encode_affiliate(mine)) == mine


def test_local_affiliate_without_kubespan_is_a_plain_member() -> None:
    plain = local(KubeSpanConfig())
    assert plain.kubespan is None
    assert plain.addresses == (ip("192.0.2.1"), ip("10.0.0.1"))


def test_punch_requests_round_trip_and_are_left_out_when_there_are_none() -> None:
    from dataclasses import replace

    import msgpack

    from uspan.mesh.punch import PunchRequest

    assert "punch" not in msgpack.unpackb(encode_affiliate(AFFILIATE))["kubespan"]
    assert AFFILIATE.kubespan is not None
    request = PunchRequest(b"k" * 32, Endpoint("203.0.113.7", 40001), 7)
    punching = replace(AFFILIATE, kubespan=replace(AFFILIATE.kubespan, punch=(request,)))
    assert decode_affiliate(encode_affiliate(punching)) == punching
    document = msgpack.unpackb(encode_affiliate(punching))
    for bad in ([b"short", document["kubespan"]["punch"][0][1], 1],
                [b"k" * 32, b"\0" * 6, 1], [b"k" * 32, document["kubespan"]["punch"][0][1], -1]):
        document["kubespan"]["punch"] = [bad]
        with pytest.raises(AffiliateDecodeError):
            decode_affiliate(msgpack.packb(document, use_bin_type=True))
