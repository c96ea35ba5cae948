import base64
import ipaddress
import itertools
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from uspan.mesh.config import (
    Action,
    ConfigError,
    HostPort,
    NodeConfig,
    config_from_dict,
    decode_base64,
    diff_configs,
    parse_config,
    render_config,
)
from uspan.wg.endpoint import Endpoint

ID = "8XuV9TZHW08DOk3bVxQjH9ih_TBKjnh-j44tsCLSBzo="
SECRET = "ZZvwADFstTFf8HWmupf1byeb7Qj7DhX3Mkg/HmJxYDE="


def document(**sections: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "kubespan": {"enabled": True},
        "discovery": {"enabled": True, "registries": {"service": {"endpoints": ["d:3000"]}}},
        "cluster": {"id": ID, "secret": SECRET},
    }
    for name, value in sections.items():
        if value is None:
            del doc[name]
        else:
            doc[name] = value
    return doc


def error_of(doc: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(doc)
    return info.value


def test_minimal_config_takes_the_defaults() -> None:
    config = config_from_dict(document())
    assert config.kubespan.interface == "kubespan"
    assert config.kubespan.port == 51820
    assert config.kubespan.mtu == 1420
    assert config.kubespan.harvest_extra_endpoints is None
    assert config.kubespan.allow_down_peer_bypass is True
    assert config.discovery.service_endpoints == (HostPort("d", 3000),)
    assert config.cluster.id == ID
    assert len(config.cluster.secret_bytes) == 32


def test_the_secret_never_shows_in_repr() -> None:
    assert SECRET not in repr(config_from_dict(document()))


def test_full_config() -> None:
    config = parse_config(
        """
kubespan:
  enabled: true
  interface: ks0
  port: 51999
  mtu: 1280
  filters: {endpoints: ["0.0.0.0/0", "!10.0.0.0/8"]}
  advertiseEndpoints: ["203.0.113.5:4000", "[2001:db8::1]:4000"]
  harvestExtraEndpoints: false
  allowDownPeerBypass: false
discovery:
  enabled: true
  registries: {service: {endpoints: ["[::1]:3000", "10.0.0.1:3000"]}}
cluster: {id: ID, secret: SECRET}
""".replace("ID", ID).replace("SECRET", SECRET)
    )
    ks = config.kubespan
    assert (ks.interface, ks.port, ks.mtu) == ("ks0", 51999, 1280)
    assert ks.filters.allows(ipaddress.ip_address("192.0.2.1"))
    assert not ks.filters.allows(ipaddress.ip_address("10.1.1.1"))
    assert ks.advertise_endpoints == (Endpoint("203.0.113.5", 4000), Endpoint("2001:db8::1", 4000))
    assert ks.harvest_extra_endpoints is False
    assert str(config.discovery.service_endpoints[0]) == "[::1]:3000"


@pytest.mark.parametrize(
    ("doc", "field", "problem"),
    [
        (document(cluster={"id": ID}), "cluster.secret", "missing"),
        (document(cluster=None), "cluster.id", "missing"),
        (document(cluster={"id": ID, "secret": "not base64!"}), "cluster.secret", "base64"),
        (document(cluster={"id": "@@@", "secret": SECRET}), "cluster.id", "base64"),
        (document(cluster={"id": ID, "secret": "AAAA"}), "cluster.secret", "32 bytes"),
        (document(kubespan={"enabled": True, "mtu": 1279}), "kubespan.mtu", "1279"),
        (document(kubespan={"port": 0}), "kubespan.port", "UDP port"),
        (document(kubespan={"interface": "x" * 16}), "kubespan.interface", "link name"),
        (document(discovery=None), "discovery.registries.service.endpoints", "no discovery"),
        (
            document(
                discovery={"enabled": False, "registries": {"service": {"endpoints": ["a:1"]}}}
            ),
            "discovery.registries.service.endpoints",
            "KubeSpan is enabled",
        ),
        (
            document(discovery={"enabled": True}),
            "discovery.registries.service.endpoints",
            "no serv",
        ),
        (document(kubespan={"enabled": True, "mtuu": 1}), "kubespan.mtuu", "unknown key"),
        (document(extra=1), "extra", "unknown key"),
        (
            document(kubespan={"filters": {"endpoint": []}}),
            "kubespan.filters.endpoint",
            "unknown key",
        ),
        (
            document(discovery={"enabled": True, "registries": {"service": {"endpoints": ["a"]}}}),
            "discovery.registries.service.endpoints[0]",
            "host:port",
        ),
        (
            document(
                discovery={"enabled": True, "registries": {"service": {"endpoints": ["[x]:1"]}}}
            ),
            "discovery.registries.service.endpoints[0]",
            "IPv6",
        ),
        (document(kubespan={"enabled": "yes"}), "kubespan.enabled", "true or false"),
        (document(kubespan={"enabled": True, "port": "1"}), "kubespan.port", "integer"),
        (document(kubespan={"enabled": True, "mtu": True}), "kubespan.mtu", "integer"),
        (document(kubespan=[1]), "kubespan", "mapping"),
        (
            document(kubespan={"enabled": True, "filters": {"endpoints": ["10.0.0.0/8", "!x"]}}),
            "kubespan.filters.endpoints[1]",
            "CIDR",
        ),
        (
            document(kubespan={"enabled": True, "filters": {"endpoints": "10.0.0.0/8"}}),
            "kubespan.filters.endpoints",
            "list",
        ),
        (
            document(kubespan={"enabled": True, "advertiseEndpoints": ["h:1", 5]}),
            "kubespan.advertiseEndpoints[1]",
            "string",
        ),
        (
            document(kubespan={"enabled": True, "advertiseEndpoints": ["host.example:1"]}),
            "kubespan.advertiseEndpoints[0]",
            "not an IP",
        ),
        (
            document(cluster={"id": ID, "secret": SECRET, "name": "x"}),
            "cluster.name",
            "unknown key",
        ),
        ([], "<document>", "mapping"),
        ({1: 2}, "<document>", "not a string"),
    ],
)
def test_each_error_names_its_field(doc: object, field: str, problem: str) -> None:
    error = error_of(doc)
    assert error.field_path == field
    assert str(error).startswith(f"{field}: ")
    assert problem in error.problem


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError, match=r"^line 3: not valid YAML"):
        parse_config("kubespan:\n  - a\n b: c\n")


