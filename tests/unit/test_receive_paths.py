"""Device.receive takes in-order runs at once (compiled AEAD and ``strip``) and any other
run one by one (what the pyca fallback always does): for any mix of messages both give
the same packets, replies, drop counters and peer state."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.wgnet import Net, Node, ipv4_packet, ipv6_packet
from uspan.wg import aead_py, transport_crypto
from uspan.wg.endpoint import Endpoint

pytestmark = pytest.mark.skipif(not transport_crypto.COMPILED, reason="_aead not built")
MOVED = Endpoint("198.51.100.7", 40000)
PLAINTEXTS = [
    ipv4_packet("10.0.0.1", "10.0.0.2", b"v4" * 20),
    ipv4_packet("10.0.0.1", "10.0.0.2", b"other"),
    ipv6_packet("fd00::1", "fd00::2", b"v6" * 9),
    ipv4_packet("10.9.9.9", "10.0.0.2"),  # a source b does not allow
    b"",  # keepalive
    bytes(24),  # no IP version
    ipv4_packet("10.0.0.1", "10.0.0.2")[:-4],  # shorter than its header says
]


def _python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_crypto, "Sealer", aead_py.Sealer)
    monkeypatch.setattr(transport_crypto, "Opener", aead_py.Opener)
    monkeypatch.setattr(transport_crypto, "strip", aead_py.strip)
    monkeypatch.setattr(transport_crypto, "inner_runs", aead_py.inner_runs)
    monkeypatch.setattr(transport_crypto, "transport_runs", aead_py.transport_runs)


def _established() -> tuple[Node, Node]:
    net = Net()
    a = net.add("a", "192.0.2.1", 51820, seed=1)
    b = net.add("b", "192.0.2.2", 51821, seed=2)
    net.connect(a, b, ["10.0.0.1/32", "fd00::1/128"], ["10.0.0.2/32", "fd00::2/128"])
    net.send(a, [ipv4_packet("10.0.0.1", "10.0.0.2")])
    net.run()
    return a, b


COMPILED_PAIR = _established()
with pytest.MonkeyPatch.context() as patch:
    _python(patch)
    PYTHON_PAIR = _established()


def _state(node: Node) -> tuple[object, ...]:
    device = node.device
    peer = next(iter(device.peers.values()))
    windows = {index: (kp.replay._top, tuple(kp.replay._words))
               for index, kp in device.keypairs.items()}
    return (dict(device.counters), peer.endpoint, peer.rx_bytes, peer.tx_bytes,
            peer.last_received, windows, device.peer_events)


def _round(pair: tuple[Node, Node], kinds: list[int], picks: list[tuple[int, bool, bool]],
           junk: bool) -> tuple[object, ...]:
    a, b = pair
    keypair = next(iter(a.device.peers.values())).current
    assert keypair is not None
    sealed = keypair.seal([PLAINTEXTS[kind] for kind in kinds], 1420)
    batch = []
    for pick, tamper, moved in picks:
        data = sealed[pick % len(sealed)]
        if tamper:
            data = data[:-1] + bytes([data[-1] ^ 0x80])
        batch.append((data, MOVED if moved else a.endpoint))
    if junk:
        batch.insert(len(batch) // 2, (b"\x04\0\0\0" + bytes(12), a.endpoint))
    to_tun, out = b.device.receive(batch, 1000.0)
    return sealed, to_tun, out, _state(b)


@settings(max_examples=300, deadline=None)
@given(kinds=st.lists(st.sampled_from(range(len(PLAINTEXTS))), min_size=1, max_size=10),
       picks=st.lists(st.tuples(st.integers(0, 20), st.booleans(), st.booleans()),
                      max_size=14),
       in_order=st.booleans(), junk=st.booleans())
def test_at_once_and_one_by_one_agree(kinds: list[int], picks: list[tuple[int, bool, bool]],
                                      in_order: bool, junk: bool) -> None:
    if in_order:  # the common case: every message once, in order, untouched, one source
        picks = [(i, False, picks[0][2] if picks else False) for i in range(len(kinds))]
    compiled = _round(COMPILED_PAIR, kinds, picks, junk)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _python(monkeypatch)
        python = _round(PYTHON_PAIR, kinds, picks, junk)
    assert compiled == python