def test_standard_and_url_safe_base64() -> None:
    raw = bytes(range(250, 256)) * 5 + b"\xfb\xff"
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    assert "+" in standard or "/" in standard
    assert decode_base64(standard) == decode_base64(urlsafe) == raw
    assert decode_base64(urlsafe.rstrip("=")) == raw
    config = config_from_dict(document(cluster={"id": ID, "secret": urlsafe}))
    assert config.cluster.secret_bytes == raw


def test_kubespan_off_discovery_only() -> None:
    config = config_from_dict(document(kubespan=None))
    assert not config.kubespan.enabled
    assert config.discovery.enabled
    config = config_from_dict(document(kubespan=None, discovery=None))
    assert not config.discovery.enabled


def counting_rng() -> Any:
    counter = itertools.count()
    return lambda n: bytes([next(counter) % 256]) * n


def test_gen_config_round_trip() -> None:
    text = render_config(
        with_kubespan=True,
        discovery_endpoints=["disc.example:3000", "[::1]:3000"],
        rng=counting_rng(),
    )
    assert text.count("#") > 10
    config = parse_config(text)
    assert config.kubespan.enabled
    assert [str(hp) for hp in config.discovery.service_endpoints] == [
        "disc.example:3000",
        "[::1]:3000",
    ]
    assert config.cluster.secret_bytes == bytes([1]) * 32
    assert decode_base64(config.cluster.id) == bytes(32)
    assert yaml.safe_load(text)["kubespan"]["mtu"] == 1420


def test_gen_config_keeps_given_values_and_validates_them() -> None:
    text = render_config(cluster_id=ID, cluster_secret=SECRET)
    config = parse_config(text)
    assert (config.cluster.id, config.cluster.secret) == (ID, SECRET)
    assert not config.kubespan.enabled and not config.discovery.enabled
    with pytest.raises(ConfigError, match=r"^cluster\.secret: "):
        render_config(cluster_secret="short")
    with pytest.raises(ConfigError, match="--discovery-endpoint"):
        render_config(with_kubespan=True)
    with pytest.raises(ConfigError, match=r"endpoints\[0\]"):
        render_config(discovery_endpoints=["nope"])


def test_generated_values_differ_by_default() -> None:
    first, second = parse_config(render_config()), parse_config(render_config())
    assert first.cluster.id != second.cluster.id
    assert first.cluster.secret != second.cluster.secret


def base() -> NodeConfig:
    return config_from_dict(document())


def changed(**kubespan: Any) -> NodeConfig:
    return config_from_dict(document(kubespan={"enabled": True, **kubespan}))


def test_diff_nothing() -> None:
    diff = diff_configs(base(), base())
    assert diff.changed == ()
    assert diff.actions == frozenset()


def test_a_cluster_change_recreates_a_relayed_link() -> None:
    """The relay link proves membership of the old cluster: it is built anew."""
    relayed = changed(relay="192.0.2.254:3001")
    document_with = document(kubespan={"enabled": True, "relay": "192.0.2.254:3001"},
                             cluster={"id": ID, "secret": ID})
    diff = diff_configs(relayed, config_from_dict(document_with))
    assert diff.changed == ("cluster.secret",)
    assert Action.RECREATE_INTERFACE in diff.actions
    assert Action.RECREATE_INTERFACE not in diff_configs(
        base(), config_from_dict(document(cluster={"id": ID, "secret": ID}))).actions


@pytest.mark.parametrize(
    ("new", "paths", "actions"),
    [
        (changed(mtu=1300), ["kubespan.mtu"], {Action.SET_MTU}),
        (changed(port=5000), ["kubespan.port"], {Action.REBIND_PORT, Action.REPUBLISH}),
        (changed(interface="ks1"), ["kubespan.interface"], {Action.RECREATE_INTERFACE}),
        (
            changed(filters={"endpoints": ["!10.0.0.0/8"]}),
            ["kubespan.filters.endpoints"],
            {Action.REPUBLISH},
        ),
        (
            changed(advertiseEndpoints=["192.0.2.1:1"]),
            ["kubespan.advertiseEndpoints"],
            {Action.REPUBLISH},
        ),
        (changed(allowDownPeerBypass=False), ["kubespan.allowDownPeerBypass"], set()),
        (changed(harvestExtraEndpoints=True), ["kubespan.harvestExtraEndpoints"], set()),
        (
            config_from_dict(document(kubespan={"enabled": False})),
            ["kubespan.enabled"],
            {Action.REMOVE_INTERFACE, Action.REPUBLISH},
        ),
        (
            config_from_dict(
                document(
                    discovery={"enabled": True, "registries": {"service": {"endpoints": ["e:1"]}}}
                )
            ),
            ["discovery.registries.service.endpoints"],
            {Action.RESTART_DISCOVERY, Action.REPUBLISH},
        ),
        (
            config_from_dict(document(cluster={"id": ID, "secret": ID})),
            ["cluster.secret"],
            {Action.RESTART_DISCOVERY, Action.REPUBLISH},
        ),
        (
            config_from_dict(document(cluster={"id": SECRET, "secret": SECRET})),
            ["cluster.id"],
            {Action.RESTART_DISCOVERY, Action.REPUBLISH, Action.SET_ADDRESS},
        ),
    ],
)
def test_diff_actions(new: NodeConfig, paths: list[str], actions: set[Action]) -> None:
    diff = diff_configs(base(), new)
    assert list(diff.changed) == paths
    assert diff.actions == actions


def test_diff_turning_kubespan_on() -> None:
    old = config_from_dict(document(kubespan={"enabled": False, "mtu": 1300}))
    diff = diff_configs(old, base())
    assert diff.changed == ("kubespan.enabled", "kubespan.mtu")
    assert diff.actions == {Action.CREATE_INTERFACE, Action.REPUBLISH}


KEYS = [
    "kubespan",
    "discovery",
    "cluster",
    "enabled",
    "interface",
    "port",
    "mtu",
    "filters",
    "endpoints",
    "advertiseEndpoints",
    "harvestExtraEndpoints",
    "allowDownPeerBypass",
    "registries",
    "service",
    "id",
    "secret",
]
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 70000)
    | st.floats(allow_nan=False)
    | st.sampled_from([ID, SECRET, "d:1", "[::1]:2", "10.0.0.0/8", "!::/0", "1.2.3.4:5", "x"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS), children, max_size=5)
    ),
    max_leaves=25,
)


@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
def test_any_document_is_a_config_or_a_config_error(doc: dict[str, object]) -> None:
    try:
        config_from_dict(doc)
    except ConfigError as error:
        assert str(error).startswith(error.field_path + ": ")
